"""The LMDB study index. One class, :class:`StudyIndex`, owns the environment.

Named databases and their keys (all keys are bytes that sort the way queries need):

==============  =========================================  ===========================
database        key                                        value
==============  =========================================  ===========================
studies         StudyInstanceUID                           StudyRecord
instances       StudyInstanceUID NUL SOPInstanceUID        InstanceRecord
sops            SOPInstanceUID                             StudyInstanceUID
by_date         YYYYMMDD NUL StudyInstanceUID              (empty); unknown date 00000000
by_storage      storage id NUL StudyInstanceUID            (empty)
by_patient      PatientID NUL StudyInstanceUID             (empty)
journal         StudyInstanceUID                           JournalEntry
task_state      task name                                  TaskState
meta            b"schema"                                  schema version
==============  =========================================  ===========================

Transactions are short: every read or write opens and closes its own, and scans
read in chunks, so a caller that works slowly between rows never holds a read
transaction open (which would stop LMDB from reusing pages).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import lmdb
import msgspec

from .errors import IndexCorruptError, StudyvaultError
from .records import InstanceRecord, JournalEntry, StudyRecord

SCHEMA_VERSION = 1
SEP = b"\x00"
NO_DATE = "00000000"
_DBS = (
    "studies",
    "instances",
    "sops",
    "by_date",
    "by_storage",
    "by_patient",
    "journal",
    "task_state",
    "meta",
)

_encoder = msgspec.msgpack.Encoder()
_study_decoder = msgspec.msgpack.Decoder(StudyRecord)
_instance_decoder = msgspec.msgpack.Decoder(InstanceRecord)
_journal_decoder = msgspec.msgpack.Decoder(JournalEntry)

T = TypeVar("T")


class TaskState(msgspec.Struct, kw_only=True):
    """Progress of a storage task, shared between the process running it and others."""

    running: bool = False
    pid: int = 0
    host: str = ""
    started: float = 0.0
    finished: float = 0.0
    done: int = 0
    total: int = 0
    errors: int = 0
    stop_requested: bool = False
    paused: bool = False
    last_result: str = ""  # e.g. "Completed 1001 studies [0 errors]" or "Stopped: archive full"
    last_success: float = 0.0
    # runs ended, by result: completed, errors (completed with errors), paused, stopped
    # (by request), aborted (a storage full or offline); for the service's metrics
    runs: dict[str, int] = {}
    outcome: str = ""  # result of the last run, one of the above


_task_decoder = msgspec.msgpack.Decoder(TaskState)


def _k(*parts: str) -> bytes:
    return SEP.join(p.encode("utf-8", "surrogateescape") for p in parts)


def study_date_key(study: StudyRecord) -> bytes:
    date = study.study_date if len(study.study_date) == 8 else NO_DATE
    return _k(date, study.study_uid)


class StudyIndex:
    """The study index at ``path`` (a folder holding LMDB's data.mdb and lock.mdb).

    :param path: the index folder; created if missing.
    :param map_size: initial map size in bytes; it doubles whenever it runs short.
    :param readonly: open for reading only (still takes LMDB's reader lock).
    """

    def __init__(self, path: Path, *, map_size: int = 1 << 30, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        if not readonly:
            self.path.mkdir(parents=True, exist_ok=True)
        elif not (self.path / "data.mdb").exists():
            raise IndexCorruptError(
                f"no study index at {self.path}: run `studyvault index rebuild`"
            )
        self._check_file()
        try:
            self.env = lmdb.open(
                str(self.path),
                max_dbs=len(_DBS) + 4,
                map_size=map_size,
                readonly=readonly,
                subdir=True,
                max_readers=256,
            )
            self._db = {name: self.env.open_db(name.encode()) for name in _DBS}
        except lmdb.Error as exc:
            raise IndexCorruptError(
                f"the study index at {self.path} cannot be opened ({exc}): "
                "run `studyvault index rebuild` to recreate it from the storages"
            ) from exc
        self._pid = os.getpid()
        self._check_schema()

    def _check_file(self) -> None:
        data = self.path / "data.mdb"
        if not data.exists():
            return
        size = data.stat().st_size
        # An LMDB file always holds at least its two meta pages; a shorter one was
        # truncated (a failed copy, a full disk during restore).
        if 0 < size < 2 * 4096 or size % 4096:
            raise IndexCorruptError(
                f"the study index file {data} is truncated ({size} bytes): "
                "run `studyvault index rebuild` to recreate it from the storages"
            )

    def _check_schema(self) -> None:
        try:
            with self.env.begin(db=self._db["meta"], write=not self.readonly) as txn:
                raw = txn.get(b"schema")
                if raw is None and not self.readonly:
                    txn.put(b"schema", str(SCHEMA_VERSION).encode())
                elif raw is not None and int(raw) != SCHEMA_VERSION:
                    raise IndexCorruptError(
                        f"the study index at {self.path} has schema {int(raw)}, this studyvault "
                        f"reads schema {SCHEMA_VERSION}: run `studyvault index rebuild`"
                    )
        except (lmdb.Error, ValueError) as exc:
            raise IndexCorruptError(
                f"the study index at {self.path} is corrupt ({exc}): "
                "run `studyvault index rebuild` to recreate it from the storages"
            ) from exc

    # -- life cycle ---------------------------------------------------------------
    def close(self) -> None:
        self.env.close()

    def __enter__(self) -> StudyIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _guard_fork(self) -> None:
        if os.getpid() != self._pid:
            raise StudyvaultError("an LMDB environment must not be used across fork(); reopen it")

    # -- transactions -------------------------------------------------------------
    @contextmanager
    def _read(self) -> Iterator[lmdb.Transaction]:
        self._guard_fork()
        try:
            with self.env.begin() as txn:
                yield txn
        except lmdb.CorruptedError as exc:
            raise IndexCorruptError(
                f"the study index at {self.path} is corrupt ({exc}): run `studyvault index rebuild`"
            ) from exc

    def _write(self, body: Callable[[lmdb.Transaction], T]) -> T:
        """Run ``body`` in one write transaction; grow the map and retry when full."""
        self._guard_fork()
        for _ in range(8):
            try:
                with self.env.begin(write=True) as txn:
                    return body(txn)
            except lmdb.MapFullError:
                self.env.set_mapsize(self.env.info()["map_size"] * 2)
            except lmdb.CorruptedError as exc:
                raise IndexCorruptError(
                    f"the study index at {self.path} is corrupt ({exc}): "
                    "run `studyvault index rebuild`"
                ) from exc
        raise StudyvaultError(f"the study index at {self.path} cannot grow any further")

    def _scan(
        self, db: str, prefix: bytes = b"", start: bytes | None = None, chunk: int = 512
    ) -> Iterator[tuple[bytes, bytes]]:
        """Yield (key, value) pairs whose key starts with ``prefix``, in key order,
        reading ``chunk`` rows per short read transaction."""
        position = start if start is not None else prefix
        first = True
        while True:
            rows: list[tuple[bytes, bytes]] = []
            with self._read() as txn:
                cursor = txn.cursor(db=self._db[db])
                if not cursor.set_range(position):
                    return
                if not first and cursor.key() == position:
                    if not cursor.next():
                        return
                for key, value in cursor:
                    if not bytes(key).startswith(prefix):
                        break
                    rows.append((bytes(key), bytes(value)))
                    if len(rows) >= chunk:
                        break
            yield from rows
            if len(rows) < chunk:
                return
            position = rows[-1][0]
            first = False

    # -- studies ------------------------------------------------------------------
    def get_study(self, study_uid: str) -> StudyRecord | None:
        with self._read() as txn:
            raw = txn.get(_k(study_uid), db=self._db["studies"])
        return None if raw is None else _study_decoder.decode(raw)

    def instances(self, study_uid: str) -> list[InstanceRecord]:
        prefix = _k(study_uid) + SEP
        return [_instance_decoder.decode(v) for _, v in self._scan("instances", prefix)]

    def study_of_sop(self, sop_uid: str) -> str | None:
        with self._read() as txn:
            raw = txn.get(_k(sop_uid), db=self._db["sops"])
        return None if raw is None else bytes(raw).decode("utf-8", "surrogateescape")

    def get_instance(self, study_uid: str, sop_uid: str) -> InstanceRecord | None:
        with self._read() as txn:
            raw = txn.get(_k(study_uid, sop_uid), db=self._db["instances"])
        return None if raw is None else _instance_decoder.decode(raw)

    def iter_studies(
        self,
        *,
        date_from: str | None = None,
        date_to: str | None = None,
        storage: str | None = None,
        include_undated: bool = True,
    ) -> Iterator[StudyRecord]:
        """Stream studies, oldest study date first (undated ones first of all); with only
        ``storage`` given, in UID order.

        :param date_from: first study date (YYYYMMDD) to include.
        :param date_to: last study date (YYYYMMDD) to include.
        :param storage: only studies with a copy in this storage id.
        :param include_undated: include studies without a valid study date.
        """
        if storage is not None and date_from is None and date_to is None:
            # no date limit: the storage's own key range is the short way
            for key, _ in self._scan("by_storage", _k(storage) + SEP):
                study = self.get_study(key.split(SEP, 1)[1].decode("utf-8", "surrogateescape"))
                if study is not None and _date_ok(study, date_from, date_to, include_undated):
                    yield study
            return
        start = None
        if date_from and not include_undated:
            start = date_from.encode()
        for key, _ in self._scan("by_date", b"", start=start):
            date = key[:8].decode()
            if date == NO_DATE and not include_undated:
                continue
            if date != NO_DATE and date_to and date > date_to:
                return
            if date != NO_DATE and date_from and date < date_from:
                continue
            study = self.get_study(key[9:].decode("utf-8", "surrogateescape"))
            if study is not None and (storage is None or storage in study.copies):
                yield study

    def scan_studies(self, decoder: msgspec.msgpack.Decoder[T]) -> Iterator[T]:
        """Every study record, in UID order, decoded with ``decoder`` -- typically of a
        Struct with a few of :class:`StudyRecord`'s fields, which makes a scan of the
        whole index about three times quicker than :meth:`iter_studies`."""
        for _, raw in self._scan("studies"):
            yield decoder.decode(raw)

    def count_storage(self, storage: str) -> tuple[int, int]:
        """(studies, bytes) with a copy in ``storage``."""
        count = size = 0
        for study in self.iter_studies(storage=storage):
            count += 1
            size += study.size
        return count, size

    def storage_study_uids(self, storage: str) -> Iterator[str]:
        """StudyInstanceUIDs of the studies with a copy in ``storage``, in UID order,
        from keys (no record is read)."""
        for key, _ in self._scan("by_storage", _k(storage) + SEP, chunk=4096):
            yield key.split(SEP, 1)[1].decode("utf-8", "surrogateescape")

    def count_storage_studies(self, storage: str) -> int:
        """Studies with a copy in ``storage``, counted from keys (no record is read)."""
        return sum(1 for _ in self._scan("by_storage", _k(storage) + SEP, chunk=4096))

    def count_studies(self) -> int:
        with self._read() as txn:
            return int(txn.stat(self._db["studies"])["entries"])

    def count_instances(self) -> int:
        with self._read() as txn:
            return int(txn.stat(self._db["instances"])["entries"])

    # -- writing ------------------------------------------------------------------
    def put_study(
        self,
        study: StudyRecord,
        instances: Iterable[InstanceRecord] = (),
        *,
        old: StudyRecord | None = None,
    ) -> None:
        """Write a study and some of its instances in one transaction."""
        items = list(instances)

        def body(txn: lmdb.Transaction) -> None:
            previous = old
            if previous is None:
                raw = txn.get(_k(study.study_uid), db=self._db["studies"])
                previous = None if raw is None else _study_decoder.decode(raw)
            self._put_study_txn(txn, study, previous)
            for inst in items:
                self._put_instance_txn(txn, inst)

        self._write(body)

    def apply(self, body: Callable[[IndexWriter], T]) -> T:
        """Run ``body`` with a writer inside one write transaction (group commit)."""
        return self._write(lambda txn: body(IndexWriter(self, txn)))

    def _put_study_txn(
        self, txn: lmdb.Transaction, study: StudyRecord, previous: StudyRecord | None
    ) -> None:
        db = self._db
        if previous is not None:
            txn.delete(study_date_key(previous), db=db["by_date"])
            txn.delete(_k(previous.patient_id, previous.study_uid), db=db["by_patient"])
            for storage in previous.copies:
                txn.delete(_k(storage, previous.study_uid), db=db["by_storage"])
        txn.put(_k(study.study_uid), _encoder.encode(study), db=db["studies"])
        txn.put(study_date_key(study), b"", db=db["by_date"])
        txn.put(_k(study.patient_id, study.study_uid), b"", db=db["by_patient"])
        for storage in study.copies:
            txn.put(_k(storage, study.study_uid), b"", db=db["by_storage"])

    def _put_instance_txn(self, txn: lmdb.Transaction, inst: InstanceRecord) -> None:
        txn.put(_k(inst.study_uid, inst.sop_uid), _encoder.encode(inst), db=self._db["instances"])
        txn.put(_k(inst.sop_uid), _k(inst.study_uid), db=self._db["sops"])

    def delete_study(self, study_uid: str) -> None:
        """Remove a study and all its instances from the index."""
        self._write(lambda txn: IndexWriter(self, txn).delete_study(study_uid))

    # -- journal ------------------------------------------------------------------
    def journal_put(self, entry: JournalEntry) -> None:
        self._write(
            lambda txn: txn.put(_k(entry.study_uid), _encoder.encode(entry), db=self._db["journal"])
        )

    def journal_get(self, study_uid: str) -> JournalEntry | None:
        with self._read() as txn:
            raw = txn.get(_k(study_uid), db=self._db["journal"])
        return None if raw is None else _journal_decoder.decode(raw)

    def journal_delete(self, study_uid: str) -> None:
        self._write(lambda txn: txn.delete(_k(study_uid), db=self._db["journal"]))

    def iter_journal(self) -> Iterator[JournalEntry]:
        for _, value in self._scan("journal"):
            yield _journal_decoder.decode(value)

    # -- task state ---------------------------------------------------------------
    def task_state(self, name: str) -> TaskState:
        with self._read() as txn:
            raw = txn.get(_k(name), db=self._db["task_state"])
        return TaskState() if raw is None else _task_decoder.decode(raw)

    def update_task_state(self, name: str, change: Callable[[TaskState], Any]) -> TaskState:
        """Read, change and write a task's state in one transaction."""

        def body(txn: lmdb.Transaction) -> TaskState:
            raw = txn.get(_k(name), db=self._db["task_state"])
            state = TaskState() if raw is None else _task_decoder.decode(raw)
            change(state)
            txn.put(_k(name), _encoder.encode(state), db=self._db["task_state"])
            return state

        return self._write(body)

    def delete_task_state(self, name: str) -> None:
        self._write(lambda txn: txn.delete(_k(name), db=self._db["task_state"]))


class IndexWriter:
    """Writes inside one transaction of :meth:`StudyIndex.apply`."""

    def __init__(self, index: StudyIndex, txn: lmdb.Transaction) -> None:
        self.index = index
        self.txn = txn
        self._db = index._db

    def get_study(self, study_uid: str) -> StudyRecord | None:
        raw = self.txn.get(_k(study_uid), db=self._db["studies"])
        return None if raw is None else _study_decoder.decode(raw)

    def get_instance(self, study_uid: str, sop_uid: str) -> InstanceRecord | None:
        raw = self.txn.get(_k(study_uid, sop_uid), db=self._db["instances"])
        return None if raw is None else _instance_decoder.decode(raw)

    def study_of_sop(self, sop_uid: str) -> str | None:
        raw = self.txn.get(_k(sop_uid), db=self._db["sops"])
        return None if raw is None else bytes(raw).decode("utf-8", "surrogateescape")

    def instances(self, study_uid: str) -> list[InstanceRecord]:
        prefix = _k(study_uid) + SEP
        cursor = self.txn.cursor(db=self._db["instances"])
        out = []
        if cursor.set_range(prefix):
            for key, value in cursor:
                if not bytes(key).startswith(prefix):
                    break
                out.append(_instance_decoder.decode(value))
        return out

    def put_study(self, study: StudyRecord, previous: StudyRecord | None) -> None:
        self.index._put_study_txn(self.txn, study, previous)

    def put_instance(self, inst: InstanceRecord) -> None:
        self.index._put_instance_txn(self.txn, inst)

    def delete_instance(self, study_uid: str, sop_uid: str) -> None:
        """Remove one instance record (the study's totals are the caller's to update)."""
        self.txn.delete(_k(study_uid, sop_uid), db=self._db["instances"])
        self.txn.delete(_k(sop_uid), db=self._db["sops"])

    def delete_study(self, study_uid: str) -> None:
        db = self._db
        previous = self.get_study(study_uid)
        if previous is not None:
            self.txn.delete(study_date_key(previous), db=db["by_date"])
            self.txn.delete(_k(previous.patient_id, study_uid), db=db["by_patient"])
            for storage in previous.copies:
                self.txn.delete(_k(storage, study_uid), db=db["by_storage"])
        for inst in self.instances(study_uid):
            self.txn.delete(_k(study_uid, inst.sop_uid), db=db["instances"])
            self.txn.delete(_k(inst.sop_uid), db=db["sops"])
        self.txn.delete(_k(study_uid), db=db["studies"])

    def journal_put(self, entry: JournalEntry) -> None:
        self.txn.put(_k(entry.study_uid), _encoder.encode(entry), db=self._db["journal"])

    def journal_delete(self, study_uid: str) -> None:
        self.txn.delete(_k(study_uid), db=self._db["journal"])


def _date_ok(
    study: StudyRecord, date_from: str | None, date_to: str | None, include_undated: bool
) -> bool:
    if len(study.study_date) != 8:
        return include_undated
    if date_from and study.study_date < date_from:
        return False
    return not (date_to and study.study_date > date_to)
