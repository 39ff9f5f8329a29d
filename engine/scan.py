"""Indexing the studies found in a storage's files (adopting a storage, check --repair,
rebuilding the index).

Reading (:func:`read_study`) and writing (:func:`add_study`) are separate, so an index
rebuild can read studies on several threads and commit them in groups.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tomllib

import msgspec

from .dicom import read_header_bytes
from .errors import NotDicomError, StorageError
from .index import IndexWriter, StudyIndex
from .ingest import _fill_missing
from .records import (
    InstanceHeader,
    InstanceRecord,
    StudyRecord,
    count_instance,
    header_to_instance,
    header_to_study,
)
from .storage import OnlineStorage, Opener, Role, Storage
from .transfer import FETCH_NOTE
from .vault import Vault

log = logging.getLogger(__name__)

#: A study in an archive may hold this ``sha256sum``-format list of its files; the
#: SHA-256s in it were verified against the index when the study was archived.
MANIFEST = "manifest-sha256.txt"
_CHUNK = 1 << 20


class ScanSummary(msgspec.Struct, kw_only=True):
    storage: str
    studies: int = 0
    instances: int = 0
    skipped: list[str] = []
    moved_out: int = 0  # studies marked as moved out of studyvault: not indexed
    #: instances whose bytes no longer match the manifest written when they were stored
    mismatched: list[str] = []


class ScannedStudy(msgspec.Struct, kw_only=True):
    """One study location as read from its files, ready for :func:`add_study`."""

    location: str
    study: StudyRecord | None = None  # None: no DICOM instance found
    instances: list[tuple[InstanceRecord, str]] = []  # (record, path in the location)
    skipped: list[str] = []
    mismatched: list[str] = []


def _read_instance(opener: Opener, label: str) -> tuple[InstanceHeader, int, str, float]:
    """Hash one file and read its header in the same pass; returns (header, size,
    SHA-256, modification time or 0.0 when the storage cannot tell)."""
    digest = hashlib.sha256()
    with opener() as f:
        try:
            mtime = os.fstat(f.fileno()).st_mtime
        except (OSError, AttributeError, ValueError):
            mtime = 0.0  # a zip member has no file of its own
        head = f.read(_CHUNK)
        digest.update(head)
        size = len(head)
        more = f.read(_CHUNK)
        header: InstanceHeader | None = None
        if more:
            try:
                header = read_header_bytes(head, label)
            except NotDicomError:
                header = None  # decided below on the whole file
        while more:
            digest.update(more)
            size += len(more)
            more = f.read(_CHUNK)
    if header is None:
        if size <= len(head):
            header = read_header_bytes(head, label)
        else:
            with opener() as f:  # rare: a header longer than its first bytes
                header = read_header_bytes(f.read(), label)
    return header, size, digest.hexdigest(), mtime


def _manifest(storage: Storage, location: str) -> dict[str, str]:
    """path -> SHA-256 from the study's manifest, or {} when it has none."""
    if storage.role is not Role.ARCHIVE:
        return {}
    try:
        with storage.open_file(location, MANIFEST) as f:
            text = f.read().decode("utf-8", "replace")
    except OSError:  # StorageError is an OSError too: no manifest
        return {}
    digests = {}
    for line in text.splitlines():
        digest, sep, path = line.partition("  ")
        if sep and len(digest) == 64:
            digests[path.lstrip("*")] = digest.lower()
    return digests


def _unreadable(exc: OSError, label: str) -> str:
    if isinstance(exc, StorageError):
        return f"unreadable: {exc}"
    return f"unreadable: {label}: {exc.strerror or exc}"


def fetched_note(storage: Storage, location: str) -> tuple[str, str] | None:
    """(archive id, return date) recorded beside a fetched study's online copy, if any."""
    if not isinstance(storage, OnlineStorage):
        return None
    try:
        text = storage.read_note(location, FETCH_NOTE)
        if text is None:
            return None
        note = tomllib.loads(text)
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        log.warning("%s: %s/%s: unreadable fetch note: %s", storage.name, location, FETCH_NOTE, exc)
        return None
    archive, until = note.get("archive_id"), note.get("until")
    if isinstance(archive, str) and archive and isinstance(until, str) and until:
        return archive, until
    return None


