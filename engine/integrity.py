"""``verify``: re-read stored files and compare their SHA-256 with the index
(:mod:`studyvault.check` makes sure the index and the storages agree).

Findings are per study copy: *missing* files (indexed, not on disk), *changed* files
(their bytes no longer match the recorded SHA-256: bit rot, ransomware), *unreadable*
ones (a damaged zip member, an I/O error) and *unknown* files (in a study's folder or
zip, not in the index; a storage's own files such as a DICOMDIR or manifest are not
listed by it, so they are never unknown).
"""

from __future__ import annotations

import hashlib
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec

from .errors import StudyvaultError
from .records import InstanceRecord, StudyRecord
from .storage import Opener, Status, Storage
from .studies import iso_date
from .vault import Vault

Progress = Callable[[int, int], None]


class FileFinding(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One file of a study copy that is not as the index says."""

    path: str
    sop_uid: str = ""
    detail: str = ""


class StudyFindings(msgspec.Struct, kw_only=True):
    """What is wrong with one copy of one study."""

    storage: str
    study_uid: str
    patient_name: str
    patient_id: str
    study_date: str
    location: str
    missing: list[FileFinding] = []
    changed: list[FileFinding] = []
    unreadable: list[FileFinding] = []
    unknown: list[FileFinding] = []

    def empty(self) -> bool:
        return not (self.missing or self.changed or self.unreadable or self.unknown)

    def lines(self) -> list[str]:
        """One line per finding, e.g. ``changed: DICOM/S0000001/I0000001 (instance
        1.2.3): SHA-256 0a1b2c3d4e5f…, the index records 9f8e7d6c5b4a…``."""
        out = []
        for kind in ("missing", "changed", "unreadable", "unknown"):
            for item in getattr(self, kind):
                text = f"{kind}: {item.path}"
                if item.sop_uid:
                    text += f" (instance {item.sop_uid})"
                if item.detail:
                    text += f": {item.detail}"
                out.append(text)
        return out


class StorageResult(msgspec.Struct, kw_only=True):
    """What ``verify`` did in one storage."""

    name: str
    status: str
    verified: bool  # False when the storage could not be read (Unmounted, Offline)
    studies: int = 0
    files: int = 0  # files whose SHA-256 was computed
    bytes: int = 0
    studies_with_problems: int = 0
    note: str = ""


class VerifyReport(msgspec.Struct, kw_only=True):
    ok: bool
    sample_percent: float
    seconds: float
    storages: list[StorageResult]
    problems: list[StudyFindings]


class _Checked(msgspec.Struct, kw_only=True):
    findings: StudyFindings
    files: int = 0
    bytes: int = 0


#: files of studies whose instances average this size are hashed on worker threads
_THREADED_BYTES = 256 << 10


def parse_sample(text: str | None) -> float:
    """``"10%"`` or ``"10"`` as the fraction 0.1; None (no ``--sample``) is 1.0."""
    if text is None:
        return 1.0
    value = text.strip().removesuffix("%").strip()
    try:
        percent = float(value)
    except ValueError:
        percent = -1.0
    if not 0 < percent <= 100:
        raise StudyvaultError(f"--sample: {text!r} is not a percentage above 0 and up to 100%")
    return percent / 100


def listing(storage: Storage, location: str) -> dict[str, Opener]:
    """Every file the storage lists in the study at ``location``, by path.

    :raises OSError: when the study folder (or zip) is gone or unreadable
        (a :class:`~studyvault.errors.StorageError` is an OSError too).
    """
    return dict(storage.iter_files(location))


_buffers = threading.local()


def _sha256(opener: Opener) -> tuple[str, int]:
    """(SHA-256, size) of one file, read through a buffer kept per thread."""
    view = getattr(_buffers, "view", None)
    if view is None:
        view = _buffers.view = memoryview(bytearray(1 << 20))
    digest = hashlib.sha256()
    size = 0
    with opener() as f:
        while n := f.readinto(view):  # type: ignore[attr-defined]
            digest.update(view[:n])
            size += n
    return digest.hexdigest(), size


def _short(digest: str) -> str:
    return digest[:12] + "…"


def _findings(storage: Storage, study: StudyRecord, location: str) -> StudyFindings:
    return StudyFindings(
        storage=storage.name,
        study_uid=study.study_uid,
        patient_name=study.patient_name,
        patient_id=study.patient_id,
        study_date=iso_date(study.study_date),
        location=location,
    )


def _hash(opener: Opener) -> tuple[str, int] | str:
    """(SHA-256, size) of one file, or why it could not be read."""
    try:
        return _sha256(opener)
    except OSError as exc:  # StorageError too: a damaged zip member
        return exc.strerror or str(exc)


class _Read(msgspec.Struct, array_like=True):
    """What was found on disk for one study copy: the files listed (None when the
    listing failed, with ``why``) and the outcome of hashing those asked for."""

    listed: list[str] | None
    why: str = ""
    hashed: dict[str, tuple[str, int] | str] = {}


def _read_copy(
    storage: Storage, location: str, wanted: list[str], pool: ThreadPoolExecutor | None = None
) -> _Read:
    """List the study at ``location`` and hash those of the ``wanted`` paths it holds."""
    try:
        present = listing(storage, location)
    except OSError as exc:
        why = "the study folder is missing" if isinstance(exc, FileNotFoundError) else str(exc)
        return _Read(listed=None, why=why)
    todo = [path for path in wanted if path in present]
    openers = [present[path] for path in todo]
    hashed = pool.map(_hash, openers) if pool is not None else map(_hash, openers)
    return _Read(listed=list(present), hashed=dict(zip(todo, hashed, strict=True)))


def _wanted(
    storage: Storage, instances: list[InstanceRecord], sample: float, rng: random.Random | None
) -> list[str]:
    """The paths of the instances to hash: all, or each with probability ``sample``."""
    paths = [inst.paths[storage.id] for inst in instances if storage.id in inst.paths]
    if sample >= 1.0:
        return paths
    draw = rng or random
    return [path for path in paths if draw.random() < sample]


def _judge(
    storage: Storage, study: StudyRecord, instances: list[InstanceRecord], read: _Read
) -> _Checked:
    """Compare what was read of the copy of ``study`` in ``storage`` with the index."""
    location = study.copies[storage.id]
    found = _findings(storage, study, location)
    checked = _Checked(findings=found)
    listed = set(read.listed or ())
    expected: set[str] = set()
    for inst in instances:
        path = inst.paths.get(storage.id)
        if path is None:
            continue  # added while the study was fetched: not in this (older) copy
        expected.add(path)
        if read.listed is None:
            found.missing.append(FileFinding(path=path, sop_uid=inst.sop_uid, detail=read.why))
            continue
        if path not in listed:
            found.missing.append(FileFinding(path=path, sop_uid=inst.sop_uid))
            continue
        outcome = read.hashed.get(path)
        if outcome is None:
            continue  # not in the sample
        if isinstance(outcome, str):
            found.unreadable.append(FileFinding(path=path, sop_uid=inst.sop_uid, detail=outcome))
            continue
        digest, size = outcome
        checked.files += 1
        checked.bytes += size
        if digest != inst.sha256:
            found.changed.append(
                FileFinding(
                    path=path,
                    sop_uid=inst.sop_uid,
                    detail=f"SHA-256 {_short(digest)}, the index records {_short(inst.sha256)}",
                )
            )
    for path in sorted(listed - expected):
        found.unknown.append(FileFinding(path=path, detail="not in the index"))
    return checked


def verify_copy(
    storage: Storage,
    study: StudyRecord,
    instances: list[InstanceRecord],
    *,
    sample: float = 1.0,
    rng: random.Random | None = None,
    pool: ThreadPoolExecutor | None = None,
) -> _Checked:
    """Verify the copy of ``study`` in ``storage``: list its files, hash every indexed
    instance (or each with probability ``sample``) and compare with the index.

    :param pool: hash the files on these threads (worth it for large files only).
    """
    wanted = _wanted(storage, instances, sample, rng)
    read = _read_copy(storage, study.copies[storage.id], wanted, pool)
    return _judge(storage, study, instances, read)


# -- verifying in worker processes ------------------------------------------------------
# Per small file, verify is Python's work more than hashing, and one process is bound
# by the interpreter lock: the command line splits a storage's studies among forked
# worker processes, each with its own read-only handle on the index (LMDB must not be
# used through the parent's), that read, hash and judge their share. Only for storages
# whose files are local paths (a forked process must not reuse the parent's network
# connections, as S3 clients hold), only for a whole verify (a sample's draws follow the
# study order), and never in the service (threads and fork do not mix).


class _Share(msgspec.Struct, kw_only=True):
    """What one worker process found in its share of a storage's studies."""

    studies: int = 0
    files: int = 0
    bytes: int = 0
    problems: list[StudyFindings] = []


#: set by the parent before the workers fork: (index folder, storages by id, counter of
#: studies done, for the progress shown by the parent)
_forked: dict[str, Any] = {}


def _verify_share(storage_id: str, part: int, parts: int) -> _Share:
    """In a worker process: verify every ``parts``-th study of the storage, from the
    ``part``-th on, in UID order."""
    from .index import StudyIndex

    storage: Storage = _forked["storages"][storage_id]
    counter = _forked["done"]
    # the handle inherited from the parent must not be used here; closing it touches
    # only this process's mappings and descriptors (fcntl locks are not inherited), and
    # lets the index be opened afresh
    _forked["parent_index"].close()
    index = StudyIndex(_forked["index_dir"], readonly=True)
    share = _Share()
    try:
        for n, study_uid in enumerate(index.storage_study_uids(storage_id)):
            if n % parts != part:
                continue
            study = index.get_study(study_uid)
            if study is None or storage_id not in study.copies:
                continue  # moved by a task meanwhile: not a finding
            checked = verify_copy(storage, study, index.instances(study_uid))
            share.studies += 1
            share.files += checked.files
            share.bytes += checked.bytes
            if not checked.findings.empty():
                share.problems.append(checked.findings)
            if share.studies % 16 == 0:
                with counter.get_lock():
                    counter.value += 16
    finally:
        index.close()
    return share


def _process_pool(vault: Vault, processes: int, storages: list[Storage], sample: float) -> Any:
    """A pool of ``processes`` forked workers for the local ones of ``storages``, or
    None when worker processes are not to be used (see above)."""
    import multiprocessing

    if processes < 2 or sample < 1.0 or "fork" not in multiprocessing.get_all_start_methods():
        return None
    local = {s.id: s for s in storages if not s.url_scheme}
    if not local:
        return None
    context = multiprocessing.get_context("fork")
    _forked.update(
        index_dir=vault.config.index_dir,
        parent_index=vault.index,
        storages=local,
        done=context.Value("q", 0),
    )
    return context.Pool(processes)


def _verify_forked(
    pool: Any, processes: int, storage: Storage, tick: Callable[[int], None]
) -> _Share:
    """Verify ``storage`` on the pool's workers; ``tick(n)`` as they get through studies."""
    counter = _forked["done"]
    with counter.get_lock():
        counter.value = 0
    pending = pool.starmap_async(
        _verify_share, [(storage.id, k, processes) for k in range(processes)]
    )
    seen = 0
    while not pending.ready():
        pending.wait(0.2)
        now = counter.value
        if now > seen:
            tick(now - seen)
            seen = now
    total = _Share()
    for share in pending.get():  # raises what a worker raised
        total.studies += share.studies
        total.files += share.files
        total.bytes += share.bytes
        total.problems += share.problems
    tick(total.studies - seen)
    return total


def verify_study(vault: Vault, study: StudyRecord, storage: Storage) -> list[str]:
    """Verify one study's copy in ``storage`` (every instance); one line per problem,
    empty when the copy is whole. Used by the ``verify`` task action."""
    if storage.id not in study.copies:
        return [f"study {study.study_uid} has no copy in {storage.name}"]
    vault.require_online(storage)
    checked = verify_copy(storage, study, vault.index.instances(study.study_uid))
    return checked.findings.lines()


def _still_there(vault: Vault, storage: Storage, found: StudyFindings) -> bool:
    """Tell whether the study's copy is still where it was read (a task running at the
    same time may have moved it, which is not a finding)."""
    now = vault.index.get_study(found.study_uid)
    return now is not None and now.copies.get(storage.id) == found.location


def verify(
    vault: Vault,
    storage_name: str | None = None,
    *,
    sample: float = 1.0,
    seed: int | None = None,
    progress: Progress | None = None,
    workers: int | None = None,
    processes: int = 1,
) -> VerifyReport:
    """Verify every study copy in one storage (or all): see the module docstring.

    A storage that is Unmounted (by the admin) is skipped with a note; an Offline one
    is reported as not verified, which makes the report not ok.

    :param sample: fraction of the instances whose bytes are hashed (missing and unknown
        files are looked for in every study).
    :param seed: makes the sample reproducible.
    :param progress: called as ``progress(studies_done, studies_total)``.
    :param workers: threads reading files at the same time (default: up to 4).
    :param processes: forked worker processes that read and hash the files of storages
        on local paths (the command line's choice; 1 reads in this process, on
        ``workers`` threads). Not for a process that runs threads of its own.
    """
    started = time.monotonic()
    storages = [vault.storage(storage_name)] if storage_name else list(vault.storages.values())
    rng = random.Random(seed)
    workers = workers or min(4, os.cpu_count() or 1)
    results: list[StorageResult] = []
    problems: list[StudyFindings] = []
    readable: list[tuple[Storage, StorageResult]] = []
    for storage in storages:
        status = storage.status()
        result = StorageResult(
            name=storage.name, status=status.value, verified=status is Status.ONLINE
        )
        results.append(result)
        if status is Status.UNMOUNTED:
            result.note = "unmounted: its studies were not verified (mount it to verify them)"
        elif status is not Status.ONLINE:
            result.note = f"offline: {storage.root} cannot be read; its studies were not verified"
        else:
            readable.append((storage, result))
    total = sum(vault.index.count_storage_studies(s.id) for s, _ in readable)
    done = 0

    def studies(storage: Storage) -> Iterator[tuple[StudyRecord, list[InstanceRecord], int]]:
        for study in vault.index.iter_studies(storage=storage.id):
            # a seed per study, drawn in order: the same seed gives the same sample
            yield study, vault.index.instances(study.study_uid), rng.getrandbits(64)

    def collect(storage: Storage, result: StorageResult, checked: _Checked) -> None:
        nonlocal done
        result.studies += 1
        result.files += checked.files
        result.bytes += checked.bytes
        found = checked.findings
        if not found.empty() and _still_there(vault, storage, found):
            result.studies_with_problems += 1
            problems.append(found)
        done += 1
        if progress is not None:
            progress(done, total)

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None and n:
            progress(done, total)

    forked = _process_pool(vault, processes, [s for s, _ in readable], sample)
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="verify") as pool:
            for storage, result in readable:
                if forked is not None and storage.id in _forked["storages"]:
                    share = _verify_forked(forked, processes, storage, tick)
                    result.studies += share.studies
                    result.files += share.files
                    result.bytes += share.bytes
                    for found in share.problems:
                        if _still_there(vault, storage, found):
                            result.studies_with_problems += 1
                            problems.append(found)
                    continue
                for study, instances, study_seed in studies(storage):
                    # files are hashed on the pool only when they are large: for small
                    # ones Python's own cost per file dominates, and threads would only
                    # contend for the interpreter lock
                    large = study.size >= _THREADED_BYTES * max(study.instance_count, 1)
                    checked = verify_copy(
                        storage,
                        study,
                        instances,
                        sample=sample,
                        rng=random.Random(study_seed) if sample < 1.0 else None,
                        pool=pool if workers > 1 and large else None,
                    )
                    collect(storage, result, checked)
    finally:
        if forked is not None:
            forked.terminate()
            forked.join()
            _forked.clear()
    problems.sort(key=lambda p: (p.storage, p.study_date, p.study_uid))
    ok = not problems and all(r.verified or r.status == Status.UNMOUNTED.value for r in results)
    report = VerifyReport(
        ok=ok,
        sample_percent=round(sample * 100, 3),
        seconds=round(time.monotonic() - started, 3),
        storages=results,
        problems=problems,
    )
    record_verify(vault, report)
    return report


