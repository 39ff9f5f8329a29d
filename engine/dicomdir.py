"""Build the DICOMDIR of one study folder from index records.

The instance files are never opened or rewritten: everything comes from the
:class:`~studyvault.records.StudyRecord` and its :class:`~studyvault.records.InstanceRecord`
entries, so a DICOMDIR for 1,000 instances takes a few tens of milliseconds.

Type 1 keys the index does not know are made up, as ``dcmmkdir --invent`` does:

- PatientID: ``SV-`` and 12 hex digits of SHA-256(StudyInstanceUID), upper case;
- StudyID: ``SV-`` and 8 such digits; StudyDate/StudyTime: ``19000101``/``000000``
  when empty or malformed; Modality: ``OT``;
- SeriesNumber / InstanceNumber: the 1-based position in the study / series;
- keys of non-IMAGE records (SR DOCUMENT, KEY OBJECT DOC, PRESENTATION, ...) that
  are not passed in *leaf_keys*: dates and times from the study, labels ``UNKNOWN``,
  CompletionFlag ``PARTIAL``, VerificationFlag ``UNVERIFIED``, the MIME type of an
  encapsulated document from its SOP class, a generic document title code. Pass
  :func:`leaf_record_keys` of the instance header to record the real values.
  RT DOSE (DoseSummationType) and SPECTROSCOPY (image geometry) keys are never
  invented: without *leaf_keys* such records lack them.

Records with names and descriptions carry the study's SpecificCharacterSet; when it
is missing or cannot encode them (the index holds decoded text), ``ISO_IR 192``.
"""

from __future__ import annotations

import copy
import os
import re
import struct
import tempfile
from collections.abc import Mapping, MutableSequence, Sequence
from pathlib import Path
from typing import Any

from pydicom import uid as uids
from pydicom.charset import convert_encodings, python_encoding
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from studyvault import __version__
from studyvault.errors import NotDicomError
from studyvault.naming import normalize_date, short_id
from studyvault.records import InstanceRecord, StudyRecord

_SOP_CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "RT DOSE": ("RTDoseStorage",),
    "RT STRUCTURE SET": ("RTStructureSetStorage",),
    "RT PLAN": ("RTPlanStorage", "RTIonPlanStorage"),
    "RT TREAT RECORD": (
        "RTBeamsTreatmentRecordStorage",
        "RTBrachyTreatmentRecordStorage",
        "RTTreatmentSummaryRecordStorage",
        "RTIonBeamsTreatmentRecordStorage",
    ),
    "PRESENTATION": ("BasicStructuredDisplayStorage",),
    "KEY OBJECT DOC": ("KeyObjectSelectionDocumentStorage",),
    "SPECTROSCOPY": ("MRSpectroscopyStorage",),
    "RAW DATA": ("RawDataStorage",),
    "REGISTRATION": ("SpatialRegistrationStorage", "DeformableSpatialRegistrationStorage"),
    "FIDUCIAL": ("SpatialFiducialsStorage",),
    "VALUE MAP": ("RealWorldValueMappingStorage",),
    "STEREOMETRIC": ("StereometricRelationshipStorage",),
    "MEASUREMENT": (
        "LensometryMeasurementsStorage",
        "AutorefractionMeasurementsStorage",
        "KeratometryMeasurementsStorage",
        "SubjectiveRefractionMeasurementsStorage",
        "VisualAcuityMeasurementsStorage",
        "OphthalmicAxialMeasurementsStorage",
        "OphthalmicVisualFieldStaticPerimetryMeasurementsStorage",
    ),
    "SURFACE": ("SurfaceSegmentationStorage",),
    "SURFACE SCAN": ("SurfaceScanMeshStorage", "SurfaceScanPointCloudStorage"),
    "TRACT": ("TractographyResultsStorage",),
    "ASSESSMENT": ("ContentAssessmentResultsStorage",),
}
#: SOP Class UID -> Directory Record Type, for classes not found by UID family below.
SOP_CLASS_RECORD_TYPES: dict[str, str] = {
    str(getattr(uids, name)): rtype for rtype, names in _SOP_CLASS_NAMES.items() for name in names
}
# Whole SOP class families (PS3.4 Annex B): SR, waveforms, presentation states,
# encapsulated documents. Checked after SOP_CLASS_RECORD_TYPES (KOS is an .88 class).
_FAMILIES = (
    ("1.2.840.10008.5.1.4.1.1.88.", "SR DOCUMENT"),
    ("1.2.840.10008.5.1.4.1.1.9.", "WAVEFORM"),
    ("1.2.840.10008.5.1.4.1.1.11.", "PRESENTATION"),
    ("1.2.840.10008.5.1.4.1.1.104.", "ENCAP DOC"),
)
_MIME_TYPES = {
    uids.EncapsulatedPDFStorage: "application/pdf",
    uids.EncapsulatedCDAStorage: "text/XML",
    uids.EncapsulatedSTLStorage: "model/stl",
    uids.EncapsulatedOBJStorage: "model/obj",
    uids.EncapsulatedMTLStorage: "model/mtl",
}

