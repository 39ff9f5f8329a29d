"""Every built-in storage backend passes the conformance suite shipped for plugin authors."""

from __future__ import annotations

import uuid
from pathlib import Path

from studyvault.plugins.folder_archive import FolderArchive, FolderArchiveConfig
from studyvault.plugins.image_directory import ImageDirectory
from studyvault.storage import Storage, StorageConfig
from studyvault.testing import StorageConformance


class TestImageDirectory(StorageConformance):
    def make_storage(self, tmp_path: Path, *, min_free_mb: int = 0) -> Storage:
        config = StorageConfig(
            name="Image Center Storage",
            id=str(uuid.uuid4()),
            path=str(tmp_path / "images"),
            min_free_mb=min_free_mb,
        )
        return ImageDirectory(config)


class _FolderArchive(StorageConformance):
    naming = "readable"
    zip = False

    def make_storage(self, tmp_path: Path, *, min_free_mb: int = 0) -> Storage:
        config = FolderArchiveConfig(
            name="My Study Archive",
            id=str(uuid.uuid4()),
            path=str(tmp_path / "archive"),
            min_free_mb=min_free_mb,
            naming=self.naming,
            zip=self.zip,
        )
        return FolderArchive(config)


class TestFolderArchiveReadable(_FolderArchive):
    naming, zip = "readable", False


class TestFolderArchiveUid(_FolderArchive):
    naming, zip = "uid", False


class TestFolderArchiveReadableZip(_FolderArchive):
    naming, zip = "readable", True


class TestFolderArchiveUidZip(_FolderArchive):
    naming, zip = "uid", True
