"""Where things live inside a folder archive, and how study locations are named.

Layout below the root::

    folder_archive.key                      TOML: id, name, kind, naming, compression,
                                            created, format version
    last-stored.txt                         when the newest study was stored (ISO 8601)
    studies/<YYYY>/<YYYYMMDD> <NAME> <id>/  readable naming (or ``….zip``)
    studies/<StudyInstanceUID>/             UID naming (or ``….zip``)
    staging/<token>/ or <token>.zip.part    stores in progress (same filesystem)

A location ending in ``.zip`` is a zipped study, any other a study folder: the format
follows the location, so changing an archive's ``zip`` setting never breaks the
studies already in it.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from studyvault.errors import StorageError
from studyvault.naming import (
    UNKNOWN_DATE,
    assign_file_ids,
    is_safe_relpath,
    readable_study_path,
    short_id,
    uid_study_path,
)
from studyvault.records import InstanceRecord, StudyRecord
from studyvault.storage import StorePlan

KEY_NAME = "folder_archive.key"
STUDIES = "studies"
STAGING = "staging"
LAST_STORED = "last-stored.txt"
DICOMDIR = "DICOMDIR"
MANIFEST = "manifest-sha256.txt"
#: Marker inside a study folder that was moved out of studyvault.
FOLDER_MARKER = ".studyvault-moved-out"
#: Suffix of the marker beside a zipped study that was moved out (``<name>.zip.moved-out``).
ZIP_MARKER_SUFFIX = ".moved-out"
ZIP_SUFFIX = ".zip"
ZIP_STAGING_SUFFIX = ".zip.part"
#: Files of a study folder that are not instances.
NOT_INSTANCES = frozenset({DICOMDIR, MANIFEST})

#: Hex digits of the short id tried in turn when a location is taken by another study.
SUFFIX_LENGTHS = (8, 12, 16, 24, 32, 48, 64)
_GROUP = re.compile(r"[0-9]{4}")


def is_zip(location: str) -> bool:
    """Tell whether a location (or staging name) is a zip file rather than a folder."""
    return location.endswith((ZIP_SUFFIX, ZIP_STAGING_SUFFIX))


def candidates(study: StudyRecord, naming: str, zipped: bool) -> Iterator[str]:
    """Yield the locations a new study may take, best first; later ones have longer
    unique suffixes, for the (unlikely) case that a shorter one is taken."""
    ext = ZIP_SUFFIX if zipped else ""
    for length in SUFFIX_LENGTHS:
        if naming == "uid":
            base = uid_study_path(study)
            rel = (
                base
                if length == SUFFIX_LENGTHS[0]
                else f"{base}-{short_id(study.study_uid, length)}"
            )
        else:
            rel = readable_study_path(study, length)
        yield f"{STUDIES}/{rel}{ext}"


def resolve(root: Path, location: str, what: str = "location") -> Path:
    """Join a location (or a path inside one) to ``root``, refusing anything that could
    point outside it.

    :raises StorageError: for an absolute path, ``..`` or other unsafe components.
    """
    if not is_safe_relpath(location):
        raise StorageError(f"{root}: refusing unsafe {what} {location!r}")
    return root / location


def moved_out_marker(root: Path, location: str) -> Path:
    """The marker file that says the study at ``location`` left studyvault."""
    if is_zip(location):
        return resolve(root, location + ZIP_MARKER_SUFFIX)
    return resolve(root, location) / FOLDER_MARKER


def _is_study(entry: os.DirEntry[str]) -> bool:
    if entry.name.startswith("."):
        return False
    if entry.is_file(follow_symlinks=False):
        return entry.name.endswith(ZIP_SUFFIX)
    return entry.is_dir(follow_symlinks=False)


def iter_locations(root: Path) -> Iterator[str]:
    """Yield every published study location below ``root/studies``, sorted.

    ``studies/<YYYY>`` and ``studies/unknown-date`` folders without a DICOMDIR are year
    groups (readable naming); every folder or zip inside one is a study. Any other
    folder or zip directly in ``studies/`` is a study (UID naming). Hidden entries
    (temporary files) and moved-out markers are not studies.
    """
    studies = root / STUDIES
    if not studies.is_dir():
        return
    for entry in sorted(os.scandir(studies), key=lambda e: e.name):
        if not _is_study(entry):
            continue
        group = (
            entry.is_dir(follow_symlinks=False)
            and (_GROUP.fullmatch(entry.name) or entry.name == UNKNOWN_DATE)
            and not os.path.exists(os.path.join(entry.path, DICOMDIR))
        )
        if not group:
            yield f"{STUDIES}/{entry.name}"
            continue
        for inner in sorted(os.scandir(entry.path), key=lambda e: e.name):
            if _is_study(inner):
                yield f"{STUDIES}/{entry.name}/{inner.name}"


def iter_folder_files(folder: Path) -> Iterator[str]:
    """Yield the relative path of every instance file in a study folder, sorted:
    not the DICOMDIR, the manifest, hidden files or symbolic links."""

    def walk(path: Path, prefix: str) -> Iterator[str]:
        for entry in sorted(os.scandir(path), key=lambda e: e.name):
            if entry.name.startswith("."):
                continue
            rel = prefix + entry.name
            if entry.is_dir(follow_symlinks=False):
                yield from walk(Path(entry.path), rel + "/")
            elif entry.is_file(follow_symlinks=False) and rel not in NOT_INSTANCES:
                yield rel

    yield from walk(folder, "")


def plan_store(
    study: StudyRecord,
    instances: list[InstanceRecord],
    storage_id: str,
    new_location: Callable[[StudyRecord], str],
    zip_staging_suffix: str,
) -> StorePlan:
    """The store plan of an archive kind with this layout (folder or S3): the study's
    existing location (a merge) or a new one, a fresh staging name, PS3.10 file IDs."""
    location = study.copies.get(storage_id) if storage_id else None
    if not location:
        location = new_location(study)
    staging = f"{STAGING}/{uuid.uuid4().hex}"
    if is_zip(location):
        staging += zip_staging_suffix
    paths = {inst.sop_uid: file_id for inst, file_id in assign_file_ids(instances)}
    return StorePlan(location=location, staging=staging, paths=paths)
