"""``check``: the index and the storages agree, and ``--repair`` fixes what is safe.

See :data:`PROBLEM_KINDS` for what is looked for. Check lists every study's files but
hashes nothing (:mod:`studyvault.integrity` does). Every repair writes an audit line.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import msgspec

from . import audit
from .errors import StudyvaultError
from .integrity import Progress, listing
from .records import InstanceRecord, StudyRecord
from .scan import add_study, read_study
from .storage import Status, Storage, StorePlan
from .transfer import _alive, replay_entry
from .vault import Vault

#: What :func:`check` looks for, and whether ``--repair`` may fix it.
PROBLEM_KINDS = {
    "stuck-journal": "an operation whose process is gone left a journal entry (repair: "
    "finish or undo it, as a task run would)",
    "orphan-staging": "a staging folder no journal entry refers to (repair: remove it; a "
    "copy moved aside by a publish is left for you)",
    "unindexed-study": "a study folder or zip the index does not list (repair: index it)",
    "unindexed-files": "files in an indexed study the index does not list (repair: index "
    "the DICOM instances of that study among them)",
    "missing-files": "indexed instance files that are not there (not repaired)",
    "missing-study": "an indexed study folder or zip that is not there (not repaired: "
    "restore it, or accept that it is lost with `studyvault study forget`)",
    "unknown-storage": "the index lists a copy in a storage the config does not have "
    "(not repaired)",
    "storage-offline": "a storage that cannot be read now, so it was not checked",
}


class Problem(msgspec.Struct, kw_only=True):
    """One disagreement between the index and the disk."""

    kind: str  # a key of PROBLEM_KINDS
    detail: str
    storage: str = ""
    study_uid: str = ""
    location: str = ""
    paths: list[str] = []
    repairable: bool = False
    repaired: bool = False
    action: str = ""  # what --repair did, or why it did not

    def line(self) -> str:
        where = f"{self.storage}: " if self.storage else ""
        study = f"study {self.study_uid}: " if self.study_uid else ""
        return f"{self.kind}: {where}{study}{self.detail}"


class CheckReport(msgspec.Struct, kw_only=True):
    ok: bool  # nothing is left wrong
    seconds: float
    studies: int  # indexed studies looked at
    repaired: int
    remaining: int
    problems: list[Problem]
    notes: list[str]


def _recent(storage: Storage, location: str, path: str | None, seconds: float) -> bool:
    """Tell whether a study folder (or a file in it) changed in the last ``seconds``: it
    may be receiving instances that are about to be indexed."""
    target = storage.root / location / path if path else storage.root / location
    try:
        return time.time() - os.stat(target).st_mtime < seconds
    except OSError:
        return False  # not a local file (a zip member): stored studies do not change


class _Checker:
    """One run of :func:`check`."""

    def __init__(self, vault: Vault, repair: bool, report: Callable[[Problem], None] | None):
        self.vault = vault
        self.index = vault.index
        self.repair = repair
        self.report = report
        self.stable = vault.config.studyvault.stable_age_minutes * 60
        self.problems: list[Problem] = []
        self.notes: list[str] = []

    def found(self, problem: Problem) -> Problem:
        self.problems.append(problem)
        return problem

    def fixed(self, problem: Problem, action: str, study: StudyRecord | None = None) -> None:
        """Record a repair, with its audit line."""
        problem.repaired, problem.action = True, action
        audit.append(
            self.vault.config.data_dir / "audit.log",
            "repair",
            study or StudyRecord(study_uid=problem.study_uid),
            source=problem.storage,
            detail=f"{problem.kind}: {action}",
        )
        if self.report is not None:
            self.report(problem)

    def not_fixed(self, problem: Problem, why: str) -> None:
        problem.action = why
        if self.report is not None:
            self.report(problem)

    # -- the journal --------------------------------------------------------------------
    def journal(self) -> None:
        for entry in list(self.index.iter_journal()):
            if _alive(entry.pid):
                self.notes.append(
                    f"study {entry.study_uid}: {entry.op} in progress (process {entry.pid})"
                )
                continue
            source = self.vault.storage_name(entry.source)
            to = f" to {self.vault.storage_name(entry.destination)}" if entry.destination else ""
            problem = self.found(
                Problem(
                    kind="stuck-journal",
                    storage=source,
                    study_uid=entry.study_uid,
                    detail=f"{entry.op} from {source}{to} stopped at phase {entry.phase!r} "
                    f"(process {entry.pid} is gone)",
                    repairable=True,
                )
            )
            if not self.repair:
                continue
            study = self.index.get_study(entry.study_uid)
            try:
                outcome = replay_entry(self.vault, entry)
            except StudyvaultError as exc:
                self.not_fixed(problem, f"cannot finish it now: {exc}")
                continue
            self.fixed(problem, f"resumed the {entry.op}: {outcome}", study)

    def _journal_locations(self) -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
        """(storage id, staging name) and (storage id, location) pairs the journal covers."""
        staging: set[tuple[str, str]] = set()
        locations: set[tuple[str, str]] = set()
        for entry in self.index.iter_journal():
            locations.add((entry.source, entry.source_location))
            if entry.destination and entry.staging:
                staging.add((entry.destination, entry.staging))
                staging.add((entry.destination, entry.staging + ".old"))
            if entry.destination and entry.location:
                locations.add((entry.destination, entry.location))
        return staging, locations

    # -- the index against the disk ---------------------------------------------------
    def indexed(self, online: dict[str, Storage], progress: Progress | None) -> dict[str, set]:
        """Check every indexed copy in an online storage; return each storage's indexed
        locations (as hashes: a million studies fit in a few tens of MB)."""
        seen: dict[str, set[int]] = {sid: set() for sid in online}
        total, done = self.index.count_studies(), 0
        for study in self.index.iter_studies():
            instances: list[InstanceRecord] | None = None
            for sid, location in study.copies.items():
                storage = online.get(sid)
                if storage is None:
                    if self.vault.storage_by_id(sid) is None:
                        self.found(
                            Problem(
                                kind="unknown-storage",
                                study_uid=study.study_uid,
                                location=location,
                                detail=f"the index lists a copy at {location} in storage "
                                f"{sid}, which is not in the config",
                            )
                        )
                    continue
                seen[sid].add(hash(location))
                if instances is None:
                    instances = self.index.instances(study.study_uid)
                self.check_copy(storage, study, location, instances)
            done += 1
            if progress is not None:
                progress(done, total)
        return seen

    def check_copy(
        self, storage: Storage, study: StudyRecord, location: str, instances: list[InstanceRecord]
    ) -> None:
        def found(kind: str, detail: str, paths: list[str] | None = None) -> Problem:
            return self.found(
                Problem(
                    kind=kind,
                    storage=storage.name,
                    study_uid=study.study_uid,
                    location=location,
                    paths=paths or [],
                    repairable=kind == "unindexed-files",
                    detail=detail,
                )
            )

        def some(paths: list[str]) -> str:
            return ", ".join(paths[:5]) + (" …" if len(paths) > 5 else "")

        try:
            present = listing(storage, location)
        except OSError:
            others = [self.vault.storage_name(s) for s in study.copies if s != storage.id]
            elsewhere = f"; a copy is in {', '.join(others)}" if others else "; no other copy"
            found("missing-study", f"the index points at {location}, which is not there{elsewhere}")
            return
        expected = {i.paths[storage.id] for i in instances if storage.id in i.paths}
        missing = sorted(expected - present.keys())
        if missing:
            detail = f"{len(missing)} indexed instance file(s) missing in {location}: "
            found("missing-files", detail + some(missing), missing)
        unknown = sorted(
            p for p in present.keys() - expected if not _recent(storage, location, p, self.stable)
        )
        if unknown:
            detail = f"{len(unknown)} file(s) in {location} not in the index: "
            problem = found("unindexed-files", detail + some(unknown), unknown)
            if self.repair:
                self.index_files(problem, storage, location, unknown)

    def index_files(
        self, problem: Problem, storage: Storage, location: str, unknown: list[str]
    ) -> None:
        scanned = read_study(storage, location)
        if scanned.study is not None:
            self.index.apply(lambda writer: add_study(writer, storage.id, scanned))
        expected = {
            i.paths[storage.id]
            for i in self.index.instances(problem.study_uid)
            if storage.id in i.paths
        }
        left = [p for p in unknown if p not in expected]
        indexed = len(unknown) - len(left)
        if left:
            reasons = "; ".join(scanned.skipped) or "duplicates of indexed instances"
            self.not_fixed(
                problem,
                f"indexed {indexed} of {len(unknown)} file(s); {len(left)} left: {reasons}",
            )
            return
        study = self.index.get_study(problem.study_uid)
        self.fixed(problem, f"indexed {indexed} instance(s) into study {problem.study_uid}", study)

    # -- the disk against the index ---------------------------------------------------
    def disk(self, storage: Storage, indexed: set[int]) -> None:
        leftovers = storage.staging_leftovers()  # listed before the journal is read
        staging, journaled = self._journal_locations()
        for name in leftovers:
            if (storage.id, name) in staging:
                continue
            moved_aside = name.endswith(".old") or f"{name}.old" in leftovers
            detail = f"{name} is not referred to by any journal entry"
            if moved_aside:
                detail += "; it holds a copy moved aside by a publish: check it by hand"
            problem = self.found(
                Problem(
                    kind="orphan-staging",
                    storage=storage.name,
                    location=name,
                    repairable=not moved_aside,
                    detail=detail,
                )
            )
            if not self.repair or moved_aside:
                continue
            if (storage.id, name) in self._journal_locations()[0]:
                self.not_fixed(problem, "a transfer started using it meanwhile")
                continue
            # Staging is never the only copy: it is written from a source that stays whole
            # until the transfer has published and committed, and the journal covers it
            # until then; with no journal entry left, the source or the published copy
            # holds every instance.
            storage.discard_staging(StorePlan(location=name, staging=name, paths={}))
            self.fixed(problem, f"removed orphan staging {name}")
        for location in storage.iter_studies():
            if hash(location) in indexed or (storage.id, location) in journaled:
                continue
            if storage.is_moved_out(location):
                continue  # moved out of studyvault on purpose
            if _recent(storage, location, None, self.stable):
                self.notes.append(f"{storage.name}: {location} is still receiving instances")
                continue
            problem = self.found(
                Problem(
                    kind="unindexed-study",
                    storage=storage.name,
                    location=location,
                    repairable=True,
                    detail=f"{location} is not in the index",
                )
            )
            if self.repair:
                self.index_study(problem, storage, location)

    def index_study(self, problem: Problem, storage: Storage, location: str) -> None:
        scanned = read_study(storage, location)
        if scanned.study is None:
            reasons = "; ".join(scanned.skipped) or "no DICOM instance in it"
            self.not_fixed(problem, f"not indexed: {reasons}")
            return
        uid = scanned.study.study_uid
        problem.study_uid = uid
        self.index.apply(lambda writer: add_study(writer, storage.id, scanned))
        self.fixed(
            problem,
            f"indexed study {uid} ({len(scanned.instances)} instances)",
            self.index.get_study(uid),
        )


def check(
    vault: Vault,
    *,
    repair: bool = False,
    progress: Progress | None = None,
    report: Callable[[Problem], None] | None = None,
) -> CheckReport:
    """Check that the index and the storages agree (see :data:`PROBLEM_KINDS`).

    :param repair: fix what is safe to fix; every repair writes an audit line.
    :param progress: called as ``progress(studies_done, studies_total)``.
    :param report: called with each problem once ``repair`` has acted on it.
    """
    started = time.monotonic()
    checker = _Checker(vault, repair, report)
    checker.journal()  # first: finishing a transfer changes what is on disk
    online: dict[str, Storage] = {}
    for storage in vault.storages.values():
        status = storage.status()
        if status is Status.ONLINE:
            online[storage.id] = storage
        elif status is Status.UNMOUNTED:
            checker.notes.append(f"{storage.name} is unmounted: not checked")
        else:
            checker.found(
                Problem(
                    kind="storage-offline",
                    storage=storage.name,
                    detail=f"{storage.root} cannot be read: not checked",
                )
            )
    indexed = checker.indexed(online, progress)
    for sid, storage in online.items():
        checker.disk(storage, indexed[sid])
    problems = checker.problems
    remaining = sum(1 for p in problems if not p.repaired)
    return CheckReport(
        ok=remaining == 0,
        seconds=round(time.monotonic() - started, 3),
        studies=vault.index.count_studies(),
        repaired=len(problems) - remaining,
        remaining=remaining,
        problems=problems,
        notes=checker.notes,
    )
