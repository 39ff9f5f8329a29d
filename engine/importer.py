"""``studyvault import``: take DICOM files from folders into an image directory."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path

import msgspec

from .dicom import read_header
from .errors import NotDicomError, StudyvaultError
from .fsutil import sha256_file
from .ingest import Ingestor, Outcome
from .records import InstanceHeader
from .storage import OnlineStorage
from .vault import Vault


class Skipped(msgspec.Struct):
    path: str
    reason: str


class ImportSummary(msgspec.Struct, kw_only=True):
    """What an import did, as printed at its end (and with ``--json``)."""

    storage: str
    files: int = 0
    studies: int = 0
    instances: int = 0
    bytes: int = 0
    duplicates: int = 0
    conflicts: list[Skipped] = []
    skipped: list[Skipped] = []


def walk(paths: Iterable[Path]) -> Iterator[Path]:
    """Every regular file under ``paths`` (folders recursively, in name order)."""
    for path in paths:
        if path.is_dir():
            for folder, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    yield Path(folder) / name
        elif path.exists():
            yield path
        else:
            raise StudyvaultError(f"{path}: no such file or folder")


def import_paths(
    vault: Vault,
    paths: list[Path],
    *,
    to: str | None = None,
    progress: Callable[[int, int, int], None] | None = None,
) -> ImportSummary:
    """Import every DICOM file under ``paths`` into the image directory ``to`` (or the
    incoming one).

    :param progress: called as ``progress(files_done, files_total, bytes_done)``.
    """
    storage = vault.image_directory(to)
    vault.require_online(storage)
    files = list(walk(paths))
    summary = ImportSummary(storage=storage.name, files=len(files))
    ingestor = Ingestor(vault.index, storage, vault.plugins, "import", pipelined=True)
    studies: set[str] = set()
    try:
        _import_files(files, ingestor, summary, studies, progress)
    finally:
        # what was stored before a failure (a full disk) is indexed, not orphaned
        ingestor.commit()
        ingestor.drain()
    summary.studies = len(studies)
    return summary


#: files copied and hashed at once: hashing and file I/O release the interpreter
#: lock, so a second thread keeps a second CPU busy while the main thread reads the
#: next headers (more measured no faster on two CPUs)
PARALLEL = 2


def _store(storage: OnlineStorage, header: InstanceHeader, path: Path) -> tuple[str, str, int, str]:
    with open(path, "rb") as src:
        return storage.ingest(header.study_uid, header.sop_uid, src)


def _import_files(
    files: list[Path],
    ingestor: Ingestor,
    summary: ImportSummary,
    studies: set[str],
    progress: Callable[[int, int, int], None] | None,
) -> None:
    """Read each file's header here and store up to :data:`PARALLEL` files at once on
    worker threads; their results are indexed in file order."""
    done_bytes = 0
    reported = 0
    # (file number, path, header, the storing) in file order
    window: deque[tuple[int, Path, InstanceHeader, Future[tuple[str, str, int, str]]]]
    window = deque()
    in_flight: set[str] = set()  # SOPInstanceUIDs being stored

    def report(number: int) -> None:
        nonlocal reported
        reported = max(reported, number)
        if progress is not None:
            progress(reported, len(files), done_bytes)

    def finish() -> None:
        nonlocal done_bytes
        number, path, header, storing = window.popleft()
        in_flight.discard(header.sop_uid)
        try:
            location, relpath, size, digest = storing.result()
        except OSError as exc:  # a StorageError too: a full disk
            summary.skipped.append(Skipped(str(path), exc.strerror or str(exc)))
        else:
            ingestor.stored(header, location, relpath, size, digest)
            summary.instances += 1
            summary.bytes += size
            done_bytes += size
            studies.add(header.study_uid)
        report(number)

    with ThreadPoolExecutor(PARALLEL, thread_name_prefix="studyvault-import") as pool:
        try:
            for number, path in enumerate(files, 1):
                try:
                    header = read_header(path)
                    while header.sop_uid in in_flight:
                        finish()  # the same instance twice: the first one decides
                    verdict = ingestor.verdict(header, partial(sha256_file, path))
                except NotDicomError as exc:
                    summary.skipped.append(Skipped(str(path), _reason(exc, path)))
                    report(number)
                    continue
                except OSError as exc:
                    summary.skipped.append(Skipped(str(path), exc.strerror or str(exc)))
                    report(number)
                    continue
                if verdict is not None:
                    outcome, reason = verdict
                    if outcome is Outcome.DUPLICATE:
                        summary.duplicates += 1
                    else:
                        summary.conflicts.append(Skipped(str(path), reason))
                    report(number)
                    continue
                in_flight.add(header.sop_uid)
                storing = pool.submit(_store, ingestor.storage, header, path)
                window.append((number, path, header, storing))
                if len(window) > PARALLEL:
                    finish()
        finally:
            # what the workers stored is indexed even when the import stops early
            while window:
                finish()


def _reason(exc: Exception, path: Path) -> str:
    """The error's reason without the file name it starts with."""
    text = str(exc)
    for prefix in (f"{path}: ", f"{path.name}: "):
        if text.startswith(prefix):
            return text[len(prefix) :]
    return text