_CONTENT_ID = (
    ("InstanceNumber", "ContentDate", "ContentTime", "ContentLabel"),
    ("ContentDescription", "ContentCreatorName"),
)
_CONTENT = (("InstanceNumber", "ContentDate", "ContentTime"), ())
#: Directory Record Type -> (type 1 keys, type 2 keys) of a leaf record (PS3.3 F.5).
_LEAF_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "IMAGE": (("InstanceNumber",), ()),
    "RT DOSE": (("InstanceNumber", "DoseSummationType"), ()),
    "RT STRUCTURE SET": (
        ("InstanceNumber", "StructureSetLabel"),
        ("StructureSetDate", "StructureSetTime"),
    ),
    "RT PLAN": (("InstanceNumber", "RTPlanLabel"), ("RTPlanDate", "RTPlanTime")),
    "RT TREAT RECORD": (("InstanceNumber",), ("TreatmentDate", "TreatmentTime")),
    "PRESENTATION": (
        ("PresentationCreationDate", "PresentationCreationTime", "InstanceNumber", "ContentLabel"),
        ("ContentDescription", "ContentCreatorName"),
    ),
    "WAVEFORM": _CONTENT,
    "RAW DATA": _CONTENT,
    "SR DOCUMENT": (
        (
            "InstanceNumber",
            "CompletionFlag",
            "VerificationFlag",
            "ContentDate",
            "ContentTime",
            "ConceptNameCodeSequence",
        ),
        (),
    ),
    "KEY OBJECT DOC": (
        ("InstanceNumber", "ContentDate", "ContentTime", "ConceptNameCodeSequence"),
        (),
    ),
    "SPECTROSCOPY": (
        (
            "ImageType",
            "ContentDate",
            "ContentTime",
            "InstanceNumber",
            "NumberOfFrames",
            "Rows",
            "Columns",
            "DataPointRows",
            "DataPointColumns",
        ),
        (),
    ),
    "REGISTRATION": _CONTENT_ID,
    "FIDUCIAL": _CONTENT_ID,
    "VALUE MAP": _CONTENT_ID,
    "MEASUREMENT": _CONTENT_ID,
    "SURFACE": _CONTENT_ID,
    "TRACT": _CONTENT_ID,
    "STEREOMETRIC": ((), ()),
    "PLAN": ((), ()),
    "SURFACE SCAN": (("ContentDate", "ContentTime"), ()),
    "ASSESSMENT": (("InstanceNumber", "InstanceCreationDate"), ("InstanceCreationTime",)),
    "ENCAP DOC": (
        ("InstanceNumber", "MIMETypeOfEncapsulatedDocument"),
        ("ContentDate", "ContentTime", "DocumentTitle", "ConceptNameCodeSequence"),
    ),
    "RADIOTHERAPY": (("InstanceNumber",), ("ContentDescription", "ContentCreatorName")),
}
# Conditional (1C) keys copied from an instance header when it has them.
_CONDITIONAL_KEYS: dict[str, tuple[str, ...]] = {
    "PRESENTATION": ("ReferencedSeriesSequence", "BlendingSequence"),
    "ENCAP DOC": ("HL7InstanceIdentifier",),
    "RADIOTHERAPY": ("UserContentLabel", "UserContentLongLabel"),
}
# Document titles used when the real one is unknown: CID 7000 and CID 7010.
_DEFAULT_TITLES = {
    "SR DOCUMENT": ("18748-4", "LN", "Diagnostic imaging report"),
    "KEY OBJECT DOC": ("113000", "DCM", "Of Interest"),
}
_INVENTED_TEXT = {
    "ContentLabel": "UNKNOWN",
    "StructureSetLabel": "UNKNOWN",
    "RTPlanLabel": "UNKNOWN",
    "CompletionFlag": "PARTIAL",
    "VerificationFlag": "UNVERIFIED",
}
_ASCII_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI", "UL", "US"})
_DATE_KEYS = ("ContentDate", "PresentationCreationDate", "InstanceCreationDate")
_TIME_KEYS = ("ContentTime", "PresentationCreationTime")

