"""The engine's front door: a config, the loaded plugins, the storages and the index."""

from __future__ import annotations

import logging
from pathlib import Path

from .config import Config, load_config, resolve_config_path, write_starter
from .errors import UnknownStorageError
from .index import StudyIndex
from .manager import PluginHost, load_plugins
from .storage import OnlineStorage, Role, Status, Storage, StorageConfig

log = logging.getLogger(__name__)


class Vault:
    """Everything a command needs, opened from one config file.

    :param config: the validated config.
    :param plugins: the loaded plugins.
    """

    def __init__(self, config: Config, plugins: PluginHost) -> None:
        self.config = config
        self.plugins = plugins
        self._index: StudyIndex | None = None
        self.storages: dict[str, Storage] = {}
        for entry in [*config.image_directories, *config.archives]:
            self.storages[entry.name] = self._make(entry)

    @classmethod
    def open(cls, config_path: Path | None = None, *, create_default: bool = True) -> Vault:
        """Open the vault of ``config_path`` (or ``$STUDYVAULT_CONFIG``, or the default).

        The default config (not one named explicitly) is created on first use, so
        studyvault runs with no set-up at all.
        """
        path, explicit = resolve_config_path(config_path)
        if not path.exists() and not explicit and create_default:
            write_starter(path.parent)
            log.warning("created a starter config at %s", path)
        plugins = load_plugins()
        vault = cls(load_config(path, plugins.storage_kinds.get), plugins)
        vault.ensure_image_directories()
        return vault

    def _make(self, entry: StorageConfig) -> Storage:
        kind = self.plugins.storage_kinds.get(self.config.kinds[entry.name])
        return kind(entry, self.config.base)

    def ensure_image_directories(self) -> None:
        """Create the folder and key of a configured image directory that has none yet
        (the starter config's default one)."""
        for storage in self.image_directories():
            if not storage.root.exists() and storage.id:
                storage.create()

    # -- lookups --------------------------------------------------------------------
    @property
    def index(self) -> StudyIndex:
        if self._index is None:
            self._index = StudyIndex(self.config.index_dir)
        return self._index

    def close(self) -> None:
        if self._index is not None:
            self._index.close()
            self._index = None

    def __enter__(self) -> Vault:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def storage(self, name: str) -> Storage:
        try:
            return self.storages[name]
        except KeyError:
            known = ", ".join(sorted(self.storages)) or "none"
            raise UnknownStorageError(
                f"no image directory or archive named {name!r} (known: {known})"
            ) from None

    def storage_by_id(self, storage_id: str) -> Storage | None:
        return next((s for s in self.storages.values() if s.id == storage_id), None)

    def storage_name(self, storage_id: str) -> str:
        storage = self.storage_by_id(storage_id)
        return storage.name if storage else f"<unknown storage {storage_id[:8]}>"

    def image_directories(self) -> list[OnlineStorage]:
        return [s for s in self.storages.values() if isinstance(s, OnlineStorage)]

    def archives(self) -> list[Storage]:
        return [s for s in self.storages.values() if s.role == Role.ARCHIVE]

    def image_directory(self, name: str | None = None) -> OnlineStorage:
        """The named image directory, or the incoming one."""
        name = name or self.config.studyvault.incoming
        if not name:
            raise UnknownStorageError(
                f"{self.config.path}: no image directory is configured "
                "(add one with `studyvault image-dirs add NAME PATH`)"
            )
        storage = self.storage(name)
        if not isinstance(storage, OnlineStorage):
            raise UnknownStorageError(f"{name!r} is an archive, not an image directory")
        return storage

    def require_online(self, storage: Storage) -> None:
        from .errors import StorageOfflineError

        status = storage.status()
        if status is Status.UNMOUNTED:
            raise StorageOfflineError(
                f"{storage.name} is unmounted: mount it with "
                f"`studyvault archives mount {storage.root}`"
            )
        if status is not Status.ONLINE:
            raise StorageOfflineError(
                f"{storage.name} is offline: {storage.root} cannot be reached or its key "
                "file does not match; check the disk or network share"
            )
