"""Taking new instances into an image directory and the index (import and receive).

Files are written durably first; the index is committed in groups (many instances
per write transaction) after the folders are fsynced, so an indexed instance always
has its file on disk. An instance already stored with the same bytes is a duplicate
and adds nothing; the same SOPInstanceUID with different bytes is a conflict,
reported and never overwritten.
"""

from __future__ import annotations

import enum
import hashlib
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import IO

import msgspec

from .index import StudyIndex
from .manager import PluginHost
from .records import (
    InstanceHeader,
    InstanceRecord,
    StudyRecord,
    count_instance,
    header_to_instance,
    header_to_study,
)
from .storage import OnlineStorage


class Outcome(enum.Enum):
    STORED = "stored"
    DUPLICATE = "duplicate"
    CONFLICT = "conflict"


class Ingestor:
    """Stores instances into one image directory and indexes them in groups.

    :param index: the study index.
    :param storage: the image directory that receives the instances.
    :param plugins: for the ``study_received`` event after each commit.
    :param source: ``"import"`` or ``"network:<AE>"``, passed to the event hook.
    :param batch: commit after this many stored instances…
    :param seconds: …or when the oldest uncommitted one is this old.
    :param pipelined: overlap each group's fsyncs with storing the next group (bulk
        import); call :meth:`drain` at the end.
    """

    def __init__(
        self,
        index: StudyIndex,
        storage: OnlineStorage,
        plugins: PluginHost | None,
        source: str,
        *,
        batch: int = 500,
        seconds: float = 1.0,
        pipelined: bool = False,
    ) -> None:
        self.index = index
        self.storage = storage
        self.plugins = plugins
        self.source = source
        self.batch = batch
        self.seconds = seconds
        self._pending: list[tuple[InstanceHeader, InstanceRecord, str, str]] = []
        self._pending_sops: dict[str, str] = {}  # sop uid -> sha256, not yet committed
        self._first_pending = 0.0
        self.pipelined = pipelined
        self._inflight: (
            tuple[Future[None], list[tuple[InstanceHeader, InstanceRecord, str, str]]] | None
        ) = None

    def add(
        self,
        header: InstanceHeader,
        src: IO[bytes] | bytes,
        *,
        digest_of: Callable[[], str] | None = None,
        source: str | None = None,
    ) -> tuple[Outcome, str]:
        """Store one instance unless it is a duplicate or a conflict.

        :param header: the instance's header, already read.
        :param src: the instance's bytes (or an open file positioned at 0).
        :param digest_of: computes the SHA-256 of ``src`` without consuming it (used only
            when the instance is already known); default hashes ``src`` itself.
        :param source: this instance's source for the ``study_received`` event, when it
            differs from the ingestor's (a receiver serving several devices).
        :returns: the outcome and, for duplicates and conflicts, a reason.
        """
        verdict = self.verdict(header, digest_of or (lambda: _digest(src)))
        if verdict is not None:
            return verdict
        location, path, size, digest = self.storage.ingest(header.study_uid, header.sop_uid, src)
        self.stored(header, location, path, size, digest, source=source)
        return Outcome.STORED, ""

    def verdict(
        self, header: InstanceHeader, digest_of: Callable[[], str]
    ) -> tuple[Outcome, str] | None:
        """The outcome for an instance whose SOPInstanceUID is already stored (or waits
        for a commit): a duplicate, or a conflict with the reason; None for a new one,
        which the caller then stores and hands to :meth:`stored`.

        :param digest_of: the SHA-256 of the instance's bytes, computed only when needed.
        """
        known = self._pending_sops.get(header.sop_uid)
        known_study = header.study_uid if known is not None else None
        if known is None:
            known_study = self.index.study_of_sop(header.sop_uid)
            if known_study is not None:
                record = self.index.get_instance(known_study, header.sop_uid)
                known = record.sha256 if record else None
        if known is None:
            return None
        if known_study != header.study_uid:
            return Outcome.CONFLICT, (
                f"SOPInstanceUID {header.sop_uid} is already stored in study {known_study}"
            )
        if digest_of() == known:
            return Outcome.DUPLICATE, "already stored"
        return Outcome.CONFLICT, (
            f"SOPInstanceUID {header.sop_uid} is already stored with different content"
        )

    def stored(
        self,
        header: InstanceHeader,
        location: str,
        path: str,
        size: int,
        digest: str,
        *,
        source: str | None = None,
    ) -> None:
        """Queue an instance the storage has just ingested for the next commit (and
        commit when the group is full or old enough)."""
        record = header_to_instance(header, size=size, sha256=digest, received=time.time())
        record.paths = {self.storage.id: path}
        self._queue(header, record, location, source)
        if (
            len(self._pending) >= self.batch
            or time.monotonic() - self._first_pending > self.seconds
        ):
            self.commit()

    def adopt(
        self,
        header: InstanceHeader,
        *,
        location: str,
        path: str,
        size: int,
        sha256: str,
        source: str | None = None,
    ) -> None:
        """Index, at the next commit, an instance whose file is already in place in the
        storage (a received file whose group commit a crash prevented). The caller has
        checked that the index does not know the instance.

        :param location: the study's location in the storage.
        :param path: the file's path within ``location``.
        """
        record = header_to_instance(header, size=size, sha256=sha256, received=time.time())
        record.paths = {self.storage.id: path}
        self._queue(header, record, location, source)

    def _queue(
        self, header: InstanceHeader, record: InstanceRecord, location: str, source: str | None
    ) -> None:
        if not self._pending:
            self._first_pending = time.monotonic()
        self._pending.append((header, record, location, source or self.source))
        self._pending_sops[header.sop_uid] = record.sha256

    def commit(self) -> list[StudyRecord]:
        """Make the stored files durable, then index them in one transaction.

        Pipelined, the files' fsyncs run in the background while the caller stores the
        next group; this group is indexed at the next :meth:`commit` or :meth:`drain`,
        and only once its files are durable.
        """
        if not self.pipelined:
            if not self._pending:
                return []
            self.storage.flush()
            pending, self._pending = self._pending, []
            return self._index(pending)
        committed = self.drain()
        if self._pending:
            pending, self._pending = self._pending, []
            self._inflight = (self.storage.flush_async(), pending)
        return committed

    def drain(self) -> list[StudyRecord]:
        """Wait for the group being made durable in the background, then index it."""
        if self._inflight is None:
            return []
        future, pending = self._inflight
        self._inflight = None
        future.result()
        return self._index(pending)

    def _index(
        self, pending: list[tuple[InstanceHeader, InstanceRecord, str, str]]
    ) -> list[StudyRecord]:
        for header, record, _, _ in pending:
            if self._pending_sops.get(header.sop_uid) == record.sha256:
                del self._pending_sops[header.sop_uid]
        storage_id = self.storage.id
        sources: dict[str, str] = {}  # study uid -> source of its first instance in the batch

        def body(writer: object) -> list[StudyRecord]:
            from .index import IndexWriter

            assert isinstance(writer, IndexWriter)
            studies: dict[str, tuple[StudyRecord, StudyRecord | None]] = {}
            for header, record, location, source in pending:
                sources.setdefault(header.study_uid, source)
                if header.study_uid not in studies:
                    previous = writer.get_study(header.study_uid)
                    current = (
                        msgspec.structs.replace(
                            previous,
                            copies=dict(previous.copies),
                            modalities=list(previous.modalities),
                        )
                        if previous is not None
                        else header_to_study(header)
                    )
                    studies[header.study_uid] = (current, previous)
                study = studies[header.study_uid][0]
                _fill_missing(study, header)
                study.copies[storage_id] = location
                count_instance(study, record)
                writer.put_instance(record)
            for study, previous in studies.values():
                writer.put_study(study, previous)
            return [study for study, _ in studies.values()]

        committed = self.index.apply(body)
        if self.plugins is not None:
            for study in committed:
                self.plugins.notify(
                    "study_received",
                    study=study,
                    storage=self.storage,
                    source=sources.get(study.study_uid, self.source),
                )
        return committed


def _fill_missing(study: StudyRecord, header: InstanceHeader) -> None:
    """Take study attributes from a later instance when the first one lacked them."""
    for field in (
        "patient_name",
        "patient_id",
        "patient_birth_date",
        "patient_sex",
        "study_date",
        "study_time",
        "study_id",
        "study_description",
        "accession_number",
        "specific_character_set",
    ):
        if not getattr(study, field) and getattr(header, field):
            setattr(study, field, getattr(header, field))


def _digest(src: IO[bytes] | bytes) -> str:
    if isinstance(src, bytes | bytearray | memoryview):
        return hashlib.sha256(src).hexdigest()
    position = src.tell()
    digest = hashlib.sha256()
    while chunk := src.read(1 << 20):
        digest.update(chunk)
    src.seek(position)
    return digest.hexdigest()
