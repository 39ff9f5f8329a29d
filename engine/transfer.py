"""The safe study transfer protocol, used by every action and by fetch and return.

Invariant: at every instant every instance has at least one complete, verified
copy, and the index points at a complete copy. The steps, each durable before the
next starts:

1. journal the intent (study, source, destination, planned location and staging);
2. the destination writes the study into staging (same filesystem) and fsyncs it;
3. every staged file is read back and checked against the SHA-256 recorded in the
   index; journal phase ``verified``;
4. the destination publishes the staging atomically;
5. the index (new location) and the journal phase ``committed`` in one transaction;
6. the source copy is removed (unless kept), then the journal entry.

:func:`replay_journal` finishes whatever a killed run left: unverified staging is
discarded (the study is still whole in its source), verified work is published and
committed, committed work has its source removed.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable

import msgspec

from . import audit
from .errors import IntegrityError, StorageError, StudyvaultError, UnknownStudyError
from .fsutil import sha256_stream
from .index import IndexWriter
from .records import InstanceRecord, JournalEntry, StudyRecord
from .storage import OnlineStorage, Opener, Storage, StorePlan
from .vault import Vault

log = logging.getLogger(__name__)

FAILPOINT_ENV = "STUDYVAULT_FAILPOINT"
FETCH_NOTE = "studyvault-fetched.toml"

#: event hook called after the commit of each operation
_EVENTS = {
    "archive": "study_archived",
    "move": "study_moved",
    "move-out": "study_moved",
    "fetch": "study_fetched",
    "return": "study_returned",
}


def failpoint(name: str) -> None:
    """Crash tests kill the process here when ``STUDYVAULT_FAILPOINT`` names this point
    (``name`` or ``name:N`` for the N-th time it is reached)."""
    wanted = os.environ.get(FAILPOINT_ENV)
    if not wanted:
        return
    point, _, count = wanted.partition(":")
    if point != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] >= int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)


_hits: dict[str, int] = {}


def _alive(pid: int) -> bool:
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _opener_for(vault: Vault, study: StudyRecord, inst: InstanceRecord, prefer: Storage) -> Opener:
    """Open an instance from ``prefer`` if it has it, else from any storage that does
    (a merge of a returning study with its archived copy)."""
    candidates = [prefer.id] + [sid for sid in inst.paths if sid != prefer.id]
    for sid in candidates:
        if sid in inst.paths and sid in study.copies:
            storage = vault.storage_by_id(sid)
            if storage is not None:
                location, path = study.copies[sid], inst.paths[sid]
                return lambda: storage.open_file(location, path)
    raise StorageError(f"instance {inst.sop_uid} of study {study.study_uid} has no readable copy")


def verify_copy(storage: Storage, location: str, items: list[tuple[InstanceRecord, str]]) -> None:
    """Read every file back and compare it with its recorded SHA-256."""
    for inst, path in items:
        try:
            with storage.open_file(location, path) as f:
                digest = sha256_stream(f)
        except OSError as exc:
            raise IntegrityError(
                f"{storage.name}: {location}/{path} (instance {inst.sop_uid}) cannot be read: "
                f"{exc.strerror or exc}"
            ) from exc
        if digest != inst.sha256:
            raise IntegrityError(
                f"{storage.name}: {location}/{path} (instance {inst.sop_uid}) does not match "
                "its recorded SHA-256"
            )


def verify_staged(storage: Storage, plan: StorePlan, instances: list[InstanceRecord]) -> None:
    """Step 3: check the staged copy against the recorded SHA-256 of every instance,
    reading back each one the storage did not verify itself while writing it."""
    vouched = storage.verified_on_write(plan, instances)
    verify_copy(
        storage,
        plan.staging,
        [(i, plan.paths[i.sop_uid]) for i in instances if i.sop_uid not in vouched],
    )


def transfer_study(
    vault: Vault,
    study_uid: str,
    source: Storage,
    destination: Storage,
    *,
    op: str,
    keep_source: bool = False,
    keep_in_list: bool = True,
    fetched_until: str | None = None,
    task: str | None = None,
) -> StudyRecord | None:
    """Copy (``keep_source``) or move a study from ``source`` to ``destination``.

    :returns: the study's record after the commit (None once moved out of the list).
    :raises StorageFullError: the destination would drop below its reserve; nothing
        was written.
    :raises IntegrityError: the staged copy did not match; it was discarded.
    """
    index = vault.index
    pending = index.journal_get(study_uid)
    if pending is not None:
        if _alive(pending.pid):
            raise StudyvaultError(
                f"study {study_uid} is being {pending.op}d by process {pending.pid}"
            )
        replay_entry(vault, pending)
    study = index.get_study(study_uid)
    if study is None:
        raise UnknownStudyError(f"no study with StudyInstanceUID {study_uid} in the index")
    if source.id not in study.copies:
        raise StudyvaultError(f"study {study_uid} has no copy in {source.name}")
    vault.require_online(source)
    vault.require_online(destination)
    instances = index.instances(study_uid)
    destination.check_room(study.size)
    plan = destination.plan_store(study, instances)
    entry = JournalEntry(
        op=op,
        study_uid=study_uid,
        source=source.id,
        source_location=study.copies[source.id],
        destination=destination.id,
        location=plan.location,
        staging=plan.staging,
        paths=plan.paths,
        source_paths={i.sop_uid: i.paths[source.id] for i in instances if source.id in i.paths},
        started=time.time(),
        pid=os.getpid(),
        task=task,
        keep_source=keep_source,
        keep_in_list=keep_in_list,
        fetched_until=fetched_until,
    )
    index.journal_put(entry)
    failpoint("journaled")
    try:
        destination.write_staging(
            plan, study, [(i, _opener_for(vault, study, i, source)) for i in instances]
        )
        failpoint("staged")
        verify_staged(destination, plan, instances)
    except BaseException:
        # the study is still whole in its source; throw the attempt away
        destination.discard_staging(plan)
        index.journal_delete(study_uid)
        raise
    entry.phase = "verified"
    index.journal_put(entry)
    failpoint("verified")
    return _finish(vault, entry, study)


def _plan(entry: JournalEntry) -> StorePlan:
    assert entry.location is not None and entry.staging is not None
    return StorePlan(location=entry.location, staging=entry.staging, paths=entry.paths)


def _finish(vault: Vault, entry: JournalEntry, before: StudyRecord | None) -> StudyRecord | None:
    """Publish, commit and clean up a verified transfer."""
    source = _storage(vault, entry.source)
    destination = _storage(vault, entry.destination or "")
    plan = _plan(entry)
    if entry.phase == "verified":
        vault.require_online(destination)
        destination.publish(plan)
        failpoint("published")
        if not entry.keep_in_list:
            destination.mark_moved_out(plan.location)
        if entry.op == "fetch" and isinstance(destination, OnlineStorage):
            # beside the files, so an index rebuild still knows when it goes back
            destination.write_note(
                plan.location,
                FETCH_NOTE,
                f'archive_id = "{entry.source}"\nuntil = "{entry.fetched_until}"\n',
            )
        after = _commit(vault, entry)
        failpoint("committed")
    else:
        after = vault.index.get_study(entry.study_uid)
    if not entry.keep_source:
        vault.require_online(source)  # an unreachable source would look already removed
        # the verified copy in the destination is committed in the index (phase committed)
        remove_source_copy(source, entry)
        failpoint("removed")
    vault.index.journal_delete(entry.study_uid)
    if before is not None:
        _report(vault, entry, before if after is None else after, source, destination)
    return after


def remove_source_copy(source: Storage, entry: JournalEntry) -> None:
    """Remove what was transferred from the source. An image directory keeps any
    instance that arrived while the study was being moved (the receiver may have
    acknowledged it already); it stays indexed there and moves with the next run."""
    if isinstance(source, OnlineStorage):
        source.remove_instances(entry.source_location, sorted(set(entry.source_paths.values())))
    else:
        source.remove_study(entry.source_location)


def _commit(vault: Vault, entry: JournalEntry) -> StudyRecord | None:
    """Point the index at the new copy and mark the journal committed, in one transaction."""
    dest_id = entry.destination or ""

    def body(writer: IndexWriter) -> StudyRecord | None:
        previous = writer.get_study(entry.study_uid)
        entry.phase = "committed"
        writer.journal_put(entry)
        if previous is None:
            return None
        if not entry.keep_in_list and not any(
            i.sop_uid not in entry.paths for i in writer.instances(entry.study_uid)
        ):
            writer.delete_study(entry.study_uid)
            return None
        study = msgspec.structs.replace(previous, copies=dict(previous.copies))
        study.copies[dest_id] = entry.location or ""
        instances = writer.instances(entry.study_uid)
        # an instance received after the transfer was planned is not in the destination
        late = [i for i in instances if i.sop_uid not in entry.paths]
        if not entry.keep_source and not any(entry.source in i.paths for i in late):
            study.copies.pop(entry.source, None)
        if entry.op == "fetch":
            study.fetched_from, study.fetched_until = entry.source, entry.fetched_until
        elif entry.op == "return":
            study.fetched_from = study.fetched_until = None
        for inst in instances:
            if inst.sop_uid not in entry.paths:
                continue
            paths = dict(inst.paths)
            if not entry.keep_source:
                paths.pop(entry.source, None)
            paths[dest_id] = entry.paths[inst.sop_uid]
            inst.paths = paths
            writer.put_instance(inst)
        writer.put_study(study, previous)
        return study

    return vault.index.apply(body)


def _storage(vault: Vault, storage_id: str) -> Storage:
    storage = vault.storage_by_id(storage_id)
    if storage is None:
        raise StorageError(f"storage {storage_id} is not in the config")
    return storage


def _report(
    vault: Vault, entry: JournalEntry, study: StudyRecord, source: Storage, destination: Storage
) -> None:
    audit.append(
        vault.config.data_dir / "audit.log",
        entry.op,
        study,
        source=source.name,
        destination=destination.name,
        task=entry.task,
    )
    event = _EVENTS.get(entry.op)
    if event in ("study_archived", "study_moved"):
        vault.plugins.notify(
            event, study=study, source=source, destination=destination, task=entry.task
        )
    elif event is not None:
        vault.plugins.notify(event, study=study, source=source, destination=destination)


def delete_study(
    vault: Vault, study_uid: str, storage: Storage, *, task: str | None = None
) -> None:
    """Delete a study's copy in ``storage``; the last copy takes the study out of the
    index. The audit line is written first; a confirmed delete is the one path that
    removes files without a copy elsewhere."""
    index = vault.index
    study = index.get_study(study_uid)
    if study is None or storage.id not in study.copies:
        raise UnknownStudyError(f"no study {study_uid} in {storage.name}")
    vault.require_online(storage)
    audit.append(
        vault.config.data_dir / "audit.log", "delete", study, source=storage.name, task=task
    )
    entry = JournalEntry(
        op="delete",
        study_uid=study_uid,
        source=storage.id,
        source_location=study.copies[storage.id],
        phase="committed",
        started=time.time(),
        pid=os.getpid(),
        task=task,
    )

    def body(writer: IndexWriter) -> None:
        instances = writer.instances(study_uid)
        entry.source_paths = {
            i.sop_uid: i.paths[storage.id] for i in instances if storage.id in i.paths
        }
        writer.journal_put(entry)
        remaining = {sid: loc for sid, loc in study.copies.items() if sid != storage.id}
        if not remaining:
            writer.delete_study(study_uid)
            return
        updated = msgspec.structs.replace(study, copies=remaining)
        for inst in instances:
            inst.paths = {sid: p for sid, p in inst.paths.items() if sid != storage.id}
            writer.put_instance(inst)
        writer.put_study(updated, study)

    index.apply(body)
    failpoint("delete-committed")
    # the user confirmed this delete (typed DELETE); the index no longer points here
    remove_source_copy(storage, entry)
    index.journal_delete(study_uid)
    vault.plugins.notify("study_deleted", study=study, storage=storage, task=task)


def replay_entry(vault: Vault, entry: JournalEntry) -> str:
    """Finish or undo one journaled operation; returns what was done."""
    if entry.op == "delete":
        # the index already forgot the study; finish removing its files
        source = _storage(vault, entry.source)
        vault.require_online(source)
        remove_source_copy(source, entry)
        vault.index.journal_delete(entry.study_uid)
        return "finished delete"
    destination = _storage(vault, entry.destination or "")
    if entry.phase == "started":
        destination.discard_staging(_plan(entry))
        vault.index.journal_delete(entry.study_uid)
        return "discarded unverified staging"
    _finish(vault, entry, None)
    return f"finished {entry.op} ({entry.phase})"


def replay_journal(vault: Vault, report: Callable[[JournalEntry, str], None] | None = None) -> int:
    """Replay every journal entry left by a process that is gone; return how many."""
    done = 0
    for entry in list(vault.index.iter_journal()):
        if _alive(entry.pid):
            continue
        try:
            outcome = replay_entry(vault, entry)
        except StudyvaultError as exc:
            log.warning("cannot resume %s of study %s yet: %s", entry.op, entry.study_uid, exc)
            continue
        log.info("resumed %s of study %s: %s", entry.op, entry.study_uid, outcome)
        if report is not None:
            report(entry, outcome)
        done += 1
    return done
