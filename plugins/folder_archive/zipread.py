"""Reading members of zipped studies, without ever extracting them.

A study zip is read member by member straight from the file. Its central directory is
parsed once and remembered (keyed by the file's identity, so a replaced zip is read
afresh): verifying or indexing a study of 2,000 instances opens the zip 2,000 times,
and parsing the directory each time would make that quadratic.

Every member name must be a safe relative path (:func:`~studyvault.naming.
is_safe_relpath`); a zip holding one that is not ("zip slip": ``../../etc/x``,
``/abs``, ``C:\\x``) or the same name twice is refused as a whole.
"""

from __future__ import annotations

import io
import os
import struct
import threading
import zipfile
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import IO

from studyvault.errors import StorageError
from studyvault.naming import is_safe_relpath

_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")
_LOCAL_SIGNATURE = b"PK\x03\x04"
_ENCRYPTED = 0x1
_UTF8 = 0x800


class _StoredMember(io.RawIOBase):
    """A stored (uncompressed) member: a window on the zip file, CRC-32 checked at the end."""

    def __init__(self, f: io.BufferedReader, size: int, crc: int, label: str) -> None:
        self._f = f
        self._left = size
        self._expected_crc = crc
        self._crc = 0
        self._label = label

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        if self._left <= 0:
            return 0
        view = memoryview(buffer)[: min(len(buffer), self._left)]
        n = self._f.readinto(view)
        if not n:
            raise StorageError(f"{self._label}: zip member is truncated")
        self._crc = zlib.crc32(view[:n], self._crc)
        self._left -= n
        if self._left == 0 and self._crc != self._expected_crc:
            raise StorageError(f"{self._label}: zip member is damaged (bad CRC-32)")
        return n

    def close(self) -> None:
        if not self.closed:
            self._f.close()
        super().close()


class ZipReader:
    """Opens members of study zips. One per storage; safe to share between threads.

    :param cache_size: how many zips' central directories to remember.
    """

    def __init__(self, cache_size: int = 8) -> None:
        self._cache: OrderedDict[Path, tuple[tuple[int, ...], dict[str, zipfile.ZipInfo]]] = (
            OrderedDict()
        )
        self._size = cache_size
        self._lock = threading.Lock()

    def members(self, path: Path) -> dict[str, zipfile.ZipInfo]:
        """Every member of the zip at ``path`` by name (folder entries included).

        :raises StorageError: when the zip is unreadable or holds an unsafe or repeated
            member name.
        """
        try:
            st = os.stat(path)
        except OSError as exc:
            raise StorageError(f"{path}: {exc.strerror or exc}") from None
        identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            cached = self._cache.get(path)
            if cached is not None and cached[0] == identity:
                self._cache.move_to_end(path)
                return cached[1]
        infos = _read_directory(path)
        with self._lock:
            self._cache[path] = (identity, infos)
            while len(self._cache) > self._size:
                self._cache.popitem(last=False)
        return infos

    def open(self, path: Path, name: str) -> IO[bytes]:
        """Open member ``name`` of the zip at ``path`` for reading.

        :raises StorageError: for an unsafe or missing member, or a damaged zip.
        """
        if not is_safe_relpath(name):
            raise StorageError(
                f"{path}: refusing zip member {name!r}: its path leaves the study folder"
            )
        info = self.members(path).get(name)
        if info is None or info.is_dir():
            raise StorageError(f"{path}: no member {name!r} in this zip")
        return open_member(path, info)

    def forget(self, path: Path) -> None:
        """Drop what is remembered about ``path`` (it was removed or replaced)."""
        with self._lock:
            self._cache.pop(path, None)


def _read_directory(path: Path) -> dict[str, zipfile.ZipInfo]:
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (OSError, zipfile.BadZipFile) as exc:
        raise StorageError(f"{path}: unreadable zip: {exc}") from None
    members: dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        # orig_filename is the name as stored, before zipfile cut it at a NUL
        for name in (info.orig_filename, info.filename):
            if not is_safe_relpath(name):
                raise StorageError(
                    f"{path}: refusing zip member {name!r}: its path leaves the study "
                    "folder (zip slip); this zip is not read"
                )
        if info.filename in members:
            raise StorageError(f"{path}: zip member {info.filename!r} appears twice")
        members[info.filename] = info
    return members


def open_member(path: Path, info: zipfile.ZipInfo) -> IO[bytes]:
    """Open one member whose central-directory entry is ``info``.

    Stored members (the only kind studyvault writes) are read directly from the file;
    others go through :mod:`zipfile`.
    """
    label = f"{path}:{info.filename}"
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & _ENCRYPTED:
        try:
            with zipfile.ZipFile(path) as zf:
                # the member keeps the file open after the ZipFile is closed
                return zf.open(info)
        except (OSError, zipfile.BadZipFile, NotImplementedError, RuntimeError) as exc:
            raise StorageError(f"{label}: {exc}") from None
    f = open(path, "rb")
    try:
        f.seek(info.header_offset)
        header = f.read(_LOCAL_HEADER.size)
        if len(header) != _LOCAL_HEADER.size or header[:4] != _LOCAL_SIGNATURE:
            raise StorageError(f"{label}: damaged zip (no local header)")
        fields = _LOCAL_HEADER.unpack(header)
        name_len, extra_len = fields[-2], fields[-1]
        encoding = "utf-8" if info.flag_bits & _UTF8 else "cp437"
        if f.read(name_len) != info.orig_filename.encode(encoding, "replace"):
            raise StorageError(f"{label}: damaged zip (names in directory and header differ)")
        f.seek(extra_len, os.SEEK_CUR)
    except BaseException:
        f.close()
        raise
    return io.BufferedReader(_StoredMember(f, info.compress_size, info.CRC, label))