UNKNOWN_STUDY_DATE = "19000101"
UNKNOWN_STUDY_TIME = "000000"
_TIME = re.compile(r"([01][0-9]|2[0-3])([0-5][0-9]([0-5][0-9]|60)?)?(\.[0-9]{1,6})?")
_FILE_ID_PART = re.compile(r"[A-Z0-9_]{1,8}")
_FILESET_ID = re.compile(r"[A-Z0-9_ ]{0,16}")
#: Keys of the PATIENT, STUDY and SERIES records, in tag order: (keyword, tag, VR).
_RECORD_KEYS: dict[str, tuple[tuple[str, int, bytes], ...]] = {
    "PATIENT": (
        ("PatientName", 0x00100010, b"PN"),
        ("PatientID", 0x00100020, b"LO"),
        ("PatientBirthDate", 0x00100030, b"DA"),
        ("PatientSex", 0x00100040, b"CS"),
    ),
    "STUDY": (
        ("StudyDate", 0x00080020, b"DA"),
        ("StudyTime", 0x00080030, b"TM"),
        ("AccessionNumber", 0x00080050, b"SH"),
        ("StudyDescription", 0x00081030, b"LO"),
        ("StudyInstanceUID", 0x0020000D, b"UI"),
        ("StudyID", 0x00200010, b"SH"),
    ),
    "SERIES": (
        ("Modality", 0x00080060, b"CS"),
        ("SeriesDescription", 0x0008103E, b"LO"),
        ("SeriesInstanceUID", 0x0020000E, b"UI"),
        ("SeriesNumber", 0x00200011, b"IS"),
    ),
}
# Text values encoded without pydicom: printable ASCII (no backslash, so one value;
# no "=" in PN, whose empty trailing components pydicom drops) that fits its VR and
# passes pydicom's validation. Anything else goes through pydicom.
_DIRECT_VALUE = {
    vr: re.compile(pattern)
    for vr, pattern in (
        (b"PN", r"[ -<>-\[\]-~]{0,64}"),
        (b"LO", r"[ -\[\]-~]{0,64}"),
        (b"SH", r"[ -\[\]-~]{0,16}"),
        (b"CS", r"[A-Z0-9 _]{0,16}"),
        (b"DA", r"[0-9]{4}(0[1-9]|1[0-2])([0-2][0-9]|3[01])"),
        (b"TM", r"([01][0-9]|2[0-3])([0-5][0-9]((60|[0-5][0-9])(\.[0-9]{1,6})?)?)?"),
        (b"UI", r"(?=[0-9.]{1,64}\Z)(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*"),
    )
}
_IMPLEMENTATION_VERSION = f"STUDYVAULT {__version__}"[:16].encode("ascii")
_ITEM = b"\xfe\xff\x00\xe0"
_SEQUENCE = b"\x04\x00\x20\x12SQ\x00\x00"  # (0004,1220) Directory Record Sequence
_NEXT_TAG = b"\x04\x00\x00\x14"  # (0004,1400) at byte 0 of every record
_LOWER_TAG = b"\x04\x00\x20\x14"  # (0004,1420) at byte 22, after RecordInUseFlag


def record_type(sop_class_uid: str, modality: str = "") -> str:
    """Return the Directory Record Type for an instance's SOP class, e.g. ``SR DOCUMENT``.

    As pydicom's ``FileSet`` chooses, and by SOP class family (any SR, waveform,
    presentation state or encapsulated document class); unknown classes are ``IMAGE``.

    :param sop_class_uid: the instance's SOPClassUID.
    :param modality: the series' Modality (second-generation RT objects are found by it).
    """
    if modality in ("RTINTENT", "RTSEGANN", "RTRAD"):
        return "RADIOTHERAPY"
    if modality == "PLAN":
        return "PLAN"
    if sop_class_uid in SOP_CLASS_RECORD_TYPES:
        return SOP_CLASS_RECORD_TYPES[sop_class_uid]
    for prefix, rtype in _FAMILIES:
        if sop_class_uid.startswith(prefix):
            return rtype
    return "IMAGE"