# -- the last verify of each storage (for alerts and metrics) ------------------------------

VERIFY_RECORD = "verify-last.json"


class VerifySummary(msgspec.Struct, kw_only=True):
    """The outcome of the last ``verify`` of one storage, kept in
    ``<data_dir>/verify-last.json`` for the service's alerts and metrics."""

    storage: str
    time: float
    studies: int
    studies_with_problems: int
    missing: int = 0
    changed: int = 0
    unreadable: int = 0
    unknown: int = 0
    sample_percent: float = 100.0
    examples: list[str] = []  # a few problems, one line each


_summaries = msgspec.json.Decoder(dict[str, VerifySummary])


def last_verify(vault: Vault) -> dict[str, VerifySummary]:
    """Storage name -> the outcome of its last verify (storages never verified: absent)."""
    try:
        return _summaries.decode((vault.config.data_dir / VERIFY_RECORD).read_bytes())
    except (OSError, msgspec.DecodeError):
        return {}


def record_verify(vault: Vault, report: VerifyReport) -> None:
    """Keep the outcome of each storage that ``report`` verified (a failure to write is
    logged: the verify itself is done)."""
    import logging

    from .fsutil import atomic_write_bytes

    now = time.time()
    kept = last_verify(vault)
    for result in report.storages:
        if not result.verified:
            continue
        found = [p for p in report.problems if p.storage == result.name]
        kept[result.name] = VerifySummary(
            storage=result.name,
            time=now,
            studies=result.studies,
            studies_with_problems=result.studies_with_problems,
            missing=sum(len(p.missing) for p in found),
            changed=sum(len(p.changed) for p in found),
            unreadable=sum(len(p.unreadable) for p in found),
            unknown=sum(len(p.unknown) for p in found),
            sample_percent=report.sample_percent,
            examples=[
                f"study {p.study_uid} ({p.patient_name.replace('^', ' ') or '-'}): {line}"
                for p in found[:3]
                for line in p.lines()[:2]
            ],
        )
    try:
        vault.config.data_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(vault.config.data_dir / VERIFY_RECORD, msgspec.json.encode(kept))
    except OSError as exc:
        logging.getLogger(__name__).warning("cannot record the verify outcome: %s", exc)
