"""Records kept in the study index, as msgspec Structs encoded as MessagePack.

A study's patient and study attributes live on its :class:`StudyRecord`; series and
instance attributes on each :class:`InstanceRecord`. Together they hold everything a
DICOMDIR and the study list need, so neither has to re-open a DICOM file.
"""

from __future__ import annotations

import msgspec

#: ``StudyRecord.copies`` maps a storage id to the study's location inside that
#: storage (a folder or zip path relative to the storage root, in the storage's own
#: private format). ``InstanceRecord.paths`` maps the same storage id to the instance's
#: path relative to that location.


class InstanceHeader(msgspec.Struct, frozen=True, kw_only=True):
    """What studyvault reads from one DICOM file's header (pixel data is never read)."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str = ""
    transfer_syntax: str = ""
    patient_name: str = ""
    patient_id: str = ""
    patient_birth_date: str = ""
    patient_sex: str = ""
    study_date: str = ""  # YYYYMMDD or ""
    study_time: str = ""
    study_id: str = ""
    study_description: str = ""
    accession_number: str = ""
    series_number: int | None = None
    modality: str = ""
    series_description: str = ""
    instance_number: int | None = None
    specific_character_set: str = ""


class InstanceRecord(msgspec.Struct, kw_only=True):
    """One instance (DICOM file) of a study, with its size and SHA-256."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str = ""
    transfer_syntax: str = ""
    series_number: int | None = None
    modality: str = ""
    series_description: str = ""
    instance_number: int | None = None
    size: int = 0
    sha256: str = ""
    received: float = 0.0  # unix time the instance was stored by studyvault
    paths: dict[str, str] = {}  # storage id -> path relative to the study's location


class StudyRecord(msgspec.Struct, kw_only=True):
    """One study: every instance that shares a StudyInstanceUID."""

    study_uid: str
    patient_name: str = ""
    patient_id: str = ""
    patient_birth_date: str = ""
    patient_sex: str = ""
    study_date: str = ""
    study_time: str = ""
    study_id: str = ""
    study_description: str = ""
    accession_number: str = ""
    specific_character_set: str = ""
    modalities: list[str] = []
    instance_count: int = 0
    size: int = 0
    last_received: float = 0.0  # unix time of the newest instance (stable-age check)
    copies: dict[str, str] = {}  # storage id -> location of the study in that storage
    fetched_from: str | None = None  # archive storage id when the online copy is a fetch
    fetched_until: str | None = None  # ISO date the fetched copy returns to the archive


class JournalEntry(msgspec.Struct, kw_only=True):
    """A study operation in flight, so a killed run resumes where it stopped.

    ``phase`` is ``"started"`` (intent recorded; staging may exist: discard it),
    ``"verified"`` (the staged copy matched every SHA-256: publish and commit it) or
    ``"committed"`` (the index points at the new copy: remove the source copy).
    """

    op: str  # "archive" | "move" | "move-out" | "fetch" | "return" | "delete" | ...
    study_uid: str
    source: str  # storage id
    source_location: str  # the study's location in the source
    destination: str | None = None  # storage id, None for delete
    location: str | None = None  # destination location planned before staging
    staging: str | None = None  # destination staging name planned before staging
    paths: dict[str, str] = {}  # SOPInstanceUID -> path in the destination
    source_paths: dict[str, str] = {}  # SOPInstanceUID -> path in the source, if it has one
    phase: str = "started"
    started: float = 0.0
    pid: int = 0  # process doing the work; a live one's entry is not replayed
    task: str | None = None
    keep_source: bool = False  # fetch keeps the archive copy
    keep_in_list: bool = True  # False: the study leaves the study list (move out)
    fetched_until: str | None = None  # set on the study when a fetch commits


def header_to_study(header: InstanceHeader) -> StudyRecord:
    """Start a study record from the first instance seen of the study."""
    return StudyRecord(
        study_uid=header.study_uid,
        patient_name=header.patient_name,
        patient_id=header.patient_id,
        patient_birth_date=header.patient_birth_date,
        patient_sex=header.patient_sex,
        study_date=header.study_date,
        study_time=header.study_time,
        study_id=header.study_id,
        study_description=header.study_description,
        accession_number=header.accession_number,
        specific_character_set=header.specific_character_set,
    )


def header_to_instance(
    header: InstanceHeader, *, size: int, sha256: str, received: float
) -> InstanceRecord:
    """Make the instance record for a stored file."""
    return InstanceRecord(
        study_uid=header.study_uid,
        series_uid=header.series_uid,
        sop_uid=header.sop_uid,
        sop_class_uid=header.sop_class_uid,
        transfer_syntax=header.transfer_syntax,
        series_number=header.series_number,
        modality=header.modality,
        series_description=header.series_description,
        instance_number=header.instance_number,
        size=size,
        sha256=sha256,
        received=received,
    )


def count_instance(study: StudyRecord, record: InstanceRecord) -> None:
    """Add a newly indexed instance to its study's totals and modalities."""
    study.instance_count += 1
    study.size += record.size
    study.last_received = max(study.last_received, record.received)
    if record.modality and record.modality not in study.modalities:
        study.modalities.append(record.modality)
