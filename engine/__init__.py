"""studyvault: keep a medical practice's DICOM studies safe for years.

The public API for plugin authors starts here: ``from studyvault import hookimpl``.
Importing studyvault loads no plugin; :func:`studyvault.manager.load_plugins` does.
"""

from __future__ import annotations

from .actions import Action, ActionContext
from .hookspecs import hookimpl
from .records import InstanceRecord, StudyRecord
from .storage import OnlineStorage, Role, Status, Storage, StorageConfig, StorePlan

__version__ = "0.1.0"

__all__ = [
    "Action",
    "ActionContext",
    "InstanceRecord",
    "OnlineStorage",
    "Role",
    "Status",
    "Storage",
    "StorageConfig",
    "StorePlan",
    "StudyRecord",
    "__version__",
    "hookimpl",
]