def leaf_record_keys(ds: Dataset) -> Dataset:
    """Return the record-type keys of an instance that the index does not keep.

    Read the header with ``dcmread(path, stop_before_pixels=True)`` and pass the result
    to :func:`build_dicomdir` in *leaf_keys*, so non-IMAGE records carry real values.

    :param ds: the instance's data set.
    """
    rtype = record_type(str(ds.get("SOPClassUID", "")), str(ds.get("Modality", "")))
    keys = Dataset()
    if rtype == "IMAGE":  # the index holds all an IMAGE record needs
        return keys
    type1, type2 = _LEAF_KEYS.get(rtype, ((), ()))
    for kw in (*type1, *type2, *_CONDITIONAL_KEYS.get(rtype, ())):
        if kw in ds and not ds[kw].is_empty:
            keys[kw] = copy.deepcopy(ds[kw])
    if "SpecificCharacterSet" in ds and any(e.VR not in _ASCII_VRS for e in keys):
        keys.SpecificCharacterSet = ds.SpecificCharacterSet
    if rtype in ("SR DOCUMENT", "KEY OBJECT DOC"):
        # the record holds only the root's concept modifiers (PS3.3 F.5.21)
        mods = [
            i
            for i in ds.get("ContentSequence", [])
            if i.get("RelationshipType") == "HAS CONCEPT MOD"
        ]
        if mods:
            keys.ContentSequence = copy.deepcopy(mods)
    if rtype == "SR DOCUMENT" and ds.get("VerificationFlag") == "VERIFIED":
        times = [
            str(obs.VerificationDateTime)
            for obs in ds.get("VerifyingObserverSequence", [])
            if obs.get("VerificationDateTime")
        ]
        if times:
            keys.VerificationDateTime = max(times)
    return keys


def _study_date(value: str) -> str:
    return normalize_date(value) or UNKNOWN_STUDY_DATE


def _study_time(value: str) -> str:
    value = value.strip().replace(":", "")
    return value if _TIME.fullmatch(value) else UNKNOWN_STUDY_TIME


def _encodable(text: str, encodings: list[str]) -> bool:
    def one(char: str) -> bool:
        for enc in encodings:
            try:
                char.encode(enc)
                return True
            except (UnicodeError, LookupError):
                continue
        return False

    return all(char.isascii() or one(char) for char in text)


def _character_set(declared: str, texts: list[str]) -> str:
    """Keep the study's SpecificCharacterSet unless it cannot encode the values."""
    terms = [t.strip() for t in declared.split("\\")]
    valid = all(t == "" or t in python_encoding for t in terms)
    declared = "\\".join(terms) if valid else ""
    if all(t.isascii() for t in texts):
        return declared
    if declared and all(_encodable(t, convert_encodings(terms)) for t in texts):
        return declared
    return "ISO_IR 192"


def _record(rtype: str, charset: str | MutableSequence[str]) -> Dataset:
    rec = Dataset()
    rec.OffsetOfTheNextDirectoryRecord = 0
    rec.RecordInUseFlag = 0xFFFF
    rec.OffsetOfReferencedLowerLevelDirectoryEntity = 0
    rec.DirectoryRecordType = rtype
    if charset:
        rec.SpecificCharacterSet = charset
    return rec


def _patient_keys(study: StudyRecord) -> dict[str, Any]:
    keys: dict[str, Any] = {
        "PatientName": study.patient_name,
        "PatientID": study.patient_id or f"SV-{short_id(study.study_uid, 12).upper()}",
    }
    if birth_date := normalize_date(study.patient_birth_date):
        keys["PatientBirthDate"] = birth_date
    if study.patient_sex in ("M", "F", "O"):
        keys["PatientSex"] = study.patient_sex
    return keys


def _study_keys(study: StudyRecord) -> dict[str, Any]:
    return {
        "StudyDate": _study_date(study.study_date),
        "StudyTime": _study_time(study.study_time),
        "StudyDescription": study.study_description,
        "StudyInstanceUID": study.study_uid,
        "StudyID": study.study_id or f"SV-{short_id(study.study_uid, 8).upper()}",
        "AccessionNumber": study.accession_number,
    }


