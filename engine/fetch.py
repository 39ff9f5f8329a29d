"""Fetching archived studies back online, and returning them when their time is up.

A fetch copies a study from its archive into an image directory through the safe
transfer protocol, keeping the archive's copy, and marks it *fetched until* a date
(``[fetch] keep_days`` from today). The date is also written beside the online copy
(``.studyvault-fetched.toml``) so an index rebuild keeps it.

A return removes the online copy when nothing was added while it was online (after
verifying the archive's copy once more); when instances were added (a report, a key
image), the merged study replaces the archive's copy through the protocol, keeping
the archive's naming and zip setting.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import time

import msgspec

from . import audit
from .errors import StudyvaultError, UnknownStudyError
from .index import IndexWriter
from .records import JournalEntry, StudyRecord
from .storage import OnlineStorage, Role, Storage
from .transfer import _finish, failpoint, transfer_study, verify_copy
from .vault import Vault

log = logging.getLogger(__name__)


class FetchResult(msgspec.Struct, kw_only=True):
    study_uid: str
    outcome: str  # fetched | already-online
    message: str
    fetched_until: str | None = None
    storage: str | None = None


class ReturnResult(msgspec.Struct, kw_only=True):
    study_uid: str
    outcome: str  # returned | merged | failed
    message: str


def _archive_copy(vault: Vault, study: StudyRecord) -> Storage | None:
    for sid in study.copies:
        storage = vault.storage_by_id(sid)
        if storage is not None and storage.role is Role.ARCHIVE:
            return storage
    return None


def _online_copy(vault: Vault, study: StudyRecord) -> OnlineStorage | None:
    for sid in study.copies:
        storage = vault.storage_by_id(sid)
        if isinstance(storage, OnlineStorage):
            return storage
    return None


def fetch_study(
    vault: Vault, study_uid: str, *, to: str | None = None, today: dt.date | None = None
) -> FetchResult:
    """Fetch one archived study into the image directory ``to`` (or the incoming one)."""
    study = vault.index.get_study(study_uid)
    if study is None:
        raise UnknownStudyError(f"no study with StudyInstanceUID {study_uid} in the index")
    online = _online_copy(vault, study)
    if online is not None:
        return FetchResult(
            study_uid=study_uid,
            outcome="already-online",
            message=f"{study_uid} is already online in {online.name}; nothing to fetch",
            storage=online.name,
        )
    archive = _archive_copy(vault, study)
    if archive is None:
        raise StudyvaultError(f"study {study_uid} has no copy in a known archive")
    destination = vault.image_directory(to)
    until = (
        (today or dt.date.today()) + dt.timedelta(days=vault.config.fetch.keep_days)
    ).isoformat()
    transfer_study(
        vault, study_uid, archive, destination, op="fetch", keep_source=True, fetched_until=until
    )
    return FetchResult(
        study_uid=study_uid,
        outcome="fetched",
        message=f"fetched {study_uid} from {archive.name} into {destination.name} until {until}",
        fetched_until=until,
        storage=destination.name,
    )


def due_studies(vault: Vault, today: dt.date | None = None) -> list[StudyRecord]:
    """Fetched studies whose return date has come."""
    day = (today or dt.date.today()).isoformat()
    return [
        s
        for s in vault.index.iter_studies()
        if s.fetched_from and s.fetched_until and s.fetched_until <= day
    ]


def return_study(vault: Vault, study: StudyRecord) -> ReturnResult:
    """Return one fetched study to its archive (see the module docstring)."""
    online = _online_copy(vault, study)
    archive = vault.storage_by_id(study.fetched_from or "")
    if online is None or archive is None:
        raise StudyvaultError(
            f"study {study.study_uid} is not a fetched study with a known archive"
        )
    instances = vault.index.instances(study.study_uid)
    added = [i for i in instances if archive.id not in i.paths]
    if added:
        transfer_study(vault, study.study_uid, online, archive, op="return")
        return ReturnResult(
            study_uid=study.study_uid,
            outcome="merged",
            message=f"returned {study.study_uid} to {archive.name} with {len(added)} new instances",
        )
    vault.require_online(archive)
    vault.require_online(online)
    location = study.copies[archive.id]
    # the archive's copy must still be whole before the online one goes
    verify_copy(archive, location, [(i, i.paths[archive.id]) for i in instances])
    entry = JournalEntry(
        op="return",
        study_uid=study.study_uid,
        source=online.id,
        source_location=study.copies[online.id],
        destination=archive.id,
        location=location,
        staging="",
        paths={i.sop_uid: i.paths[archive.id] for i in instances},
        source_paths={i.sop_uid: i.paths[online.id] for i in instances if online.id in i.paths},
        phase="committed",
        started=time.time(),
        pid=os.getpid(),
    )

    def body(writer: IndexWriter) -> None:
        previous = writer.get_study(study.study_uid)
        if previous is None:
            return
        writer.journal_put(entry)
        updated = msgspec.structs.replace(
            previous,
            copies={k: v for k, v in previous.copies.items() if k != online.id},
            fetched_from=None,
            fetched_until=None,
        )
        for inst in writer.instances(study.study_uid):
            inst.paths = {k: v for k, v in inst.paths.items() if k != online.id}
            writer.put_instance(inst)
        writer.put_study(updated, previous)

    vault.index.apply(body)
    failpoint("return-committed")
    _finish(vault, entry, None)
    after = vault.index.get_study(study.study_uid) or study
    audit.append(
        vault.config.data_dir / "audit.log",
        "return",
        after,
        source=online.name,
        destination=archive.name,
    )
    vault.plugins.notify("study_returned", study=after, source=online, destination=archive)
    return ReturnResult(
        study_uid=study.study_uid,
        outcome="returned",
        message=f"returned {study.study_uid} to {archive.name} (online copy removed)",
    )


def return_due(vault: Vault, today: dt.date | None = None) -> list[ReturnResult]:
    """Return every fetched study whose time is up; an error on one is reported and the
    others go on."""
    results = []
    for study in due_studies(vault, today):
        try:
            results.append(return_study(vault, study))
        except StudyvaultError as exc:
            log.error("cannot return study %s yet: %s", study.study_uid, exc)
            results.append(
                ReturnResult(study_uid=study.study_uid, outcome="failed", message=str(exc))
            )
    return results
