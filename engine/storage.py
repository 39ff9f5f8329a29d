"""The storage interface every backend (storage kind) implements.

A storage is either an *image directory* (online: live studies) or an *archive*
(nearline). The engine owns the index and the transfer protocol; a backend only
reads and writes files in its own format. A backend never writes the index.

Transfers go through staging so that a study appears in a storage only when it is
complete: :meth:`Storage.plan_store` picks the study's final location and a staging
name, :meth:`Storage.write_staging` writes every file there durably,
the engine verifies the staged files through :meth:`Storage.open_file`,
:meth:`Storage.publish` makes the study visible atomically, and
:meth:`Storage.discard_staging` throws away an unpublished attempt.
"""

from __future__ import annotations

import shutil
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future
from enum import StrEnum
from pathlib import Path
from typing import IO, Any, ClassVar

import msgspec

from .records import InstanceRecord, StudyRecord

#: Opens one instance's bytes for reading (the source side of a store).
Opener = Callable[[], IO[bytes]]


class Role(StrEnum):
    """Which tier a storage kind serves."""

    IMAGE_DIRECTORY = "image_directory"
    ARCHIVE = "archive"


class Status(StrEnum):
    """A storage's state, as shown in lists."""

    ONLINE = "Online"
    UNMOUNTED = "Unmounted"  # by the admin: nothing stored or fetched
    OFFLINE = "Offline"  # folder or endpoint unreachable


class StorageConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Fields every storage has in the config file. Kinds subclass it."""

    name: str
    id: str = ""  # written by studyvault when the storage is created; matches its key file
    path: str = ""
    min_free_mb: int = 0


class StorePlan(msgspec.Struct, kw_only=True):
    """Where a study will be stored, decided before anything is written.

    Recorded in the journal so a killed run finds its staging again.
    """

    location: str  # final location of the study inside the storage
    staging: str  # staging name inside the storage (same filesystem)
    paths: dict[str, str]  # SOPInstanceUID -> path relative to the location


class Storage(ABC):
    """Base class of storage kinds. Register subclasses with
    :func:`~studyvault.hookspecs.studyvault_register_storage_kinds`.

    :param config: the storage's config entry, an instance of :attr:`config_type`.
    :param base: folder that relative paths in the config are relative to.
    """

    kind: ClassVar[str]
    role: ClassVar[Role]
    config_type: ClassVar[type[StorageConfig]] = StorageConfig
    #: URL scheme naming storages of this kind (``s3`` for ``archives mount
    #: s3://bucket/prefix``); empty for kinds that live in a folder
    url_scheme: ClassVar[str] = ""

    def __init__(self, config: StorageConfig, base: Path | None = None) -> None:
        self.config = config
        self.name = config.name
        self.id = config.id
        path = Path(config.path).expanduser()
        self.root = path if path.is_absolute() or base is None else base / path

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} at {self.root}>"

    @classmethod
    def config_from_options(cls, where: str, options: Mapping[str, Any]) -> dict[str, Any]:
        """The config entry's fields (without ``name`` and ``id``) for ``archives add
        NAME WHERE --kind KIND --option key=value...`` and ``archives mount WHERE``.

        :param where: a folder path, or a URL of :attr:`url_scheme`; may be empty when
            the options say where the storage is.
        :param options: field name -> value; values may be strings, they are converted
            to the fields' types by the caller.
        :raises ValueError: for options that make no sense together (the message is
            shown to the user).
        """
        return {"path": where, **options} if where else dict(options)

    def where(self) -> str:
        """Where the storage lives, as lists show it and ``archives mount`` takes it:
        its folder, or a URL for kinds with a :attr:`url_scheme`."""
        return str(self.root)

    def key(self) -> dict[str, Any]:
        """The fields of the storage's identity (key file or object) at its configured
        place: at least ``id``; ``name``, ``naming``, ``compression`` when the kind has them.

        :raises StorageError: when there is none or it cannot be read (the default).
        """
        from .errors import StorageError

        raise StorageError(f"{self.name}: a {self.kind} storage has no key to read")

    # -- identity and state -------------------------------------------------------
    @abstractmethod
    def create(self) -> str:
        """Make a new, empty storage at :attr:`root` and return its new id.

        Refuses a folder that holds files but no key of this kind.
        """

    @abstractmethod
    def status(self) -> Status:
        """Online when the storage can be read and written now."""

    def describe(self) -> str:
        """One line for lists, e.g. the location and options."""
        return str(self.root)

    def free_bytes(self) -> int:
        """Bytes free for new studies (0 when unreachable)."""
        try:
            return shutil.disk_usage(self.root).free
        except OSError:
            return 0

    def check_room(self, nbytes: int) -> None:
        """Raise :class:`~studyvault.errors.StorageFullError` when storing ``nbytes``
        would leave less than the configured reserve."""
        from .errors import StorageFullError

        reserve = self.config.min_free_mb * 1024 * 1024
        free = self.free_bytes()
        if free - nbytes < reserve:
            raise StorageFullError(
                f"{self.name} is full: storing {nbytes / 1e6:.1f} MB would leave "
                f"{max(free - nbytes, 0) / 1e6:.1f} MB free, below its reserve of "
                f"{self.config.min_free_mb} MB"
            )

    # -- storing studies (staging, then publish) ----------------------------------
    @abstractmethod
    def plan_store(self, study: StudyRecord, instances: list[InstanceRecord]) -> StorePlan:
        """Choose the study's location, a staging name and each instance's path.

        Must not write anything. If the study already has a location here (a merge on
        return), reuse it.
        """

    @abstractmethod
    def write_staging(
        self,
        plan: StorePlan,
        study: StudyRecord,
        instances: Iterable[tuple[InstanceRecord, Opener]],
    ) -> None:
        """Write every instance (and any per-study files) into staging, durably
        (fsync files and folders). Called again after a crash: start afresh."""

    def verified_on_write(self, plan: StorePlan, instances: list[InstanceRecord]) -> set[str]:
        """SOPInstanceUIDs of staged instances that this storage already verified
        against their recorded SHA-256 while :meth:`write_staging` stored them (an object
        store that checked a SHA-256 checksum sent with the upload), so the engine does
        not read them back. Only for the staging just written by this object; the
        default vouches for none."""
        return set()

    @abstractmethod
    def publish(self, plan: StorePlan) -> None:
        """Make the staged, verified study visible at ``plan.location`` atomically
        (replacing a previous copy at that location, for a merge), durably. Called again
        after a crash: when staging is gone and the location stands, do nothing."""

    @abstractmethod
    def discard_staging(self, plan: StorePlan) -> None:
        """Remove an unpublished staging attempt, if any, restoring a previous copy a
        half-done :meth:`publish` had moved aside. Idempotent."""

    # -- reading ------------------------------------------------------------------
    @abstractmethod
    def open_file(self, location: str, path: str) -> IO[bytes]:
        """Open one instance of the study at ``location`` (a published location or a
        staging name) for reading."""

    @abstractmethod
    def iter_studies(self) -> Iterator[str]:
        """Yield the location of every published study (for rebuild and check)."""

    @abstractmethod
    def iter_files(self, location: str) -> Iterator[tuple[str, Opener]]:
        """Yield (path, opener) for every instance file of the study at ``location``."""

    # -- removing -----------------------------------------------------------------
    @abstractmethod
    def remove_study(self, location: str) -> None:
        """Delete the study at ``location``. Idempotent. The engine calls it only after
        a verified copy elsewhere is committed in the index, or for a confirmed delete."""

    # -- what the files alone cannot tell -------------------------------------------
    def mark_moved_out(self, location: str) -> None:
        """Record beside the study at ``location`` that it was moved out of studyvault
        (it stays on disk but leaves the study list), so that an index rebuild or a
        mount does not list it again. Durable when it returns.

        :raises StorageError: if this kind cannot keep such a mark (the default).
        """
        from .errors import StorageError

        raise StorageError(f"{self.name}: a {self.kind} storage cannot mark a study moved out")

    def is_moved_out(self, location: str) -> bool:
        """Tell whether the study at ``location`` was marked with :meth:`mark_moved_out`
        (always False for kinds that cannot mark)."""
        return False

    def last_stored(self) -> float | None:
        """Unix time a study was last stored here, or None when never (or not known)."""
        return None

    def staging_leftovers(self) -> list[str]:
        """Staging names present now (``studyvault check`` compares them with the
        journal); :meth:`discard_staging` removes one. Empty for kinds without staging."""
        return []


class OnlineStorage(Storage):
    """An image directory kind: it also takes instances one by one (import, receive)."""

    role = Role.IMAGE_DIRECTORY

    @abstractmethod
    def ingest(
        self, study_uid: str, sop_uid: str, src: IO[bytes] | bytes
    ) -> tuple[str, str, int, str]:
        """Store one instance. It is durable, and at its returned path, only once
        :meth:`flush` has returned: call it before committing the index (the
        :class:`~studyvault.ingest.Ingestor` does). Replaces an earlier file of the
        same instance.

        :returns: (study location, path within it, size in bytes, SHA-256 hex).
        """

    @abstractmethod
    def flush(self) -> None:
        """Make the folder entries of everything ingested since the last flush durable."""

    def flush_async(self) -> Future[None]:
        """Start :meth:`flush` for what was ingested so far and return at once; the
        future completes when it is durable. Later ingests belong to the next flush.
        The default flushes synchronously."""
        future: Future[None] = Future()
        self.flush()
        future.set_result(None)
        return future

    @abstractmethod
    def ingested_path(self, study_uid: str, sop_uid: str) -> tuple[str, str]:
        """(location, path) an instance gets when ingested; nothing is written."""

    @abstractmethod
    def remove_instances(self, location: str, paths: list[str]) -> bool:
        """Remove these instance files of a study (and its notes), and the study's
        folder when nothing else is left in it: an instance received while the study
        was being moved must survive. Idempotent.

        :returns: True when the study's location is gone.
        """

    @abstractmethod
    def write_note(self, location: str, name: str, text: str) -> None:
        """Durably write a small note file beside a study's instances (e.g. a fetched
        study's return date, so an index rebuild keeps it). Not an instance."""

    @abstractmethod
    def read_note(self, location: str, name: str) -> str | None:
        """Read a note written by :meth:`write_note`, or None."""
