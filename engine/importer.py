"""``studyvault import``: take DICOM files from folders into an image directory."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import msgspec

from .dicom import read_header
from .errors import NotDicomError, StudyvaultError
from .ingest import Ingestor, Outcome
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


def _import_files(
    files: list[Path],
    ingestor: Ingestor,
    summary: ImportSummary,
    studies: set[str],
    progress: Callable[[int, int, int], None] | None,
) -> None:
    done_bytes = 0
    for number, path in enumerate(files, 1):
        try:
            header = read_header(path)
            with open(path, "rb") as src:
                outcome, reason = ingestor.add(header, src)
        except NotDicomError as exc:
            summary.skipped.append(Skipped(str(path), _reason(exc, path)))
            outcome = None
        except OSError as exc:
            summary.skipped.append(Skipped(str(path), exc.strerror or str(exc)))
            outcome = None
        if outcome is Outcome.STORED:
            size = path.stat().st_size
            summary.instances += 1
            summary.bytes += size
            done_bytes += size
            studies.add(header.study_uid)
        elif outcome is Outcome.DUPLICATE:
            summary.duplicates += 1
        elif outcome is Outcome.CONFLICT:
            summary.conflicts.append(Skipped(str(path), reason))
        if progress is not None:
            progress(number, len(files), done_bytes)


def _reason(exc: Exception, path: Path) -> str:
    """The error's reason without the file name it starts with."""
    text = str(exc)
    for prefix in (f"{path}: ", f"{path.name}: "):
        if text.startswith(prefix):
            return text[len(prefix) :]
    return text