def read_study(storage: Storage, location: str) -> ScannedStudy:
    """Read every instance file of the study at ``location`` (never writes anything).

    Every file is hashed; when the study has a manifest, the SHA-256 recorded is the
    manifest's (the one verified when the study was stored), and a file that no longer
    matches it is listed in ``mismatched``. Files that are not DICOM, and instances of
    another study, are listed in ``skipped``.
    """
    scanned = ScannedStudy(location=location)
    found: list[tuple[InstanceHeader, InstanceRecord, str]] = []
    try:
        manifest = _manifest(storage, location)
        for path, opener in storage.iter_files(location):
            label = f"{storage.name}:{location}/{path}"
            try:
                header, size, sha, mtime = _read_instance(opener, label)
            except NotDicomError as exc:
                scanned.skipped.append(str(exc))
                continue
            except OSError as exc:  # one damaged file (a bad zip member): not the study
                scanned.skipped.append(_unreadable(exc, label))
                continue
            if manifest.get(path, sha) != sha:
                scanned.mismatched.append(f"{label}: does not match its manifest SHA-256")
                sha = manifest[path]
            record = header_to_instance(header, size=size, sha256=sha, received=mtime)
            found.append((header, record, path))
    except OSError as exc:  # StorageError included: a zip it refuses, a vanished folder
        scanned.skipped.append(_unreadable(exc, f"{storage.name}:{location}"))
        return scanned
    if not found:
        return scanned
    # the order instances arrived in (the modalities list keeps it), then file order
    found.sort(key=lambda item: (item[1].received, item[2]))
    study_uid = found[0][0].study_uid
    study = header_to_study(found[0][0])
    for header, record, path in found:
        if header.study_uid != study_uid:
            scanned.skipped.append(
                f"{storage.name}:{location}/{path}: instance of another study ({header.study_uid})"
            )
            continue
        _fill_missing(study, header)
        scanned.instances.append((record, path))
    note = fetched_note(storage, location)
    if note is not None:
        study.fetched_from, study.fetched_until = note
    scanned.study = study
    return scanned


def add_study(writer: IndexWriter, storage_id: str, scanned: ScannedStudy) -> int:
    """Add one scanned copy of a study to the index, merging it with copies already
    indexed (a study in an image directory and an archive is one study with two copies).
    An instance already indexed keeps its record; it only gains this storage's path.

    :returns: the number of instances new to the index.
    """
    template = scanned.study
    if template is None:
        return 0
    previous = writer.get_study(template.study_uid)
    if previous is None:
        study = msgspec.structs.replace(template, copies={}, modalities=[])
        study.instance_count = study.size = 0
        study.last_received = 0.0
    else:
        study = msgspec.structs.replace(
            previous, copies=dict(previous.copies), modalities=list(previous.modalities)
        )
        if template.fetched_from and not study.fetched_from:
            study.fetched_from, study.fetched_until = template.fetched_from, template.fetched_until
    study.copies[storage_id] = scanned.location
    added = 0
    for record, path in scanned.instances:
        old = writer.get_instance(record.study_uid, record.sop_uid)
        if old is not None:
            if storage_id not in old.paths:
                old.paths = {**old.paths, storage_id: path}
                writer.put_instance(old)
            continue
        record = msgspec.structs.replace(record, paths={storage_id: path})
        count_instance(study, record)
        writer.put_instance(record)
        added += 1
    writer.put_study(study, previous)
    return added


def index_location(
    index: StudyIndex, storage: Storage, location: str, summary: ScanSummary | None = None
) -> ScanSummary:
    """Read the study at ``location`` and add it to ``index`` in one transaction
    (a study marked as moved out of studyvault is not indexed)."""
    summary = summary or ScanSummary(storage=storage.name)
    if storage.is_moved_out(location):
        summary.moved_out += 1
        return summary
    scanned = read_study(storage, location)
    summary.skipped.extend(scanned.skipped)
    summary.mismatched.extend(scanned.mismatched)
    if scanned.study is None:
        return summary
    index.apply(lambda writer: add_study(writer, storage.id, scanned))
    summary.studies += 1
    summary.instances += len(scanned.instances)
    return summary


def index_storage(vault: Vault, storage: Storage) -> ScanSummary:
    """Read every study of ``storage`` and add its copy to the index (one transaction
    per study). Files that are not DICOM, and studies the storage refuses to read (a
    zip with unsafe member names), are listed as skipped; studies marked as moved out
    of studyvault are not indexed."""
    summary = ScanSummary(storage=storage.name)
    for location in storage.iter_studies():
        index_location(vault.index, storage, location, summary)
    return summary
