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


def _hash(opener: Opener) -> tuple[str, int] | OSError:
    try:
        return _sha256(opener)
    except OSError as exc:  # StorageError too: a damaged zip member
        return exc


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
    location = study.copies[storage.id]
    found = _findings(storage, study, location)
    checked = _Checked(findings=found)
    try:
        present = listing(storage, location)
    except OSError as exc:
        why = "the study folder is missing" if isinstance(exc, FileNotFoundError) else str(exc)
        for inst in instances:
            if storage.id in inst.paths:
                found.missing.append(
                    FileFinding(path=inst.paths[storage.id], sop_uid=inst.sop_uid, detail=why)
                )
        return checked
    expected: set[str] = set()
    to_hash: list[tuple[InstanceRecord, str, Opener]] = []
    for inst in instances:
        path = inst.paths.get(storage.id)
        if path is None:
            continue  # added while the study was fetched: not in this (older) copy
        expected.add(path)
        opener = present.get(path)
        if opener is None:
            found.missing.append(FileFinding(path=path, sop_uid=inst.sop_uid))
        elif sample >= 1.0 or (rng or random).random() < sample:
            to_hash.append((inst, path, opener))
    openers = [opener for _, _, opener in to_hash]
    hashed = pool.map(_hash, openers) if pool is not None else map(_hash, openers)
    for (inst, path, _), outcome in zip(to_hash, hashed, strict=True):
        if isinstance(outcome, OSError):
            detail = outcome.strerror or str(outcome)
            found.unreadable.append(FileFinding(path=path, sop_uid=inst.sop_uid, detail=detail))
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
    for path in sorted(set(present) - expected):
        found.unknown.append(FileFinding(path=path, detail="not in the index"))
    return checked


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
) -> VerifyReport:
    """Verify every study copy in one storage (or all): see the module docstring.

    A storage that is Unmounted (by the admin) is skipped with a note; an Offline one
    is reported as not verified, which makes the report not ok.

    :param sample: fraction of the instances whose bytes are hashed (missing and unknown
        files are looked for in every study).
    :param seed: makes the sample reproducible.
    :param progress: called as ``progress(studies_done, studies_total)``.
    :param workers: threads reading files at the same time (default: up to 4).
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

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="verify") as pool:
        for storage, result in readable:
            for study, instances, study_seed in studies(storage):
                # files are hashed on the pool only when they are large: for small ones
                # Python's own cost per file dominates, and threads would only contend
                # for the interpreter lock
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
    problems.sort(key=lambda p: (p.storage, p.study_date, p.study_uid))
    ok = not problems and all(r.verified or r.status == Status.UNMOUNTED.value for r in results)
    return VerifyReport(
        ok=ok,
        sample_percent=round(sample * 100, 3),
        seconds=round(time.monotonic() - started, 3),
        storages=results,
        problems=problems,
    )
