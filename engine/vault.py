"""The engine's front door: a config, the loaded plugins, the storages and the index."""

from __future__ import annotations

import logging
from pathlib import Path

from .config import Config, load_config, resolve_config_path, write_starter
from .errors import IndexMissingError, StudyvaultError, UnknownStorageError
from .index import StudyIndex
from .manager import PluginHost, load_plugins
from .storage import OnlineStorage, Role, Status, Storage, StorageConfig

log = logging.getLogger(__name__)

#: the receive log in the data folder (see :mod:`studyvault.incoming`)
RECEIVE_LOG = "receiving.log"


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
        # the storages as the command found them: a storage added later by this
        # command (an adopted image directory, a mounted archive) is indexed by it
        self._opened_with = list(self.storages.values())

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
        # An image directory whose folder is missing is not created here: it is
        # Offline (a disk not mounted) until its folder is back. New ones are created
        # by `init` (write_starter) and `image-dirs add`.
        return cls(load_config(path, plugins.storage_kinds.get), plugins)

    def _make(self, entry: StorageConfig) -> Storage:
        kind = self.plugins.storage_kinds.get(self.config.kinds[entry.name])
        return kind(entry, self.config.base)

    # -- lookups --------------------------------------------------------------------
    @property
    def index(self) -> StudyIndex:
        """The study index, opened on first use. A missing (or new and empty) index
        while a storage holds studies is refused with
        :class:`~studyvault.errors.IndexMissingError`, never silently started afresh."""
        if self._index is None:
            path = self.config.index_dir
            if not (path / "data.mdb").exists():
                self._refuse_missing_index("missing")  # before anything is created
            index = StudyIndex(path)
            if index.count_studies() == 0:
                try:
                    self._refuse_missing_index("empty")
                except IndexMissingError:
                    index.close()
                    raise
            self._index = index
        return self._index

    def _refuse_missing_index(self, state: str) -> None:
        """Raise IndexMissingError when a storage holds studies (the first one found
        that was not moved out) although the index at hand has none."""
        # instances a killed service received but did not index: its next start (or
        # `housekeeping`) indexes them from this log; not a lost index
        receive_log = self.config.data_dir / RECEIVE_LOG
        if receive_log.exists() and receive_log.stat().st_size:
            return
        for storage in self._opened_with:
            try:
                if storage.status() is not Status.ONLINE:
                    continue
                held = any(not storage.is_moved_out(loc) for loc in storage.iter_studies())
            except (StudyvaultError, OSError):
                continue  # cannot be read now: says nothing about the index
            if held:
                raise IndexMissingError(
                    f"the study index at {self.config.index_dir} is {state} while "
                    f"{storage.name} holds studies: run `studyvault index rebuild` to "
                    "recreate it from the storages"
                )

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
                "file is missing or does not match; check that its disk or network share "
                "is mounted"
            )