def _series_keys(first: InstanceRecord, position: int) -> dict[str, Any]:
    keys: dict[str, Any] = {
        "Modality": first.modality or "OT",
        "SeriesInstanceUID": first.series_uid,
        "SeriesNumber": first.series_number if first.series_number is not None else position,
    }
    if first.series_description:
        keys["SeriesDescription"] = first.series_description
    return keys


def _direct_record(rtype: str, keys: Mapping[str, Any]) -> bytes | None:
    """Encode a PATIENT, STUDY or SERIES record without pydicom, or None if it needs it.

    Only when every value is plain ASCII that fits its VR (see ``_DIRECT_VALUE``): then
    the bytes are pydicom's, some twenty times faster. Not for records that carry a
    SpecificCharacterSet (the caller does not try).
    """
    parts = [_RECORD_HEAD, _simple_element(0x00041430, b"CS", rtype.encode("ascii"))]
    for keyword, tag, vr in _RECORD_KEYS[rtype]:
        if keyword not in keys:
            continue
        value = keys[keyword]
        if vr == b"IS":
            if type(value) is not int or not -(2**31) <= value < 2**31:
                return None
            value = str(value)
        elif not isinstance(value, str) or not _DIRECT_VALUE[vr].fullmatch(value):
            return None
        parts.append(_simple_element(tag, vr, value.encode("ascii")))
    if len(parts) != len(keys) + 2:  # a key without a (tag, VR) in _RECORD_KEYS
        return None
    return b"".join(parts)


def _top_record(rtype: str, keys: Mapping[str, Any], charset: str) -> bytes:
    """Encode a PATIENT, STUDY or SERIES record: directly if it can, else with pydicom."""
    if not charset and (direct := _direct_record(rtype, keys)) is not None:
        return direct
    rec = _record(rtype, charset)
    for keyword, value in keys.items():
        setattr(rec, keyword, value)
    return _encode(rec)


def _invented(keyword: str, rtype: str, inst: InstanceRecord, study: StudyRecord) -> Any:
    if keyword in _DATE_KEYS:
        return _study_date(study.study_date)
    if keyword in _TIME_KEYS:
        return _study_time(study.study_time)
    if keyword == "MIMETypeOfEncapsulatedDocument":
        return _MIME_TYPES.get(inst.sop_class_uid, "application/octet-stream")
    if keyword == "ConceptNameCodeSequence" and rtype in _DEFAULT_TITLES:
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = _DEFAULT_TITLES[rtype]
        return [code]
    return _INVENTED_TEXT.get(keyword)


def _simple_element(tag: int, vr: bytes, value: bytes) -> bytes:
    """Encode one short-VR element in Explicit VR Little Endian, padded to even length."""
    if len(value) % 2:
        value += b"\0" if vr == b"UI" else b" "
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value


# (0004,1400), (0004,1410) and (0004,1420) of every record, offsets still zero
_RECORD_HEAD = b"".join(
    (
        _simple_element(0x00041400, b"UL", b"\0\0\0\0"),
        _simple_element(0x00041410, b"US", b"\xff\xff"),
        _simple_element(0x00041420, b"UL", b"\0\0\0\0"),
    )
)


def _image_record(inst: InstanceRecord, parts: list[str], number: int) -> bytes | None:
    """Encode an IMAGE record made only from the index, or None if it needs pydicom.

    Nearly every record of a study is one of these; encoding them directly is some
    ten times faster than through a pydicom Dataset and gives the same bytes.
    """
    refs = (inst.sop_class_uid, inst.sop_uid, inst.transfer_syntax)
    if not all(u.isascii() and len(u) <= 64 for u in refs) or len(str(number)) > 12:
        return None
    return b"".join(
        (
            _RECORD_HEAD,
            _simple_element(0x00041430, b"CS", b"IMAGE"),
            _simple_element(0x00041500, b"CS", "\\".join(parts).encode("ascii")),
            _simple_element(0x00041510, b"UI", refs[0].encode("ascii")),
            _simple_element(0x00041511, b"UI", refs[1].encode("ascii")),
            _simple_element(0x00041512, b"UI", refs[2].encode("ascii")),
            _simple_element(0x00200013, b"IS", str(number).encode("ascii")),
        )
    )


