"""``study forget``: accept that stored copies are lost, and drop them from the index.

When a disk died without a backup (or a backup was older than some studies),
``check`` reports ``missing-study`` and nothing can repair it. Forgetting is the
explicit, confirmed and audited way out: each copy the index lists in a storage
whose study folder (or zip) is not there is dropped from the index. A study with a
copy elsewhere (an archive) stays, with that copy; a study with no copy left leaves
the index. No file is ever touched, and only a copy in an Online storage is judged
missing: an Offline or unmounted storage's disk may just not be mounted.

Every forgotten copy writes one audit line (op ``forget``) before the index changes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import msgspec

from . import audit
from .errors import StorageOfflineError, StudyvaultError, UnknownStudyError
from .index import IndexWriter
from .integrity import listing
from .records import StudyRecord, count_instance
from .storage import Status, Storage
from .vault import Vault


class ForgetItem(msgspec.Struct, kw_only=True):
    """One missing copy: planned, then forgotten or skipped."""

    study_uid: str
    storage: str  # name
    storage_id: str
    location: str
    patient_name: str = ""
    patient_id: str = ""
    study_date: str = ""
    instances: int = 0  # the study's instances when it was checked
    #: planned | forgotten (other copies stay) | study-forgotten (no copy left: the
    #: study left the index) | skipped
    outcome: str = "planned"
    remaining: list[str] = []  # storages that still hold a copy
    lost_instances: int = 0  # instances that were in no other copy
    reason: str = ""  # why it was skipped

    def describe(self) -> str:
        who = self.patient_name.replace("^", " ") or "-"
        pid = f", {self.patient_id}" if self.patient_id else ""
        return (
            f"study {self.study_uid} ({who}{pid}, {self.study_date or 'no date'}, "
            f"{self.instances} instances) in {self.storage}"
        )

    def line(self) -> str:
        gone = f"its copy at {self.location} is gone"
        if self.outcome == "study-forgotten":
            return f"Forgot {self.describe()}: {gone}; no copy is left, it left the index."
        if self.outcome == "forgotten":
            lost = (
                f"; {self.lost_instances} instances that only it held are lost"
                if self.lost_instances
                else ""
            )
            return (
                f"Forgot the copy of {self.describe()}: {gone}; the study stays in "
                f"{', '.join(self.remaining)}{lost}."
            )
        if self.outcome == "skipped":
            return f"Skipped {self.describe()}: {self.reason}"
        return f"Missing: {self.describe()}: {gone}."


class ForgetReport(msgspec.Struct, kw_only=True):
    checked: int  # copies looked at
    items: list[ForgetItem]  # the missing ones
    forgotten: int = 0  # copies dropped from the index
    studies_forgotten: int = 0  # of which studies that left the index
    skipped: int = 0


def copy_is_missing(storage: Storage, location: str) -> bool:
    """Tell whether the study at ``location`` is gone from ``storage`` (an Online one).

    A folder storage's copy is missing only when nothing is at its path: a folder that
    cannot be read (permissions, a failing disk) is not missing. A storage reached by
    URL lists the copy; it is missing when the listing fails or finds no file.

    :raises StorageOfflineError: when the storage cannot be reached.
    """
    if not storage.url_scheme:
        return not os.path.lexists(storage.root / location)
    try:
        files = listing(storage, location)
    except StorageOfflineError:
        raise
    except OSError:
        return True
    return not files


def _require_online(storage: Storage) -> None:
    status = storage.status()
    if status is not Status.ONLINE:
        raise StudyvaultError(
            f"{storage.name} is {status.value.lower()}: its studies are not known to be lost "
            f"(its disk may just be unmounted or unreachable); nothing was forgotten. Mount "
            f"it again; for a dead disk replaced by an empty one, first "
            f'`studyvault image-dirs mount NEW_FOLDER --name "{storage.name}"`'
        )


def plan_forget(
    vault: Vault, study_uids: Sequence[str] = (), *, storage: str | None = None
) -> ForgetReport:
    """Find the missing copies to forget: of the named studies (in ``storage`` only,
    if given), or of every study in ``storage``. Changes nothing.

    :raises StudyvaultError: for no study and no storage, an Offline storage, an
        unknown study, or a named study with no missing copy (nothing is forgotten).
    """
    if not study_uids and storage is None:
        raise StudyvaultError(
            "name the studies (StudyInstanceUIDs) or --storage NAME whose missing copies to forget"
        )
    only = vault.storage(storage) if storage is not None else None
    if only is not None:
        _require_online(only)
    status: dict[str, Status] = {}

    def online(s: Storage) -> bool:
        if s.id not in status:
            status[s.id] = s.status()
        return status[s.id] is Status.ONLINE

    studies: Iterable[StudyRecord]
    if study_uids:
        named = []
        for uid in dict.fromkeys(study_uids):
            study = vault.index.get_study(uid)
            if study is None:
                raise UnknownStudyError(f"no study with StudyInstanceUID {uid} in the index")
            if only is not None and only.id not in study.copies:
                raise StudyvaultError(f"study {uid} has no copy in {only.name}")
            named.append(study)
        studies = named
    else:
        assert only is not None
        studies = _studies_in(vault, only.id)
    report = ForgetReport(checked=0, items=[])
    for study in studies:
        found: list[ForgetItem] = []
        unchecked: list[str] = []
        for sid, location in study.copies.items():
            where = vault.storage_by_id(sid)
            if where is None or (only is not None and sid != only.id):
                continue  # a storage not in the config is check's unknown-storage
            if not online(where):
                unchecked.append(where.name)
                continue
            report.checked += 1
            if copy_is_missing(where, location):
                found.append(_item(study, where, location))
        if study_uids and not found:
            offline = f" ({', '.join(unchecked)} offline: not checked)" if unchecked else ""
            raise StudyvaultError(
                f"study {study.study_uid}: no copy of it is missing{offline}; nothing was "
                "forgotten (forget drops only copies whose files are gone; a delete task "
                "deletes studies)"
            )
        pending = vault.index.journal_get(study.study_uid) if found else None
        if pending is not None:
            why = f"its {pending.op} is not finished: run `studyvault check --repair` first"
            if study_uids:
                raise StudyvaultError(f"study {study.study_uid}: {why}")
            for item in found:
                item.outcome, item.reason = "skipped", why
        report.items.extend(found)
    return report


def _studies_in(vault: Vault, storage_id: str) -> Iterator[StudyRecord]:
    for uid in vault.index.storage_study_uids(storage_id):
        study = vault.index.get_study(uid)
        if study is not None:
            yield study


def _item(study: StudyRecord, storage: Storage, location: str) -> ForgetItem:
    return ForgetItem(
        study_uid=study.study_uid,
        storage=storage.name,
        storage_id=storage.id,
        location=location,
        patient_name=study.patient_name,
        patient_id=study.patient_id,
        study_date=study.study_date,
        instances=study.instance_count,
    )


def forget(
    vault: Vault, plan: ForgetReport, *, report: Callable[[ForgetItem], None] | None = None
) -> ForgetReport:
    """Drop the planned missing copies from the index, each after its audit line. A
    copy that changed since the plan (moved, back on disk, in a transfer) is skipped.

    :param report: called with each item once it is forgotten or skipped.
    """
    log = vault.config.data_dir / "audit.log"
    for item in plan.items:
        if item.outcome == "planned":
            _forget_one(vault, item, log)
        if item.outcome == "skipped":
            plan.skipped += 1
        else:
            plan.forgotten += 1
            plan.studies_forgotten += item.outcome == "study-forgotten"
        if report is not None:
            report(item)
    return plan


def _forget_one(vault: Vault, item: ForgetItem, log: Path) -> None:
    index = vault.index
    storage = vault.storage_by_id(item.storage_id)
    study = index.get_study(item.study_uid)
    if (
        storage is None
        or study is None
        or study.copies.get(item.storage_id) != item.location
        or index.journal_get(item.study_uid) is not None
        or not copy_is_missing(storage, item.location)
    ):
        item.outcome = "skipped"
        item.reason = "it changed since it was checked (run forget again to look anew)"
        return
    item.remaining = [vault.storage_name(s) for s in study.copies if s != item.storage_id]
    kept = f"kept in {', '.join(item.remaining)}" if item.remaining else "no copy left"
    audit.append(
        log,
        "forget",
        study,
        source=storage.name,
        detail=f"copy at {item.location} missing, forgotten; {kept}",
    )
    # nothing on disk changes: the copy is already gone, the index stops listing it
    outcome = index.apply(lambda writer: _drop_copy(writer, item))
    if outcome is None:
        item.outcome = "skipped"
        item.reason = "it changed while it was being forgotten (run forget again)"


def _drop_copy(writer: IndexWriter, item: ForgetItem) -> str | None:
    current = writer.get_study(item.study_uid)
    if current is None or current.copies.get(item.storage_id) != item.location:
        return None
    sid = item.storage_id
    item.lost_instances = 0  # the transaction may run again (a map that had to grow)
    remaining = {k: v for k, v in current.copies.items() if k != sid}
    if not remaining:
        writer.delete_study(item.study_uid)
        item.outcome = "study-forgotten"
        return item.outcome
    updated = msgspec.structs.replace(current, copies=remaining)
    if current.fetched_from is not None:
        # the fetched online copy or the archive copy it returns to is gone: what is
        # left is an ordinary copy (an archive task archives it again when due)
        updated.fetched_from = updated.fetched_until = None
    kept = []
    for inst in writer.instances(item.study_uid):
        if sid in inst.paths:
            inst.paths = {k: p for k, p in inst.paths.items() if k != sid}
            if not inst.paths:
                writer.delete_instance(item.study_uid, inst.sop_uid)
                item.lost_instances += 1
                continue
            writer.put_instance(inst)
        kept.append(inst)
    if item.lost_instances:
        updated.instance_count, updated.size, updated.last_received = 0, 0, 0.0
        updated.modalities = []
        for inst in kept:
            count_instance(updated, inst)
    writer.put_study(updated, current)
    item.outcome = "forgotten"
    return item.outcome
