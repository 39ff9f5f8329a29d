"""Storing received instances: the incoming image directory, group commits, the receive log.

The receiver hands every instance it gets to one :class:`IncomingStore`, from any
number of association threads at once. The store is thread-safe: one lock orders the
duplicate check, the write and the bookkeeping, so two devices sending the same
instance can never both store it; the fsyncs happen outside it, in groups, so that
devices sending at once share them.

When an instance is acknowledged
--------------------------------
:meth:`IncomingStore.store` returns (and the receiver answers Success) only once the
instance's file is durable: written under a temporary name, fsynced, renamed into its
study's folder, and the folder fsynced (for everything the associations stored
meanwhile at once, see :meth:`IncomingStore._wait_durable`). Its index entry is
committed in a group --
every :attr:`~IncomingStore.commit_seconds`, every :attr:`~IncomingStore.commit_batch`
instances, when an association is released and when the service stops -- not before
the answer: an index commit costs two more fsyncs, which would halve the rate at which
one device can send.

The gap between the answer and the group commit is covered by the *receive log*
(``<data_dir>/receiving.log``): before the first instance of a study is written, the
study's folder is appended to the log and the log fsynced; after each group commit the
log is emptied. A service killed in between (power cut, SIGKILL) calls
:func:`recover_received` at its next start (``studyvault housekeeping`` does too when
no service runs), which indexes every file in the logged folders that the index does
not know. An acknowledged instance is therefore never lost, and never missing from the
index for longer than a restart.

Where an instance goes
----------------------
An instance of a study that already has an online copy goes to that image directory,
so a study is never split, and may use the first half of its free-space reserve. A new
study goes to the incoming image directory; when that is below its reserve (or
offline), the next image directory in config order with room becomes the incoming
one: the switch is logged and written to the config file (``studyvault.incoming``).
When no image directory has room, the instance is refused with
:class:`~studyvault.errors.StorageFullError` and nothing is written.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import msgspec

from .config import edit_config, set_key
from .dicom import read_header_bytes
from .errors import (
    ConfigError,
    NotDicomError,
    StorageError,
    StorageFullError,
    StorageOfflineError,
    StudyvaultError,
)
from .fsutil import atomic_write_bytes, fsync_dir
from .ingest import Ingestor, Outcome
from .records import InstanceHeader
from .storage import OnlineStorage, Status
from .vault import RECEIVE_LOG as RECEIVE_LOG  # also for the service
from .vault import Vault

log = logging.getLogger(__name__)

_STATUS_RECHECK = 30.0  # seconds between checks that a storage in use is still online


class _LogEntry(msgspec.Struct, frozen=True):
    """One line of the receive log: a study folder that may hold unindexed files."""

    storage: str  # storage id
    location: str  # the study's location in that storage
    source: str  # "network:<calling AE title>" of the instance that opened it


_encode_entry = msgspec.json.Encoder().encode
_decode_entry = msgspec.json.Decoder(_LogEntry).decode


class IncomingStore:
    """Stores received instances durably and indexes them in groups.

    :param vault: the open vault; its config and storages may be replaced while the
        store runs (the service reloads an edited config), the store follows.
    :param log_path: the receive log (normally ``<data_dir>/receiving.log``).
    :param commit_seconds: commit the index at least this often while instances arrive.
    :param commit_batch: …and as soon as this many instances wait for a commit.
    :param persist_switch: write a switch of the incoming image directory to the config.
    """

    def __init__(
        self,
        vault: Vault,
        log_path: Path,
        *,
        commit_seconds: float = 0.5,
        commit_batch: int = 500,
        persist_switch: bool = True,
    ) -> None:
        self.vault = vault
        self.log_path = Path(log_path)
        self.commit_seconds = commit_seconds
        self.commit_batch = commit_batch
        self.persist_switch = persist_switch
        self._lock = threading.Lock()
        self._ingestors: dict[str, Ingestor] = {}  # storage id -> ingestor
        self._pending = 0  # instances stored and not yet committed
        self._pending_studies: dict[str, str] = {}  # study uid -> storage id, uncommitted
        self._pending_sops: dict[str, str] = {}  # sop uid -> storage id, uncommitted
        self._logged: set[tuple[str, str]] = set()
        self._incoming: str | None = None  # name of the incoming image directory
        self._checked: dict[str, float] = {}  # storage id -> monotonic time of last status
        self._log_fd: int | None = None
        self._carried = b""  # log lines left by recovery (an offline storage): kept
        self._keep_log = False  # a commit failed: the log is needed at the next start
        self._wake = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None
        # Flush groups: files ingested by concurrent associations are made durable
        # together (see _wait_durable). Group n holds what was ingested before the n-th
        # take; _durable is the last group made durable.
        self._group = 1
        self._durable = 0
        self._flushing = False
        self._unflushed: dict[str, OnlineStorage] = {}  # storage id -> storage
        self._inflight: list[Future[None]] = []
        self._failed: dict[int, StudyvaultError] = {}  # group -> why its flush failed
        self._flushed = threading.Condition()

    # -- life cycle -------------------------------------------------------------------
    def start(self) -> None:
        """Open the receive log and start the group-commit thread."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._carried = self.log_path.read_bytes()
        except FileNotFoundError:
            self._carried = b""
        self._log_fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        fsync_dir(self.log_path.parent)
        self._thread = threading.Thread(target=self._commit_loop, name="group-commit", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Commit what waits, stop the commit thread and remove the (empty) receive log.

        Instances offered after this are refused with
        :class:`~studyvault.errors.StorageOfflineError`.
        """
        with self._lock:
            self._closed = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        committed = self.commit()
        if self._log_fd is not None:
            os.close(self._log_fd)
            self._log_fd = None
            if committed and not self._carried:
                self.log_path.unlink(missing_ok=True)

    @property
    def incoming(self) -> str:
        """Name of the image directory new studies go to."""
        return self._incoming or self.vault.config.studyvault.incoming

    def reconfigure(self) -> None:
        """Follow a reloaded config: commit, then forget cached storages."""
        with self._lock:
            self._commit_locked()
            self._ingestors.clear()
            self._checked.clear()
            self._incoming = None

    # -- storing ----------------------------------------------------------------------
    def store(self, data: bytes, header: InstanceHeader, source: str) -> tuple[Outcome, str]:
        """Store one received instance durably (see the module's notes).

        :param data: the instance as a PS3.10 file (preamble, file meta, data set).
        :param header: its header, read from ``data``.
        :param source: ``"network:<calling AE title>"``.
        :returns: the outcome and, for a duplicate or a conflict, the reason.
        :raises StorageFullError: no image directory has room; nothing was written.
        :raises StorageOfflineError: the image directory cannot be reached, or the
            service is stopping.
        """
        with self._lock:
            if self._closed:
                raise StorageOfflineError("the service is stopping")
            storage = self._target(header.study_uid, len(data))
            if self._pending_sops.get(header.sop_uid, storage.id) != storage.id:
                # the same SOP instance waits for a commit in another image directory:
                # commit first, so that the duplicate check finds it in the index
                self._commit_locked()
            ingestor = self._ingestor(storage)
            location, _ = storage.ingested_path(header.study_uid, header.sop_uid)
            self._note(storage, location, source)
            outcome, reason = ingestor.add(header, data, source=source)
            if outcome is not Outcome.STORED:
                return outcome, reason
            self._unflushed[storage.id] = storage
            group = self._group
            self._pending += 1
            self._pending_studies[header.study_uid] = storage.id
            self._pending_sops[header.sop_uid] = storage.id
            if self._pending >= self.commit_batch:
                self._wake.set()
        self._wait_durable(group)  # Success only once the file and its folder are
        return outcome, reason

    def _wait_durable(self, group: int) -> None:
        """Return once flush group ``group`` is durable.

        The first association to wait becomes the leader: it takes everything ingested
        so far as one group and flushes it (files fsynced together, then renamed, then
        their folders fsynced) while the others wait; those that ingested meanwhile form
        the next group. One device gets a flush per instance; several devices share.
        """
        while True:
            with self._flushed:
                if self._durable >= group:
                    error = self._failed.get(group)
                    if error is not None:
                        raise error
                    return
                if self._flushing:
                    self._flushed.wait()
                    continue
                self._flushing = True
            taken, error = self._flush_group()
            with self._flushed:
                self._flushing = False
                self._durable = taken
                if error is not None:
                    self._failed[taken] = error
                    for old in [g for g in self._failed if g < taken - 1000]:
                        del self._failed[old]
                self._flushed.notify_all()

    def _flush_group(self) -> tuple[int, StudyvaultError | None]:
        with self._lock:
            taken = self._group
            self._group += 1
            storages = list(self._unflushed.values())
            self._unflushed.clear()
            futures = [(storage, storage.flush_async()) for storage in storages]
            self._inflight.extend(future for _, future in futures)
        failed: list[tuple[OnlineStorage, BaseException]] = []
        for storage, future in futures:
            try:
                future.result()
            except Exception as exc:  # any failure: the group is not durable
                failed.append((storage, exc))
        with self._lock:
            self._inflight = [f for f in self._inflight if not f.done()]
            if not failed:
                return taken, None
            for where, why in failed:
                self._flush_failed(where, why)
        where, why = failed[0]
        error = StorageFullError if isinstance(why, StorageFullError) else StorageError
        return taken, error(f"{where.name}: received instances could not be made durable: {why}")

    def _flush_failed(self, storage: OnlineStorage, exc: BaseException) -> None:
        """A flush failed (a disk error): forget the storage's uncommitted instances and
        index instead what stands on disk in the folders they went to."""
        log.error("%s: cannot make received instances durable: %s", storage.name, exc)
        self._ingestors.pop(storage.id, None)
        self._keep_log = True  # the next start looks at these folders again
        for storage_id, location in list(self._logged):
            if storage_id == storage.id:
                entry = _LogEntry(storage_id, location, "network")
                try:
                    _adopt_folder(self.vault, storage, entry)
                except (StudyvaultError, OSError) as error:
                    log.error("%s: %s", storage.name, error)

    def commit(self) -> bool:
        """Index everything stored so far; True when nothing is left uncommitted."""
        with self._lock:
            return self._commit_locked()

    def _commit_locked(self) -> bool:
        try:
            # files of a group still being flushed must be durable before they are
            # indexed; the ingestors flush the rest themselves
            for future in self._inflight:
                future.result()
            self._inflight.clear()
            for ingestor in self._ingestors.values():
                ingestor.commit()
        except Exception as exc:  # the commit thread must outlive a bad moment
            # The files are durable and their folders in the receive log, which is kept
            # from now on: the next start's recovery indexes what this commit dropped.
            log.error("cannot index received instances: %s", exc, exc_info=exc)
            self._keep_log = True
            return False
        self._pending = 0
        self._pending_studies.clear()
        self._pending_sops.clear()
        if self._log_fd is not None and self._logged and not self._keep_log:
            os.ftruncate(self._log_fd, 0)
            if self._carried:
                os.write(self._log_fd, self._carried)
                os.fsync(self._log_fd)
            self._logged.clear()
        return not self._keep_log

    def _commit_loop(self) -> None:
        while not self._closed:
            self._wake.wait(self.commit_seconds)
            self._wake.clear()
            if self._pending:
                self.commit()

    def _note(self, storage: OnlineStorage, location: str, source: str) -> None:
        """Append the study folder to the receive log (durably) before its first file."""
        key = (storage.id, location)
        if key in self._logged or self._log_fd is None:
            return
        line = _encode_entry(_LogEntry(storage.id, location, source)) + b"\n"
        try:
            os.write(self._log_fd, line)
            os.fsync(self._log_fd)
        except OSError as exc:
            error = StorageFullError if exc.errno in (errno.ENOSPC, errno.EDQUOT) else StorageError
            raise error(f"{self.log_path}: cannot write the receive log: {exc.strerror}") from exc
        self._logged.add(key)

    def _ingestor(self, storage: OnlineStorage) -> Ingestor:
        ingestor = self._ingestors.get(storage.id)
        if ingestor is None or ingestor.storage is not storage:
            # commits are driven here, never by the ingestor itself
            ingestor = Ingestor(
                self.vault.index,
                storage,
                self.vault.plugins,
                "network",
                batch=1 << 62,
                seconds=float("inf"),
            )
            old = self._ingestors.get(storage.id)
            if old is not None:
                old.commit()
            self._ingestors[storage.id] = ingestor
        return ingestor

    # -- choosing the image directory ---------------------------------------------------
    def _target(self, study_uid: str, nbytes: int) -> OnlineStorage:
        home = self._home_of(study_uid)
        if home is not None:
            self._check_online(home)
            reserve = home.config.min_free_mb * 1024 * 1024 // 2
            if home.free_bytes() - nbytes < reserve:
                raise StorageFullError(
                    f"{home.name} is full: study {study_uid} is stored there and "
                    f"{nbytes / 1e6:.1f} MB more would leave less than half of its "
                    f"{home.config.min_free_mb} MB reserve"
                )
            return home
        current = self.vault.image_directory(self.incoming)
        try:
            self._check_usable(current, nbytes)
            return current
        except (StorageFullError, StorageOfflineError) as exc:
            problem = exc
        dirs = self.vault.image_directories()
        start = next((i for i, s in enumerate(dirs) if s is current), -1) + 1
        for candidate in dirs[start:] + dirs[:start]:
            if candidate is current:
                continue
            try:
                self._check_usable(candidate, nbytes)
            except (StorageFullError, StorageOfflineError):
                continue
            self._switch(current, candidate, problem)
            return candidate
        raise problem

    def _home_of(self, study_uid: str) -> OnlineStorage | None:
        """The image directory already holding part of the study, if any."""
        storage_id = self._pending_studies.get(study_uid)
        if storage_id is None:
            study = self.vault.index.get_study(study_uid)
            if study is None:
                return None
            online = [
                s
                for s in (self.vault.storage_by_id(sid) for sid in study.copies)
                if isinstance(s, OnlineStorage)
            ]
            if not online:
                return None
            incoming = next((s for s in online if s.name == self.incoming), None)
            return incoming or online[0]
        storage = self.vault.storage_by_id(storage_id)
        return storage if isinstance(storage, OnlineStorage) else None

    def _check_usable(self, storage: OnlineStorage, nbytes: int) -> None:
        self._check_online(storage)
        storage.check_room(nbytes)

    def _check_online(self, storage: OnlineStorage) -> None:
        now = time.monotonic()
        if now - self._checked.get(storage.id, -_STATUS_RECHECK) < _STATUS_RECHECK:
            return
        if storage.status() is not Status.ONLINE:
            self._checked.pop(storage.id, None)
            raise StorageOfflineError(
                f"{storage.name} is offline: {storage.root} cannot be reached or its key "
                "file does not match"
            )
        self._checked[storage.id] = now

    def _switch(self, old: OnlineStorage, new: OnlineStorage, why: StudyvaultError) -> None:
        self._commit_locked()
        self._incoming = new.name
        log.warning("new studies now go to image directory %s: %s", new.name, why)
        if not self.persist_switch:
            return
        try:
            edit_config(
                self.vault.config.path,
                lambda doc: set_key(doc, "studyvault", "incoming", new.name),
            )
        except (ConfigError, StorageError, OSError) as exc:
            log.warning(
                "cannot record the switch in %s (%s); it lasts until the service stops",
                self.vault.config.path,
                exc,
            )


def recover_received(vault: Vault, log_path: Path) -> int:
    """Index the received files that a killed service acknowledged but did not commit.

    Every study folder in the receive log is read; each DICOM file in it that the index
    does not know is indexed. Folders of a storage that is offline now stay in the log
    for the next start.

    :returns: the number of instances indexed.
    """
    try:
        lines = Path(log_path).read_bytes().splitlines()
    except FileNotFoundError:
        return 0
    entries: dict[tuple[str, str], _LogEntry] = {}
    for line in lines:
        try:
            entry = _decode_entry(line)
        except msgspec.DecodeError:
            continue  # a line torn by the crash: its file was never acknowledged
        entries.setdefault((entry.storage, entry.location), entry)
    kept: list[_LogEntry] = []
    found = 0
    for entry in entries.values():
        storage = vault.storage_by_id(entry.storage)
        if not isinstance(storage, OnlineStorage):
            log.warning("receive log: storage %s is no longer configured", entry.storage)
            continue
        if storage.status() is not Status.ONLINE:
            log.warning("receive log: %s is offline; will look again at the next start", storage)
            kept.append(entry)
            continue
        found += _adopt_folder(vault, storage, entry)
    if kept:
        atomic_write_bytes(Path(log_path), b"".join(_encode_entry(e) + b"\n" for e in kept))
    else:
        Path(log_path).unlink(missing_ok=True)
    if found:
        log.warning("indexed %d received instances whose index commit was interrupted", found)
    return found


def _adopt_folder(vault: Vault, storage: OnlineStorage, entry: _LogEntry) -> int:
    ingestor = Ingestor(vault.index, storage, vault.plugins, entry.source)
    found = 0
    try:
        files = list(storage.iter_files(entry.location))
    except OSError:
        return 0  # nothing was written, or the study has moved on since
    for path, opener in files:
        with opener() as src:
            data = src.read()
        try:
            header = read_header_bytes(data, f"{storage.name}:{entry.location}/{path}")
        except NotDicomError as exc:
            log.warning("receive log: %s", exc)
            continue
        if vault.index.get_instance(header.study_uid, header.sop_uid) is not None:
            continue
        ingestor.adopt(
            header,
            location=entry.location,
            path=path,
            size=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
        )
        found += 1
    ingestor.commit()
    return found
