"""The S3 archive: nearline studies in an S3-compatible object store (AWS S3, MinIO,
Ceph RGW).

Every study is the same standalone DICOM file-set as in a folder archive (DICOMDIR,
PS3.10 file IDs, SHA-256 manifest), one object per file below a study prefix, or one
uncompressed zip object. See docs/s3-archives.md.
"""

from __future__ import annotations

from studyvault import hookimpl

from .archive import S3Archive, S3ArchiveConfig

__all__ = ["S3Archive", "S3ArchiveConfig"]


@hookimpl
def studyvault_register_storage_kinds(register):  # type: ignore[no-untyped-def]
    register(S3Archive)
