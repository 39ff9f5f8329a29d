"""The append-only audit log (JSON lines) of every destructive or moving operation.

It lives beside the index (``<data_dir>/audit.log``), not in it, so losing or
rebuilding the index never loses the record of what was deleted or moved.
"""

from __future__ import annotations

import datetime as dt
import getpass
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import msgspec

from .records import StudyRecord


class AuditEntry(msgspec.Struct, kw_only=True, omit_defaults=True):
    time: str
    user: str
    host: str
    op: str
    study_uid: str
    patient_id: str = ""
    patient_name: str = ""
    study_date: str = ""
    instances: int = 0
    bytes: int = 0
    source: str = ""
    destination: str = ""
    task: str = ""
    detail: str = ""


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(AuditEntry)


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no name for this uid (containers)
        return str(os.getuid())


def append(
    path: Path,
    op: str,
    study: StudyRecord,
    *,
    source: str = "",
    destination: str = "",
    task: str | None = None,
    detail: str = "",
) -> AuditEntry:
    """Append one line and fsync it before the operation it records goes on."""
    entry = AuditEntry(
        time=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        user=_user(),
        host=socket.gethostname(),
        op=op,
        study_uid=study.study_uid,
        patient_id=study.patient_id,
        patient_name=study.patient_name,
        study_date=study.study_date,
        instances=study.instance_count,
        bytes=study.size,
        source=source,
        destination=destination,
        task=task or "",
        detail=detail,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        os.write(fd, _encoder.encode(entry) + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    return entry


def read(path: Path, since: str | None = None) -> Iterator[AuditEntry]:
    """Entries in order; ``since`` is an ISO date or time (UTC) to start from."""
    if not path.exists():
        return
    with open(path, "rb") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                entry = _decoder.decode(line)
            except msgspec.DecodeError:
                continue  # a line torn by a power cut while being written
            if since is None or entry.time >= since:
                yield entry