def _leaf_record(
    inst: InstanceRecord,
    file_id: str,
    position: int,
    study: StudyRecord,
    given: Dataset | None,
) -> bytes:
    if not inst.sop_class_uid or not inst.transfer_syntax:
        msg = (
            f"instance {inst.sop_uid} has no SOP class or transfer syntax in the index; "
            "a DICOM file-set holds only PS3.10 files"
        )
        raise NotDicomError(msg)
    parts = file_id.split("/")
    if len(parts) > 8 or not all(_FILE_ID_PART.fullmatch(p) for p in parts):
        msg = f"file ID {file_id!r} is not PS3.10 (at most 8 parts of 1-8 of A-Z 0-9 _)"
        raise ValueError(msg)
    number = inst.instance_number if inst.instance_number is not None else position
    rtype = record_type(inst.sop_class_uid, inst.modality)
    if rtype == "IMAGE" and not given:
        fast = _image_record(inst, parts, number)
        if fast is not None:
            return fast
    given = given if given is not None else Dataset()
    # index-derived leaf keys are UIDs and numbers: only given keys may need a charset
    rec = _record(rtype, given.get("SpecificCharacterSet") or "")
    rec.ReferencedFileID = parts
    rec.ReferencedSOPClassUIDInFile = inst.sop_class_uid
    rec.ReferencedSOPInstanceUIDInFile = inst.sop_uid
    rec.ReferencedTransferSyntaxUIDInFile = inst.transfer_syntax
    type1, type2 = _LEAF_KEYS[rtype]
    for elem in given:
        # groups 0002/0004 belong to the file-set, not to a record's keys
        if elem.tag.group > 0x0004 and elem.keyword != "SpecificCharacterSet":
            rec[elem.tag] = elem
    for kw in type1:
        if kw in rec and not rec[kw].is_empty:
            continue
        if kw == "InstanceNumber":
            rec.InstanceNumber = number
        elif (value := _invented(kw, rtype, inst, study)) is not None:
            setattr(rec, kw, value)
    for kw in type2:
        if kw not in rec:
            setattr(rec, kw, None)
    return _encode(rec)


def _encode(ds: Dataset) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    write_dataset(fp, ds)
    return fp.getvalue()


def _file_meta(instance_uid: str) -> bytes:
    """Encode the preamble and File Meta Information of a DICOMDIR.

    The bytes pydicom's ``write_file_meta_info(..., enforce_standard=True)`` writes
    after the preamble; all values but *instance_uid* are constant.
    """
    elements = b"".join(
        (
            struct.pack("<HH2sHI", 0x0002, 0x0001, b"OB", 0, 2) + b"\0\1",  # version 1
            _simple_element(0x00020002, b"UI", uids.MediaStorageDirectoryStorage.encode()),
            _simple_element(0x00020003, b"UI", instance_uid.encode("ascii")),
            _simple_element(0x00020010, b"UI", uids.ExplicitVRLittleEndian.encode()),
            _simple_element(0x00020012, b"UI", uids.PYDICOM_IMPLEMENTATION_UID.encode()),
            _simple_element(0x00020013, b"SH", _IMPLEMENTATION_VERSION),
        )
    )
    group_length = _simple_element(0x00020000, b"UL", struct.pack("<I", len(elements)))
    return b"".join((b"\0" * 128, b"DICM", group_length, elements))


def _tree(
    study: StudyRecord,
    entries: Sequence[tuple[InstanceRecord, str]],
    leaf_keys: Mapping[str, Dataset],
) -> tuple[list[bytes], list[int | None], list[int | None]]:
    """Return the encoded records in file order and, per record, its next and first-child."""
    series: dict[str, list[tuple[InstanceRecord, str]]] = {}
    sop_uids = [inst.sop_uid for inst, _ in entries]
    file_ids = [file_id for _, file_id in entries]
    for what, values in (("SOPInstanceUID", sop_uids), ("file ID", file_ids)):
        if len(set(values)) < len(values):
            msg = f"a {what} is listed twice in the DICOMDIR entries of study {study.study_uid}"
            raise ValueError(msg)
    for inst, file_id in entries:
        if inst.study_uid != study.study_uid:
            msg = (
                f"instance {inst.sop_uid} belongs to study {inst.study_uid}, not {study.study_uid}"
            )
            raise ValueError(msg)
        series.setdefault(inst.series_uid, []).append((inst, file_id))
    texts = [
        study.patient_name,
        study.patient_id,
        study.study_description,
        study.study_id,
        study.accession_number,
        *(g[0][0].series_description for g in series.values()),
    ]
    charset = _character_set(study.specific_character_set, texts)
    records = [
        _top_record("PATIENT", _patient_keys(study), charset),
        _top_record("STUDY", _study_keys(study), charset),
    ]
    nxt: list[int | None] = [None, None]
    lower: list[int | None] = [1, None]
    previous_series: int | None = None
    for s_pos, members in enumerate(series.values(), start=1):
        index = len(records)
        if previous_series is None:
            lower[1] = index
        else:
            nxt[previous_series] = index
        previous_series = index
        records.append(_top_record("SERIES", _series_keys(members[0][0], s_pos), charset))
        nxt.append(None)
        lower.append(index + 1)
        for i_pos, (inst, file_id) in enumerate(members, start=1):
            given = leaf_keys.get(inst.sop_uid)
            records.append(_leaf_record(inst, file_id, i_pos, study, given))
            nxt.append(len(records) if i_pos < len(members) else None)
            lower.append(None)
    return records, nxt, lower


