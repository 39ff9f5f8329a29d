"""``studyvault index rebuild``: recreate the study index from the storages' files.

Nothing on disk is deleted, and the old index is never needed: the new one is built
beside it in ``<index>.rebuild`` and swapped in at the end (atomically, where the
system can exchange two folders), and the old folder is kept as
``<index>.replaced-<time>``. What the files alone cannot tell is read from beside them:
a study moved out of studyvault carries a mark in its archive and is not listed; a
fetched study's online copy carries its archive and return date.

When the old index can still be read, it also gives:

- safety: a rebuild is refused while another process has the index open (the
  service, a running task), and while its journal holds unfinished operations
  (``studyvault check --repair`` finishes them first; ``--force`` drops them);
- the copies in storages that cannot be read now (Unmounted, Offline), so those
  studies stay listed;
- the storage tasks' last results.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import errno
import fcntl
import functools
import logging
import os
import shutil
import struct
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import msgspec

from .errors import IndexCorruptError, StudyvaultError
from .fsutil import fsync_dir
from .index import IndexWriter, StudyIndex, TaskState
from .scan import ScannedStudy, add_study, read_study
from .storage import Status, Storage
from .vault import Vault

log = logging.getLogger(__name__)

#: Present in ``<index>.rebuild`` while it is being built: a leftover with it is an
#: unfinished build (removed by the next rebuild); one without it is an old index
#: that a crash left there after the swap (kept).
BUILDING_MARK = "REBUILDING"


class StorageRebuild(msgspec.Struct, kw_only=True):
    name: str
    status: str
    read: bool  # False: not readable now; its copies came from the old index, if any
    studies: int = 0  # study copies indexed in this storage
    instances: int = 0  # instance files indexed in this storage
    moved_out: int = 0
    carried_over: int = 0  # copies taken from the old index
    skipped: list[str] = []
    mismatched: list[str] = []


class RebuildSummary(msgspec.Struct, kw_only=True):
    index: str
    previous: str | None  # where the old index folder was kept
    old_index: str  # "readable" | "corrupt" | "missing"
    studies: int
    instances: int
    seconds: float
    storages: list[StorageRebuild]
    task_states: int = 0
    notes: list[str] = []


class _OldIndex(msgspec.Struct, kw_only=True):
    state: str  # readable | corrupt | missing
    detail: str = ""


def _users(index_dir: Path) -> list[int]:
    """Process ids, other than this one, that have the LMDB environment at
    ``index_dir`` open.

    Every process with the environment open holds a shared ``fcntl`` lock on the lock
    file (LMDB's own way to tell whether it is the first user); ``F_GETLK`` names one of
    them. Elsewhere than Linux, the reader table is asked instead, which only knows
    processes whose last transaction was a read.
    """
    pids: set[int] = set()
    if sys.platform == "linux":
        layout = "hhqqi4x"  # struct flock on Linux: type, whence, start, len, pid
        try:
            fd = os.open(index_dir / "lock.mdb", os.O_RDWR)
        except OSError:
            return []
        try:
            query = struct.pack(layout, fcntl.F_WRLCK, os.SEEK_SET, 0, 1, 0)
            kind, _, _, _, pid = struct.unpack(layout, fcntl.fcntl(fd, fcntl.F_GETLK, query))
            if kind != fcntl.F_UNLCK and pid > 0:
                pids.add(pid)
        except OSError:
            pass
        finally:
            os.close(fd)
    pids.discard(os.getpid())
    return sorted(pids)


def _readers(index: StudyIndex) -> list[int]:
    """Live process ids, other than this one, in the LMDB reader table."""
    pids = set()
    for line in index.env.readers().splitlines()[1:]:
        fields = line.split()
        if fields and fields[0].isdigit():
            pids.add(int(fields[0]))
    pids.discard(os.getpid())
    alive = []
    for pid in sorted(pids):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        except PermissionError:
            pass
        alive.append(pid)
    return alive


def _refuse_if_in_use(index_dir: Path, readers: list[int] | None = None) -> None:
    users = sorted(set(_users(index_dir)) | set(readers or []))
    if users:
        raise StudyvaultError(
            f"the study index is in use by process {', '.join(map(str, users))} "
            "(the service or a task?): stop it, then run `studyvault index rebuild` again"
        )


def _inspect_old(target: Path, force: bool) -> _OldIndex:
    """Look at the old index, if it can be read: refuse when another process has it
    open or its journal holds unfinished work."""
    if not (target / "data.mdb").exists():
        return _OldIndex(state="missing")
    _refuse_if_in_use(target)
    try:
        old = StudyIndex(target, readonly=True)
    except (IndexCorruptError, OSError) as exc:
        return _OldIndex(state="corrupt", detail=str(exc))
    try:
        try:
            list(old.iter_journal())  # a cheap read: a corrupt file fails here
        except (IndexCorruptError, msgspec.DecodeError) as exc:
            return _OldIndex(state="corrupt", detail=str(exc))
        _refuse_if_in_use(target, _readers(old))
        entries = list(old.iter_journal())
        if entries and not force:
            raise StudyvaultError(
                f"the study index holds {len(entries)} unfinished operation(s) in its "
                "journal: run `studyvault check --repair` to finish them first (or "
                "`studyvault index rebuild --force` to drop them)"
            )
        return _OldIndex(state="readable")
    finally:
        old.close()


def _carry_over(
    vault: Vault, target: Path, new: StudyIndex, unreadable: list[tuple[Storage, StorageRebuild]]
) -> int:
    """Copy the old index's task states, and the copies in storages that cannot be read
    now, into the new index; returns the number of task states."""
    old = StudyIndex(target, readonly=True)
    try:
        for storage, result in unreadable:
            for study in old.iter_studies(storage=storage.id):
                location = study.copies[storage.id]
                instances = [
                    (msgspec.structs.replace(i, paths={}), i.paths[storage.id])
                    for i in old.instances(study.study_uid)
                    if storage.id in i.paths
                ]
                template = msgspec.structs.replace(study, copies={}, modalities=[])
                if study.fetched_from and study.fetched_from == storage.id:
                    template.fetched_from = template.fetched_until = None
                scanned = ScannedStudy(location=location, study=template, instances=instances)
                new.apply(functools.partial(_add, storage_id=storage.id, scanned=scanned))
                result.instances += len(instances)
                result.carried_over += 1
                result.studies += 1
        states = 0
        for task in vault.config.tasks:
            state = old.task_state(task.name)
            if state.started or state.last_result:
                state.running = False  # no run survives a rebuild
                new.update_task_state(task.name, functools.partial(_restore, state))
                states += 1
        return states
    finally:
        old.close()


def _add(writer: IndexWriter, *, storage_id: str, scanned: ScannedStudy) -> int:
    return add_study(writer, storage_id, scanned)


def _restore(state: TaskState, into: TaskState) -> None:
    for field in msgspec.structs.fields(TaskState):
        setattr(into, field.name, getattr(state, field.name))


def _prepare(work: Path) -> list[str]:
    """Clear the build folder of an unfinished build; keep an old index a crash left."""
    notes = []
    if work.exists():
        if (work / BUILDING_MARK).exists():
            # an unfinished build: derived data only, made again now
            shutil.rmtree(work)
        else:
            aside = _aside_name(work.with_name(work.name.removesuffix(".rebuild")))
            os.rename(work, aside)
            notes.append(f"an older index left by an interrupted rebuild was kept at {aside}")
    work.mkdir(parents=True)
    (work / BUILDING_MARK).write_text("an index rebuild is writing this folder\n")
    return notes


def _aside_name(target: Path) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%dT%H%M%S")
    aside = target.with_name(f"{target.name}.replaced-{stamp}")
    n = 2
    while aside.exists():
        aside = target.with_name(f"{target.name}.replaced-{stamp}-{n}")
        n += 1
    return aside


def _exchange(a: Path, b: Path) -> bool:
    """Swap two folders in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``);
    False when the system or filesystem cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(a))


