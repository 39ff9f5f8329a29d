"""The built-in folder archive: nearline storage in a disk folder or network share.

Every study is a standalone DICOM file-set (DICOMDIR, PS3.10 file IDs and a SHA-256
manifest) that any viewer or DCMTK reads without studyvault, stored as a folder or as
one uncompressed zip. See docs/folder-archives.md.
"""

from __future__ import annotations

from studyvault import hookimpl

from .archive import FolderArchive, FolderArchiveConfig

__all__ = ["FolderArchive", "FolderArchiveConfig"]


@hookimpl
def studyvault_register_storage_kinds(register):  # type: ignore[no-untyped-def]
    register(FolderArchive)
