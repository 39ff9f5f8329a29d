"""Test kit for plugin authors.

- :mod:`studyvault.testing.dicomgen` writes small, valid DICOM studies;
- :mod:`studyvault.testing.conformance` is the pytest suite every storage backend
  passes: ``from studyvault.testing import StorageConformance`` and subclass it.

The conformance names are loaded on first use, so ``studyvault.testing.dicomgen``
works without pytest installed.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SourceStudy", "StorageConformance", "make_source_study", "read_back", "store"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import conformance

        return getattr(conformance, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
