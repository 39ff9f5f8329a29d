"""studyvault: keep a medical practice's DICOM studies safe for years."""

from __future__ import annotations

__version__ = "0.1.0"
