"""Durable file operations: temp name on the same filesystem, fsync, rename, fsync dir."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import shutil
import stat
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO

from .errors import StorageError, StorageFullError

CHUNK = 1 << 20


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (a new or renamed file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")


def _raise_os(exc: OSError, path: Path) -> None:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        raise StorageFullError(f"{path}: no space left on the device") from exc
    raise StorageError(f"{path}: {exc.strerror or exc}") from exc


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        _raise_os(exc, path)


_HASHER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="studyvault-sha256")


def copy_stream(src: IO[bytes], out: IO[bytes]) -> tuple[int, str]:
    """Copy ``src`` to ``out``; return (bytes, SHA-256 hex) of what was copied.

    A regular file of a chunk or more is copied in the kernel while a helper thread
    hashes it (:func:`_copy_hashed_in_kernel`). Otherwise hashing a chunk runs in a
    helper thread while the chunk is written and the next one read (hashlib and file
    I/O release the GIL), so a large file costs about the larger of the two instead of
    their sum.
    """
    done = _copy_hashed_in_kernel(src, out)
    if done is not None:
        return done
    digest = hashlib.sha256()
    size = 0
    hashing = None
    while chunk := src.read(CHUNK):
        if hashing is not None:
            hashing.result()
        hashing = _HASHER.submit(digest.update, chunk) if len(chunk) >= CHUNK else None
        if hashing is None:
            digest.update(chunk)
        out.write(chunk)
        size += len(chunk)
    if hashing is not None:
        hashing.result()
    return size, digest.hexdigest()


def _hash_fd(fd: int) -> tuple[int, str]:
    """(bytes, SHA-256 hex) of the file open at ``fd``, read with ``pread`` (the
    descriptor's position is left to whoever else reads it)."""
    digest = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, CHUNK, offset):
        digest.update(chunk)
        offset += len(chunk)
    return offset, digest.hexdigest()


def _copy_hashed_in_kernel(src: IO[bytes], out: IO[bytes]) -> tuple[int, str] | None:
    """Copy a regular file not yet read from in the kernel (:func:`copy_plain`) while a
    helper thread hashes it; (bytes, SHA-256 hex), or None when this does not apply (not
    a file, already read from, smaller than a chunk), and nothing was written.

    The file is read twice (the second time from the page cache), so the SHA-256 is
    of the copied bytes only if the file did not change meanwhile: its size and
    modification time are compared before and after, and a file that changed is
    copied again, through the hashing loop (None, ``out`` emptied, ``src`` rewound).
    """
    try:
        fd = src.fileno()
        before = os.fstat(fd)
        fresh = src.tell() == 0 and os.lseek(fd, 0, os.SEEK_CUR) == 0
    except (AttributeError, OSError, io.UnsupportedOperation):
        return None
    if not fresh or not stat.S_ISREG(before.st_mode) or before.st_size < CHUNK:
        return None
    hashing = _HASHER.submit(_hash_fd, fd)
    try:
        size = copy_plain(src, out)
    finally:
        hashed, digest = hashing.result()
    after = os.fstat(fd)
    if size == hashed == before.st_size == after.st_size and (
        before.st_mtime_ns == after.st_mtime_ns
    ):
        return size, digest
    src.seek(0)
    out.seek(0)
    out.truncate()
    return None


def copy_plain(src: IO[bytes], out: IO[bytes]) -> int:
    """See :func:`_copy_plain`; a full disk becomes :class:`StorageFullError`."""
    try:
        return _copy_plain(src, out)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageFullError(
                f"{getattr(out, 'name', 'file')}: no space left on the device"
            ) from exc
        raise