def build_dicomdir(
    study: StudyRecord,
    entries: Sequence[tuple[InstanceRecord, str]],
    *,
    fileset_id: str = "",
    leaf_keys: Mapping[str, Dataset] | None = None,
) -> bytes:
    """Encode the DICOMDIR of one study: PATIENT, STUDY, SERIES and one leaf per instance.

    Series and instances keep the order of *entries* (as :func:`~studyvault.naming.
    assign_file_ids` returns them). The same input always gives the same bytes.

    :param study: the study.
    :param entries: (instance, file ID with ``/`` separators) for every instance.
    :param fileset_id: the File-set ID: up to 16 of A-Z 0-9 _ and space.
    :param leaf_keys: per SOPInstanceUID, :func:`leaf_record_keys` of its header.
    :raises ValueError: for a bad File-set ID or file ID, or an instance of another study.
    :raises NotDicomError: if an instance has no SOP class or transfer syntax.
    """
    if not _FILESET_ID.fullmatch(fileset_id):
        msg = f"File-set ID {fileset_id!r} is not up to 16 of A-Z 0-9 _ and space"
        raise ValueError(msg)
    records, nxt, lower = _tree(study, entries, leaf_keys or {})

    prefix = _file_meta(
        uids.generate_uid(
            entropy_srcs=["studyvault DICOMDIR", study.study_uid, fileset_id]
            + [f"{inst.sop_uid}={file_id}" for inst, file_id in entries]
        )
    )
    fileset = _simple_element(0x00041130, b"CS", fileset_id.encode("ascii"))

    def header(first: int) -> bytes:
        offset = struct.pack("<I", first)
        return b"".join(
            (
                fileset,
                _simple_element(0x00041200, b"UL", offset),  # first and last root record:
                _simple_element(0x00041202, b"UL", offset),  # the PATIENT record
                _simple_element(0x00041212, b"US", b"\0\0"),  # FileSetConsistencyFlag
            )
        )

    # Offsets count from the first byte of the file; the header's size does not
    # depend on the offset values, so its size with a zero offset fixes every position.
    start = len(prefix) + len(header(0)) + len(_SEQUENCE) + 4
    encoded = [bytearray(rec) for rec in records]
    offsets = []
    for data in encoded:
        offsets.append(start)
        start += 8 + len(data)
    for data, n, low in zip(encoded, nxt, lower, strict=True):
        if data[0:4] != _NEXT_TAG or data[22:26] != _LOWER_TAG:
            raise AssertionError("directory record offsets are not where expected")
        struct.pack_into("<I", data, 8, offsets[n] if n is not None else 0)
        struct.pack_into("<I", data, 30, offsets[low] if low is not None else 0)
    items = b"".join(_ITEM + struct.pack("<I", len(data)) + data for data in encoded)
    return b"".join((prefix, header(offsets[0]), _SEQUENCE, struct.pack("<I", len(items)), items))


def write_dicomdir(
    path: Path,
    study: StudyRecord,
    entries: Sequence[tuple[InstanceRecord, str]],
    *,
    fileset_id: str = "",
    leaf_keys: Mapping[str, Dataset] | None = None,
) -> None:
    """Write :func:`build_dicomdir` to *path* durably: temporary file, fsync, rename.

    :param path: where the DICOMDIR goes, normally ``<study folder>/DICOMDIR``.
    :param study: see :func:`build_dicomdir`, as are the other parameters.
    """
    data = build_dicomdir(study, entries, fileset_id=fileset_id, leaf_keys=leaf_keys)
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if os.name == "posix":
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