def _swap(work: Path, target: Path) -> Path | None:
    """Put the built index at ``target``; return where the old one was kept."""
    (work / BUILDING_MARK).unlink()
    fsync_dir(work)
    parent = target.parent
    if not target.exists():
        os.rename(work, target)
        fsync_dir(parent)
        return None
    aside = _aside_name(target)
    if _exchange(work, target):
        fsync_dir(parent)  # the new index is in place; `work` now holds the old one
        os.rename(work, aside)
    else:
        os.rename(target, aside)  # a short moment without an index; a crash here leaves
        os.rename(work, target)  # both folders on disk, and a rebuild again fixes it
    fsync_dir(parent)
    return aside


def _window(
    pool: ThreadPoolExecutor, storage: Storage, locations: list[str], size: int
) -> Iterator[tuple[str, ScannedStudy | None]]:
    """Read studies on the pool's threads, in order, at most ``size`` ahead.
    A moved-out study gives None."""

    def read(location: str) -> ScannedStudy | None:
        if storage.is_moved_out(location):
            return None
        return read_study(storage, location)

    pending: deque[tuple[str, Future[ScannedStudy | None]]] = deque()
    for location in locations:
        pending.append((location, pool.submit(read, location)))
        if len(pending) >= size:
            first, future = pending.popleft()
            yield first, future.result()
    while pending:
        first, future = pending.popleft()
        yield first, future.result()