def _copy_plain(src: IO[bytes], out: IO[bytes]) -> int:
    """Copy ``src`` to ``out`` without hashing, in the kernel when both are files
    (``copy_file_range``, else ``sendfile``); return the bytes copied. For transfers,
    whose staged copy the engine re-reads and checks against the recorded SHA-256."""
    try:
        src_fd, out_fd = src.fileno(), out.fileno()
        # a buffered reader that has read ahead has its descriptor past its position
        fresh = src.tell() == 0 and os.lseek(src_fd, 0, os.SEEK_CUR) == 0
    except (AttributeError, OSError, io.UnsupportedOperation):
        return _copy_userspace(src, out)
    if not fresh:
        return _copy_userspace(src, out)
    out.flush()
    size = 0
    calls = []
    if hasattr(os, "copy_file_range"):
        calls.append(lambda: os.copy_file_range(src_fd, out_fd, CHUNK * 8))
    calls.append(lambda: os.sendfile(out_fd, src_fd, None, CHUNK * 8))
    for call in calls:
        try:
            while n := call():
                size += n
            return size
        except OSError as exc:
            if size or exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
    return _copy_userspace(src, out)


def _copy_userspace(src: IO[bytes], out: IO[bytes]) -> int:
    size = 0
    while chunk := src.read(CHUNK):
        out.write(chunk)
        size += len(chunk)
    return size


def write_durably(path: Path, src: IO[bytes] | bytes) -> tuple[int, str]:
    """Write a new file at ``path`` (via a temp name, fsynced, renamed); the caller
    fsyncs the folder once for many files. Returns (bytes, SHA-256 hex)."""
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as out:
            if isinstance(src, bytes | bytearray | memoryview):
                out.write(src)
                size, digest = len(src), hashlib.sha256(src).hexdigest()
            else:
                size, digest = copy_stream(src, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        _raise_os(exc, path)
    return size, digest


def write_unsynced(path: Path, src: IO[bytes] | bytes) -> tuple[int, str]:
    """Write a new file at ``path`` without fsync (the caller syncs a whole group with
    :func:`fsync_files` before relying on it). Returns (bytes, SHA-256 hex)."""
    try:
        with open(path, "wb") as out:
            if isinstance(src, bytes | bytearray | memoryview):
                out.write(src)
                return len(src), hashlib.sha256(src).hexdigest()
            return copy_stream(src, out)
    except OSError as exc:
        path.unlink(missing_ok=True)
        _raise_os(exc, path)
        raise  # unreachable: _raise_os always raises


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_files(paths: list[Path], workers: int = 8) -> None:
    """fsync many files at once: the disk can merge the flushes, which one after
    another cost a journal commit each."""
    try:
        if len(paths) <= 1:
            for path in paths:
                _fsync_path(path)
            return
        with ThreadPoolExecutor(max_workers=min(workers, len(paths))) as pool:
            list(pool.map(_fsync_path, paths))
    except OSError as exc:
        _raise_os(exc, Path(exc.filename or (paths[0] if paths else ".")))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_stream(src: IO[bytes]) -> str:
    digest = hashlib.sha256()
    while chunk := src.read(CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def remove_tree(path: Path) -> None:
    """Remove a file or folder if present, and make the removal durable."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    else:
        return
    if path.parent.exists():
        fsync_dir(path.parent)


def publish_folder(staging: Path, location: Path, old: Path) -> None:
    """Move a verified staging folder (or file) to ``location``.

    An existing study at ``location`` (a merge) is first renamed to ``old`` and removed
    only once the new copy stands; :func:`recover_folder` undoes a half-done publish.
    Calling it again after it completed does nothing.
    """
    if not staging.exists():
        if location.exists():
            remove_tree(old)
            return
        raise StorageError(f"{staging}: staging is missing and {location} does not exist")
    location.parent.mkdir(parents=True, exist_ok=True)
    if location.exists() and staging.is_dir():
        remove_tree(old)
        os.rename(location, old)
    os.replace(staging, location)
    fsync_dir(location.parent)
    if staging.parent != location.parent:
        fsync_dir(staging.parent)
    # the new copy is published and durable: the replaced one can go
    remove_tree(old)


def recover_folder(staging: Path, location: Path, old: Path) -> None:
    """Undo an unpublished attempt: put a replaced copy back, remove staging."""
    if old.exists() and not location.exists():
        os.rename(old, location)
        fsync_dir(location.parent)
    remove_tree(staging)
    remove_tree(old)
