"""Indexing the studies found in a storage's files (adopting a storage, rebuilding)."""

from __future__ import annotations

import hashlib
import logging
import time

import msgspec

from .dicom import read_header_bytes
from .errors import NotDicomError
from .index import IndexWriter
from .records import header_to_instance, header_to_study
from .storage import Storage
from .vault import Vault

log = logging.getLogger(__name__)


class ScanSummary(msgspec.Struct, kw_only=True):
    storage: str
    studies: int = 0
    instances: int = 0
    skipped: list[str] = []


def index_storage(vault: Vault, storage: Storage) -> ScanSummary:
    """Read every study of ``storage`` and add its copy to the index (one transaction
    per study). Files that are not DICOM are listed as skipped."""
    summary = ScanSummary(storage=storage.name)
    for location in storage.iter_studies():
        records = []
        for path, opener in storage.iter_files(location):
            with opener() as f:
                data = f.read()
            try:
                header = read_header_bytes(data, f"{storage.name}:{location}/{path}")
            except NotDicomError as exc:
                summary.skipped.append(str(exc))
                continue
            record = header_to_instance(
                header,
                size=len(data),
                sha256=hashlib.sha256(data).hexdigest(),
                received=time.time(),
            )
            records.append((header, record, path))
        if not records:
            continue

        def body(writer: IndexWriter, records: list = records, location: str = location) -> None:
            first = records[0][0]
            previous = writer.get_study(first.study_uid)
            study = (
                msgspec.structs.replace(previous, copies=dict(previous.copies))
                if previous
                else header_to_study(first)
            )
            study.copies[storage.id] = location
            for header, record, path in records:
                if header.study_uid != first.study_uid:
                    log.warning("%s: instance of another study in %s", path, location)
                    continue
                old = writer.get_instance(header.study_uid, header.sop_uid)
                if old is not None:
                    old.paths[storage.id] = path
                    writer.put_instance(old)
                    continue
                record.paths = {storage.id: path}
                study.instance_count += 1
                study.size += record.size
                study.last_received = max(study.last_received, record.received)
                if record.modality and record.modality not in study.modalities:
                    study.modalities.append(record.modality)
                writer.put_instance(record)
            writer.put_study(study, previous)

        vault.index.apply(body)
        summary.studies += 1
        summary.instances += len(records)
    return summary
