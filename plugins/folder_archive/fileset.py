"""Writing one study as a standalone DICOM file-set, as a folder or as one zip.

Either way the tree is the same::

    DICOMDIR                 built from the index records (instance files are never
                             rewritten), see :mod:`studyvault.dicomdir`
    DICOM/S0000001/I0000001  the instance files, byte for byte, under PS3.10 file IDs
    manifest-sha256.txt      ``<sha256>  <path>`` for DICOMDIR and every instance;
                             ``sha256sum -c manifest-sha256.txt`` checks the folder

Zips use no compression (``ZIP_STORED``): pixel data is already compressed or
compresses poorly, and storing keeps archiving as fast as copying. PS3.12 Annex V
(ZIP file over media) puts the DICOMDIR at the zip's root, as here.
"""

from __future__ import annotations

import errno
import hashlib
import os
import threading
import time
import zipfile
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import IO

from studyvault.errors import IntegrityError, StorageError, StorageFullError
from studyvault.fsutil import copy_plain, fsync_dir
from studyvault.records import InstanceRecord, StudyRecord
from studyvault.storage import Opener, StorePlan

from .layout import DICOMDIR, MANIFEST

#: (instance, opener of its bytes, file ID) in file-set order.
Item = tuple[InstanceRecord, Opener, str]
#: Threads that fsync and read back a study folder's files while the next ones are
#: written.
FSYNC_THREADS = 8
# one pool for the process: starting threads per study cost more than the fsyncs saved
_POOL = ThreadPoolExecutor(FSYNC_THREADS, thread_name_prefix="studyvault-fsync")
#: a read-back buffer per pool thread
_buffers = threading.local()


def file_set_items(
    plan: StorePlan, instances: Iterable[tuple[InstanceRecord, Opener]]
) -> list[Item]:
    """The study's instances with their planned file IDs, in file-set order (the order
    of the DICOMDIR's records and of the files written)."""
    items = [(inst, opener, plan.paths[inst.sop_uid]) for inst, opener in instances]
    return sorted(items, key=lambda item: item[2])


def os_error(exc: OSError, path: Path) -> StorageError:
    """The studyvault error for an OS error while writing below ``path``."""
    where = exc.filename or path
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFullError(f"{where}: no space left on the device")
    return StorageError(f"{where}: {exc.strerror or exc}")


def _copy(inst: InstanceRecord, opener: Opener, out: IO[bytes], label: str) -> str:
    """Copy one instance into ``out``; return its recorded SHA-256 for the manifest.

    Not hashed here: once durable, every file is read back and checked against the
    same recorded SHA-256 (:func:`_sync_and_check`) before anything is published, so a
    bad source (or a bad write) is caught there, and the manifest is then true.
    """
    with opener() as src:
        copy_plain(src, out)
    if not inst.sha256:
        raise IntegrityError(f"{label}: instance {inst.sop_uid} has no recorded SHA-256")
    return inst.sha256


def manifest(digests: Sequence[tuple[str, str]]) -> bytes:
    """The ``manifest-sha256.txt`` text for (path, SHA-256) pairs, in ``sha256sum`` format."""
    return "".join(f"{digest}  {path}\n" for path, digest in digests).encode("ascii")


def _dicomdir(study: StudyRecord, items: Sequence[Item]) -> bytes:
    from studyvault.dicomdir import build_dicomdir  # pydicom loads only when storing

    return build_dicomdir(study, [(inst, file_id) for inst, _, file_id in items])


def write_folder(staging: Path, study: StudyRecord, items: Sequence[Item]) -> None:
    """Write the study's file-set into the new folder ``staging``, durably: every file
    fsynced, then every folder, deepest first; and verified: every instance file is
    read back once durable and checked against its recorded SHA-256 (the safe transfer's
    step 3, which the archive then vouches for: see ``verified_on_write``).

    Each file is fsynced and read back by a small thread pool as soon as it is
    written, while the next one is copied: concurrent fsyncs share the filesystem's
    journal commits, so a study of hundreds of files is durable about twice as fast
    as with one fsync after another (see docs/benchmarks.md), each file still gets its
    own fsync and error, and the SHA-256 of the read-back (which releases the
    interpreter lock) runs beside the copying instead of after it.

    :raises IntegrityError: a file read back does not match its recorded SHA-256.
    """
    folders = {staging}
    staging.mkdir()
    dicomdir = _dicomdir(study, items)
    digests = [(DICOMDIR, hashlib.sha256(dicomdir).hexdigest())]
    synced: list[Future[None]] = []
    try:
        synced.append(_POOL.submit(_write_file, staging / DICOMDIR, dicomdir))
        for inst, opener, file_id in items:
            target = staging / file_id
            if target.parent not in folders:
                target.parent.mkdir(parents=True, exist_ok=True)
                folders.update(p for p in target.parents if staging in p.parents)
            with open(target, "wb") as out:
                digests.append((file_id, _copy(inst, opener, out, str(target))))
            synced.append(_POOL.submit(_sync_and_check, target, inst))
        synced.append(_POOL.submit(_write_file, staging / MANIFEST, manifest(digests)))
    finally:
        wait(synced)  # nothing of this study is still being written when we return
    for future in synced:
        future.result()  # raises the first failed write or fsync
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        fsync_dir(folder)
    fsync_dir(staging.parent)


def _sync_and_check(path: Path, inst: InstanceRecord) -> None:
    """fsync a written instance file, then read it back and compare its SHA-256 with
    the one the index records for the instance."""
    digest = hashlib.sha256()
    view = getattr(_buffers, "view", None)
    if view is None:
        view = _buffers.view = memoryview(bytearray(1 << 20))
    with open(path, "rb", buffering=0) as f:
        os.fsync(f.fileno())
        while n := f.readinto(view):
            digest.update(view[:n])
    if digest.hexdigest() != inst.sha256:
        raise IntegrityError(
            f"{path} (instance {inst.sop_uid}) does not match its recorded SHA-256 when read back"
        )


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())


def _zip_info(name: str, stamp: tuple[int, ...], size: int = 0) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=stamp)  # type: ignore[arg-type]
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16  # rw-r--r-- when unzipped
    info.file_size = size  # lets zipfile choose ZIP64 for members over 4 GB
    return info


def write_zip(part: Path, study: StudyRecord, items: Sequence[Item]) -> None:
    """Write the study's file-set as one uncompressed zip at the new file ``part``,
    fsynced, and fsync its folder."""
    stamp = time.localtime()[:6]
    dicomdir = _dicomdir(study, items)
    digests = [(DICOMDIR, hashlib.sha256(dicomdir).hexdigest())]
    with open(part, "xb") as raw:
        with zipfile.ZipFile(raw, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            zf.writestr(_zip_info(DICOMDIR, stamp, len(dicomdir)), dicomdir)
            for inst, opener, file_id in items:
                with zf.open(_zip_info(file_id, stamp, inst.size), "w") as out:
                    digests.append((file_id, _copy(inst, opener, out, f"{part}:{file_id}")))
            text = manifest(digests)
            zf.writestr(_zip_info(MANIFEST, stamp, len(text)), text)
        raw.flush()
        os.fsync(raw.fileno())
    fsync_dir(part.parent)