def rebuild_index(
    vault: Vault,
    *,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
    batch: int = 256,
    workers: int | None = None,
) -> RebuildSummary:
    """Rebuild the study index from every image directory and readable archive.

    :param force: rebuild even when the old index's journal holds unfinished work
        (dropped; ``studyvault check`` then reports what it left, e.g. staging).
    :param progress: called as ``progress(studies_done, studies_total)``.
    :param batch: studies per write transaction (group commit).
    :param workers: threads reading study files at the same time (default: up to 4).
    """
    started = time.monotonic()
    target = vault.config.index_dir
    work = target.with_name(target.name + ".rebuild")
    vault.close()  # never write the old index from here
    notes = _prepare(work)
    workers = workers or min(4, os.cpu_count() or 1)
    try:
        new = StudyIndex(work)
        try:
            old = _inspect_old(target, force)
            if old.state == "corrupt":
                notes.append(f"the old index could not be read: {old.detail}")
            storages = [*vault.image_directories(), *vault.archives()]
            readable: list[tuple[Storage, StorageRebuild, list[str]]] = []
            unreadable: list[tuple[Storage, StorageRebuild]] = []
            results = []
            for storage in storages:
                status = storage.status()
                result = StorageRebuild(
                    name=storage.name, status=status.value, read=status is Status.ONLINE
                )
                results.append(result)
                if status is Status.ONLINE:
                    readable.append((storage, result, list(storage.iter_studies())))
                else:
                    unreadable.append((storage, result))
            total = sum(len(locations) for _, _, locations in readable)
            done = 0
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rebuild") as pool:
                for storage, result, locations in readable:
                    group: list[ScannedStudy] = []
                    for _, scanned in _window(pool, storage, locations, 4 * workers):
                        done += 1
                        if scanned is None:
                            result.moved_out += 1
                        else:
                            result.skipped.extend(scanned.skipped)
                            result.mismatched.extend(scanned.mismatched)
                            if scanned.study is not None:
                                group.append(scanned)
                        if len(group) >= batch:
                            _commit(new, storage, group, result)
                        if progress is not None:
                            progress(done, total)
                    _commit(new, storage, group, result)
            task_states = 0
            if old.state == "readable":
                task_states = _carry_over(vault, target, new, unreadable)
            else:
                for storage, _ in unreadable:
                    notes.append(
                        f"{storage.name} is {storage.status().value.lower()}: its studies are "
                        "not listed until it is readable and `studyvault check --repair` runs"
                    )
            studies = new.count_studies()
            instances = new.count_instances()
        finally:
            new.close()
        _refuse_if_in_use(target)  # again: a process may have opened it meanwhile
    except BaseException:
        # the old index is untouched; the partial build is derived data only
        shutil.rmtree(work, ignore_errors=True)
        raise
    previous = _swap(work, target)
    return RebuildSummary(
        index=str(target),
        previous=str(previous) if previous else None,
        old_index=old.state,
        studies=studies,
        instances=instances,
        seconds=round(time.monotonic() - started, 3),
        storages=results,
        task_states=task_states,
        notes=notes,
    )


def _commit(
    index: StudyIndex, storage: Storage, group: list[ScannedStudy], result: StorageRebuild
) -> None:
    """Write a group of studies in one transaction, then empty the group."""
    if not group:
        return

    def body(writer: IndexWriter) -> int:
        return sum(add_study(writer, storage.id, scanned) for scanned in group)

    index.apply(body)
    result.studies += len(group)
    result.instances += sum(len(scanned.instances) for scanned in group)
    group.clear()
