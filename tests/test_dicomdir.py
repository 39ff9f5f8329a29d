"""A study folder's DICOMDIR, built from index records, is read by DCMTK, dicom3tools, pydicom."""

from __future__ import annotations

import shutil
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom import dcmread, uid
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.fileset import FileSet
from pydicom.filewriter import write_dataset, write_file_meta_info

import studyvault
from studyvault import dicomdir
from studyvault.dicomdir import build_dicomdir, leaf_record_keys, record_type, write_dicomdir
from studyvault.errors import NotDicomError
from studyvault.naming import assign_file_ids
from studyvault.records import InstanceRecord, StudyRecord

needs_dcmtk = pytest.mark.usefixtures("dcmtk")
needs_dicom3tools = pytest.mark.usefixtures("dicom3tools")


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def make_instance(study: StudyRecord, kind: str, series_uid: str, **attrs: object) -> Dataset:
    """Return a small but real instance of *study*: ``ct``, ``sc``, ``sr`` or ``pdf``."""
    sop_class = {
        "ct": uid.CTImageStorage,
        "sc": uid.SecondaryCaptureImageStorage,
        "sr": uid.BasicTextSRStorage,
        "pdf": uid.EncapsulatedPDFStorage,
    }[kind]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    if study.specific_character_set:
        ds.SpecificCharacterSet = study.specific_character_set
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, uid.generate_uid()
    ds.PatientName, ds.PatientID = study.patient_name, study.patient_id
    ds.PatientBirthDate, ds.PatientSex = "", ""
    ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime = (
        study.study_uid,
        study.study_date,
        study.study_time,
    )
    ds.StudyID, ds.AccessionNumber = study.study_id, study.accession_number
    ds.ReferringPhysicianName = ""
    ds.SeriesInstanceUID = series_uid
    ds.Modality = {"ct": "CT", "sc": "OT", "sr": "SR", "pdf": "DOC"}[kind]
    ds.SeriesNumber, ds.InstanceNumber = None, None
    if kind in ("ct", "sc"):
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows = ds.Columns = 2
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = bytes([0, 64, 128, 255])
    if kind == "ct":
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.RescaleIntercept, ds.RescaleSlope, ds.KVP = -1024, 1, 120
        ds.PixelData = bytes(8)
    if kind == "sr":
        ds.ContentDate, ds.ContentTime = "20230105", "101500"
        ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "VERIFIED"
        observer = Dataset()
        observer.VerifyingObserverName = "REVIEWER^ANNA"
        observer.VerificationDateTime = "20230105120000"
        observer.VerifyingOrganization = "Clinic"
        ds.VerifyingObserverSequence = [observer]
        ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
        ds.ConceptNameCodeSequence = [_code("11528-7", "LN", "Radiology Report")]
        language = Dataset()
        language.RelationshipType, language.ValueType = "HAS CONCEPT MOD", "CODE"
        language.ConceptNameCodeSequence = [_code("121049", "DCM", "Language of Content")]
        language.ConceptCodeSequence = [_code("en", "RFC5646", "English")]
        finding = Dataset()
        finding.RelationshipType, finding.ValueType = "CONTAINS", "TEXT"
        finding.ConceptNameCodeSequence = [_code("121071", "DCM", "Finding")]
        finding.TextValue = "No acute findings."
        ds.ContentSequence = [language, finding]
    if kind == "pdf":
        ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
        ds.DocumentTitle = "Referral letter"
        ds.ConceptNameCodeSequence = []
        ds.EncapsulatedDocument = b"%PDF-1.4\n%%EOF\n"
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return ds


def record_of(ds: Dataset) -> InstanceRecord:
    """Index record of an instance, as the header reader makes it."""

    def number(keyword: str) -> int | None:
        value = ds.get(keyword)
        return None if value is None or value == "" else int(value)

    return InstanceRecord(
        study_uid=ds.StudyInstanceUID,
        series_uid=ds.SeriesInstanceUID,
        sop_uid=ds.SOPInstanceUID,
        sop_class_uid=ds.SOPClassUID,
        transfer_syntax=ds.file_meta.TransferSyntaxUID,
        series_number=number("SeriesNumber"),
        modality=ds.Modality,
        series_description=str(ds.get("SeriesDescription", "")),
        instance_number=number("InstanceNumber"),
    )


def lay_out_study(
    folder: Path, study: StudyRecord, datasets: list[Dataset], **kwargs: object
) -> list[tuple[InstanceRecord, str]]:
    """Save every instance under its file ID and write the DICOMDIR, as an archive does."""
    by_uid = {ds.SOPInstanceUID: ds for ds in datasets}
    entries = assign_file_ids([record_of(ds) for ds in datasets])
    for inst, file_id in entries:
        path = folder / file_id
        path.parent.mkdir(parents=True, exist_ok=True)
        by_uid[inst.sop_uid].save_as(path, enforce_file_format=True)
    write_dicomdir(folder / "DICOMDIR", study, entries, **kwargs)  # type: ignore[arg-type]
    return entries


@pytest.fixture
def full_study(tmp_path: Path) -> Iterator[tuple[Path, StudyRecord, list[Dataset]]]:
    """A CT series, a secondary capture, a Basic Text SR and a PDF, with a Japanese name."""
    study = StudyRecord(
        study_uid=uid.generate_uid(),
        patient_name="Yamada^Tarou=山田^太郎",
        patient_id="PAT-0001",
        study_date="20230105",
        study_time="101010",
        study_id="4711",
        study_description="CT Thorax",
        accession_number="ACC123",
        specific_character_set="ISO_IR 192",
    )
    ct, sc, sr, doc = (uid.generate_uid() for _ in range(4))
    datasets = [
        make_instance(study, "ct", ct, SeriesNumber=2, InstanceNumber=n, SeriesDescription="胸部")
        for n in (3, 1, 2)
    ]
    datasets.append(make_instance(study, "sc", sc, SeriesNumber=1, InstanceNumber=1))
    datasets.append(make_instance(study, "sr", sr, SeriesNumber=99, InstanceNumber=1))
    datasets.append(make_instance(study, "pdf", doc, SeriesNumber=100, InstanceNumber=1))
    folder = tmp_path / "study"
    folder.mkdir()
    yield folder, study, datasets


def dciodvfy_errors(path: Path) -> list[str]:
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, check=False)
    lines = (run.stdout + run.stderr).decode("utf-8", errors="replace").splitlines()
    return [line for line in lines if line.startswith("Error")]


def assert_fileset_readable(folder: Path, datasets: list[Dataset]) -> FileSet:
    """What a viewer does: open the DICOMDIR and load every instance it lists."""
    fs = FileSet(dcmread(folder / "DICOMDIR"))
    assert len(fs) == len(datasets)
    loaded = set()
    for instance in fs:
        assert Path(instance.path).is_file()
        ds = instance.load()
        assert ds.SOPInstanceUID == instance.SOPInstanceUID
        assert ds.SOPClassUID == instance.ReferencedSOPClassUIDInFile
        loaded.add(ds.SOPInstanceUID)
    assert loaded == {ds.SOPInstanceUID for ds in datasets}
    return fs


def test_viewer_opens_every_instance_of_an_archived_study(full_study) -> None:
    folder, study, datasets = full_study
    lay_out_study(folder, study, datasets, fileset_id="STUDYVAULT")

    fs = assert_fileset_readable(folder, datasets)
    assert fs.ID == "STUDYVAULT"
    assert str(fs.find(PatientID="PAT-0001")[0].PatientName) == "Yamada^Tarou=山田^太郎"
    records = dcmread(folder / "DICOMDIR").DirectoryRecordSequence
    types = [rec.DirectoryRecordType for rec in records]
    assert types[:2] == ["PATIENT", "STUDY"]
    assert types.count("SERIES") == 4
    assert types.count("IMAGE") == 4
    assert "SR DOCUMENT" in types and "ENCAP DOC" in types
    assert records[0].SpecificCharacterSet == "ISO_IR 192"
    study_rec = records[1]
    assert (study_rec.StudyDate, study_rec.StudyTime, study_rec.StudyID) == (
        "20230105",
        "101010",
        "4711",
    )
    assert study_rec.AccessionNumber == "ACC123"


def test_records_are_linked_by_correct_byte_offsets(full_study) -> None:
    folder, study, datasets = full_study
    entries = lay_out_study(folder, study, datasets)
    ds = dcmread(folder / "DICOMDIR")
    by_offset = {rec.seq_item_tell: rec for rec in ds.DirectoryRecordSequence}
    first = ds.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity
    assert first == ds.OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity
    assert ds.FileSetConsistencyFlag == 0

    def walk(offset: int) -> Iterator[Dataset]:
        while offset:
            rec = by_offset[offset]
            assert rec.RecordInUseFlag == 0xFFFF
            yield rec
            yield from walk(rec.OffsetOfReferencedLowerLevelDirectoryEntity)
            offset = rec.OffsetOfTheNextDirectoryRecord

    walked = list(walk(first))
    assert len(walked) == len(ds.DirectoryRecordSequence)
    leaves = [rec for rec in walked if "ReferencedFileID" in rec]
    assert [rec.ReferencedSOPInstanceUIDInFile for rec in leaves] == [
        inst.sop_uid for inst, _ in entries
    ]
    assert ["/".join(rec.ReferencedFileID) for rec in leaves] == [fid for _, fid in entries]
    # series come in SeriesNumber order, instances in InstanceNumber order
    assert [r.SeriesNumber for r in walked if r.DirectoryRecordType == "SERIES"] == [1, 2, 99, 100]
    ct = [
        r.InstanceNumber
        for r in walked
        if r.get("ReferencedSOPClassUIDInFile") == uid.CTImageStorage
    ]
    assert ct == [1, 2, 3]


@needs_dcmtk
def test_dcmtk_reads_the_dicomdir_and_every_file(full_study) -> None:
    folder, study, datasets = full_study
    entries = lay_out_study(folder, study, datasets)
    run = subprocess.run(
        ["dcmdump", "-dc", str(folder / "DICOMDIR")], capture_output=True, check=False
    )
    assert run.returncode == 0, run.stderr
    assert run.stderr == b""
    out = run.stdout.decode("utf-8")
    for inst, file_id in entries:
        assert inst.sop_uid in out
        assert file_id.replace("/", "\\") in out
    assert "山田^太郎" in out
    assert "SR DOCUMENT" in out and "ENCAP DOC" in out
    search = ["dcmdump", "-dc", "+P", "0004,1511", str(folder / "DICOMDIR")]
    run = subprocess.run(search, capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    listed = [line.split("[")[1].split("]")[0].rstrip("\0") for line in run.stdout.splitlines()]
    assert listed == [inst.sop_uid for inst, _ in entries]
    files = [str(folder / fid) for _, fid in entries] + [str(folder / "DICOMDIR")]
    run = subprocess.run(["dcmftest", *files], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stdout
    assert [line.split(":")[0] for line in run.stdout.splitlines()] == ["yes"] * len(files)


@needs_dcmtk
def test_dcmtk_finds_the_records_consistent_with_the_files(full_study, tmp_path: Path) -> None:
    folder, study, datasets = full_study
    keys = {ds.SOPInstanceUID: leaf_record_keys(ds) for ds in datasets}
    entries = lay_out_study(folder, study, datasets, leaf_keys=keys)
    # dcmmkdir --append walks our DICOMDIR by its offsets, then compares every file
    # it is given with the record it finds for it (it rewrites the DICOMDIR: use a copy)
    copy = shutil.copytree(folder, tmp_path / "copy")
    files = [fid for _, fid in entries]
    run = subprocess.run(
        ["dcmmkdir", "+A", "-Pgp", *files], cwd=copy, capture_output=True, text=True, check=False
    )
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    assert out.count("directory record for this SOP instance already exists") == len(files)
    assert "inconsistent" not in out and "E:" not in out


@needs_dicom3tools
def test_dicom3tools_finds_no_error(full_study) -> None:
    folder, study, datasets = full_study
    entries = lay_out_study(folder, study, datasets)
    assert dciodvfy_errors(folder / "DICOMDIR") == []
    # dcdirdmp follows the offsets from the root and prints every referenced file
    run = subprocess.run(
        ["dcdirdmp", str(folder / "DICOMDIR")], capture_output=True, text=True, check=False
    )
    listing = run.stdout + run.stderr  # dcdirdmp writes its listing to stderr
    assert "Error" not in listing
    for _, file_id in entries:
        assert file_id.replace("/", "\\") in listing


@needs_dicom3tools
def test_study_missing_optional_attributes_still_makes_a_valid_dicomdir(tmp_path: Path) -> None:
    study = StudyRecord(study_uid=uid.generate_uid())  # no name, ID, date, time, study ID
    series = uid.generate_uid()
    datasets = [make_instance(study, "ct", series) for _ in range(3)]
    datasets.append(make_instance(study, "sr", uid.generate_uid()))
    lay_out_study(tmp_path, study, datasets)

    assert dciodvfy_errors(tmp_path / "DICOMDIR") == []
    assert_fileset_readable(tmp_path, datasets)
    records = dcmread(tmp_path / "DICOMDIR").DirectoryRecordSequence
    patient, study_rec = records[0], records[1]
    assert patient.PatientID.startswith("SV-") and patient.PatientName == ""
    assert (study_rec.StudyDate, study_rec.StudyTime) == ("19000101", "000000")
    assert study_rec.StudyID.startswith("SV-")
    numbers = [r.InstanceNumber for r in records if r.DirectoryRecordType == "IMAGE"]
    assert numbers == [1, 2, 3]
    assert [r.SeriesNumber for r in records if r.DirectoryRecordType == "SERIES"] == [1, 2]
    sr = next(r for r in records if r.DirectoryRecordType == "SR DOCUMENT")
    assert (sr.CompletionFlag, sr.VerificationFlag) == ("PARTIAL", "UNVERIFIED")
    # the invented values are stable: the same study gives the same DICOMDIR
    again = build_dicomdir(study, assign_file_ids([record_of(ds) for ds in datasets]))
    assert again == (tmp_path / "DICOMDIR").read_bytes()


@needs_dicom3tools
def test_real_sr_keys_are_recorded_when_given(full_study) -> None:
    folder, study, datasets = full_study
    keys = {ds.SOPInstanceUID: leaf_record_keys(ds) for ds in datasets}
    lay_out_study(folder, study, datasets, leaf_keys=keys)

    assert dciodvfy_errors(folder / "DICOMDIR") == []
    assert_fileset_readable(folder, datasets)
    records = dcmread(folder / "DICOMDIR").DirectoryRecordSequence
    sr = next(r for r in records if r.DirectoryRecordType == "SR DOCUMENT")
    assert (sr.CompletionFlag, sr.VerificationFlag) == ("COMPLETE", "VERIFIED")
    assert sr.VerificationDateTime == "20230105120000"
    assert sr.ConceptNameCodeSequence[0].CodeValue == "11528-7"
    assert [item.RelationshipType for item in sr.ContentSequence] == ["HAS CONCEPT MOD"]
    doc = next(r for r in records if r.DirectoryRecordType == "ENCAP DOC")
    assert doc.DocumentTitle == "Referral letter"
    assert doc.MIMETypeOfEncapsulatedDocument == "application/pdf"
    assert len(leaf_record_keys(datasets[0])) == 0  # the index holds all an IMAGE needs


@needs_dicom3tools
@pytest.mark.parametrize(
    ("name", "declared", "written"),
    [
        ("山田^太郎", "ISO_IR 192", "ISO_IR 192"),
        ("Διονυσιος", "ISO_IR 126", "ISO_IR 126"),
        ("Müller^Jürgen", "ISO_IR 100", "ISO_IR 100"),
        ("Yamada^Tarou=山田^太郎=やまだ^たろう", "\\ISO 2022 IR 87", "\\ISO 2022 IR 87"),
        ("Διονυσιος", "", "ISO_IR 192"),  # undeclared: stored as UTF-8, not mangled
        ("Διονυσιος", "ISO_IR 100", "ISO_IR 192"),  # Latin-1 cannot hold Greek
    ],
)
def test_non_ascii_patient_names_round_trip(
    tmp_path: Path, name: str, declared: str, written: str
) -> None:
    study = StudyRecord(
        study_uid=uid.generate_uid(),
        patient_name=name,
        patient_id="P1",
        study_date="20200202",
        specific_character_set=declared,
    )
    datasets = [make_instance(study, "sc", uid.generate_uid())]
    if written != declared:  # the instance itself was written by a better sender
        datasets[0].SpecificCharacterSet = written
    lay_out_study(tmp_path, study, datasets)

    patient = dcmread(tmp_path / "DICOMDIR").DirectoryRecordSequence[0]
    charset = patient.SpecificCharacterSet
    assert (charset if isinstance(charset, str) else "\\".join(charset)) == written
    assert str(patient.PatientName) == name
    assert dciodvfy_errors(tmp_path / "DICOMDIR") == []


def test_index_only_image_records_match_pydicom_encoding(full_study) -> None:
    folder, study, datasets = full_study
    lay_out_study(folder, study, datasets)
    raw = (folder / "DICOMDIR").read_bytes()
    for rec in dcmread(folder / "DICOMDIR").DirectoryRecordSequence:
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        write_dataset(fp, rec)
        length = int.from_bytes(raw[rec.seq_item_tell + 4 : rec.seq_item_tell + 8], "little")
        assert raw[rec.seq_item_tell + 8 : rec.seq_item_tell + 8 + length] == fp.getvalue()


def test_large_study_builds_from_records_only() -> None:
    study = StudyRecord(study_uid="1.2.3", patient_name="DOE^JANE", patient_id="7")
    instances = [
        InstanceRecord(
            study_uid="1.2.3",
            series_uid=f"1.2.3.{n // 250}",
            sop_uid=f"1.2.3.{n // 250}.{n}",
            sop_class_uid=uid.CTImageStorage,
            transfer_syntax=uid.ExplicitVRLittleEndian,
            modality="CT",
            series_number=n // 250,
            instance_number=n,
        )
        for n in range(2000)
    ]
    data = build_dicomdir(study, assign_file_ids(instances))
    ds = dcmread(DicomBytesIO(data))
    assert len(ds.DirectoryRecordSequence) == 2 + 8 + 2000
    assert ds.DirectoryRecordSequence[-1].ReferencedFileID == ["DICOM", "S0000008", "I0000250"]


def test_rewriting_replaces_the_dicomdir_and_leaves_no_temporary_file(full_study) -> None:
    folder, study, datasets = full_study
    entries = lay_out_study(folder, study, datasets)
    before = (folder / "DICOMDIR").read_bytes()
    write_dicomdir(folder / "DICOMDIR", study, entries[:1])
    assert len(dcmread(folder / "DICOMDIR").DirectoryRecordSequence) == 2 + 1 + 1
    assert (folder / "DICOMDIR").read_bytes() != before
    with pytest.raises(ValueError, match="file ID"):
        write_dicomdir(folder / "DICOMDIR", study, [(entries[0][0], "dicom/../../x")])
    assert len(dcmread(folder / "DICOMDIR").DirectoryRecordSequence) == 4
    assert sorted(p.name for p in folder.iterdir()) == ["DICOM", "DICOMDIR"]


@given(
    name=st.text(
        st.characters(exclude_categories=("Cc", "Cs"), exclude_characters="\\="), max_size=60
    ),
    description=st.text(
        st.characters(exclude_categories=("Cc", "Cs"), exclude_characters="\\"), max_size=60
    ),
)
@settings(max_examples=150, deadline=None)
def test_any_names_round_trip_through_the_dicomdir(name: str, description: str) -> None:
    study = StudyRecord(study_uid="1.2.3", patient_name=name, study_description=description)
    inst = InstanceRecord(
        study_uid="1.2.3",
        series_uid="1.2.3.1",
        sop_uid="1.2.3.1.1",
        sop_class_uid=uid.CTImageStorage,
        transfer_syntax=uid.ExplicitVRLittleEndian,
    )
    records = dcmread(DicomBytesIO(build_dicomdir(study, [(inst, "I1")]))).DirectoryRecordSequence
    assert str(records[0].PatientName) == name.rstrip(" ")
    assert records[1].StudyDescription.strip(" ") == description.strip(" ")  # LO: spaces pad


def test_bad_input_is_refused_with_a_clear_error() -> None:
    study = StudyRecord(study_uid="1.2.3")
    inst = InstanceRecord(study_uid="1.2.3", series_uid="1.2.3.1", sop_uid="1.2.3.1.1")
    with pytest.raises(NotDicomError, match="1.2.3.1.1"):
        build_dicomdir(study, [(inst, "DICOM/I1")])
    good = InstanceRecord(
        study_uid="1.2.3",
        series_uid="1.2.3.1",
        sop_uid="1.2.3.1.1",
        sop_class_uid=uid.CTImageStorage,
        transfer_syntax=uid.ExplicitVRLittleEndian,
    )
    for file_id in ("DICOM/TOOLONGNAME", "dicom/i1", "A/B/C/D/E/F/G/H/I", "/DICOM", "DICOM//I1"):
        with pytest.raises(ValueError, match="file ID"):
            build_dicomdir(study, [(good, file_id)])
    with pytest.raises(ValueError, match="File-set ID"):
        build_dicomdir(study, [(good, "DICOM/I1")], fileset_id="../x")
    with pytest.raises(ValueError, match="listed twice"):
        build_dicomdir(study, [(good, "DICOM/I1"), (good, "DICOM/I2")])
    other = StudyRecord(study_uid="9.9")
    with pytest.raises(ValueError, match="belongs to study"):
        build_dicomdir(other, [(good, "DICOM/I1")])


@pytest.mark.parametrize(
    ("sop_class", "modality", "expected"),
    [
        (uid.CTImageStorage, "CT", "IMAGE"),
        (uid.SecondaryCaptureImageStorage, "OT", "IMAGE"),
        (uid.BasicTextSRStorage, "SR", "SR DOCUMENT"),
        (uid.Comprehensive3DSRStorage, "SR", "SR DOCUMENT"),
        (uid.KeyObjectSelectionDocumentStorage, "KO", "KEY OBJECT DOC"),
        (uid.GrayscaleSoftcopyPresentationStateStorage, "PR", "PRESENTATION"),
        (uid.TwelveLeadECGWaveformStorage, "ECG", "WAVEFORM"),
        (uid.EncapsulatedPDFStorage, "DOC", "ENCAP DOC"),
        (uid.RTPlanStorage, "RTPLAN", "RT PLAN"),
        (uid.RTDoseStorage, "RTDOSE", "RT DOSE"),
        ("1.2.3.4.5", "OT", "IMAGE"),
    ],
)
def test_record_type_follows_the_sop_class(sop_class: str, modality: str, expected: str) -> None:
    assert record_type(sop_class, modality) == expected


# Direct encoding of the PATIENT, STUDY and SERIES records, the header and the file meta
# (instead of pydicom's Dataset + write_dataset) must give pydicom's bytes exactly.

_PRINTABLE = st.characters(min_codepoint=0x20, max_codepoint=0x7E)


def _texts(limit: int) -> st.SearchStrategy[str]:
    """Mostly printable ASCII around the VR's *limit*, sometimes anything."""
    return st.one_of(
        st.text(_PRINTABLE, max_size=limit + 4),
        st.text(_PRINTABLE, min_size=limit - 1, max_size=limit + 1),
        st.text(st.characters(exclude_categories=("Cs",)), max_size=limit + 4),
    )


_UIDS = st.one_of(
    st.lists(st.integers(0, 10**12), min_size=2, max_size=8).map(lambda n: ".".join(map(str, n))),
    st.sampled_from(["1.02.3", "1..2", "1.2.", "1.2.3 ", "1." * 31 + "12", "1." * 32 + "1"]),
)
_DATES = st.one_of(
    st.just(""),
    st.dates().map(lambda d: f"{d.year:04d}{d.month:02d}{d.day:02d}"),
    st.dates().map(lambda d: d.isoformat()),
    st.text(st.characters(min_codepoint=0x2D, max_codepoint=0x39), max_size=10),
)
_TIMES = st.one_of(
    st.just(""),
    st.from_regex(r"([01][0-9]|2[0-3])([0-5][0-9]([0-5][0-9](\.[0-9]{1,6})?)?)?", fullmatch=True),
    st.sampled_from(["10.5", "1030.5", "10:30:15", "240000", "1060", "103060", " 1030 "]),
    st.text(max_size=8),
)
_SERIES = st.tuples(
    _UIDS,
    st.sampled_from(["", "CT", "OT", "MR", "SR", "ct", "C-T", "SEVENTEEN_CHARS_X", "ÜS"]),
    _texts(64),
    st.one_of(st.none(), st.integers(-(2**31) - 1, 2**31), st.integers(-(10**13), 10**13)),
    st.integers(1, 3),
)
_STUDIES = st.builds(
    StudyRecord,
    study_uid=_UIDS,
    patient_name=st.one_of(_texts(64), st.sampled_from(["DOE^JANE=", "A=B", "A\\B", "DOE^J="])),
    patient_id=_texts(64),
    patient_birth_date=_DATES,
    patient_sex=st.sampled_from(["", "M", "F", "O", "X", "m"]),
    study_date=_DATES,
    study_time=_TIMES,
    study_id=_texts(16),
    study_description=_texts(64),
    accession_number=_texts(16),
    specific_character_set=st.sampled_from(
        ["", "", "", "ISO_IR 100", "ISO_IR 192", "\\ISO 2022 IR 87", "bogus"]
    ),
)


def _entries(study: StudyRecord, series: list[tuple]) -> list[tuple[InstanceRecord, str]]:
    entries = []
    for s, (series_uid, modality, description, number, count) in enumerate(series, start=1):
        for i in range(1, count + 1):
            inst = InstanceRecord(
                study_uid=study.study_uid,
                series_uid=series_uid,
                sop_uid=f"1.2.9.{s}.{i}",
                sop_class_uid=uid.SecondaryCaptureImageStorage,
                transfer_syntax=uid.ExplicitVRLittleEndian,
                modality=modality,
                series_description=description,
                series_number=number,
                instance_number=i,
            )
            entries.append((inst, f"DICOM/S{s}/I{i}"))
    return entries


def _pydicom_prefix(data: bytes, fileset_id: str) -> bytes:
    """The preamble, file meta and DICOMDIR header of *data*, as pydicom encodes them."""
    ds = dcmread(DicomBytesIO(data))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = uid.MediaStorageDirectoryStorage
    meta.MediaStorageSOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    meta.ImplementationClassUID = uid.PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"STUDYVAULT {studyvault.__version__}"[:16]
    fp = DicomBytesIO()
    fp.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(fp, meta, enforce_standard=True)
    fp.is_little_endian, fp.is_implicit_VR = True, False
    header = Dataset()
    header.FileSetID = fileset_id  # read back, trailing spaces are gone
    first = ds.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity
    header.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity = first
    header.OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity = first
    header.FileSetConsistencyFlag = 0
    write_dataset(fp, header)
    return fp.getvalue()


def _build_with_pydicom(*args: Any, **kwargs: Any) -> bytes:
    """:func:`build_dicomdir` with every directory record encoded by pydicom."""
    with (
        mock.patch.object(dicomdir, "_direct_record", return_value=None),
        mock.patch.object(dicomdir, "_image_record", return_value=None),
    ):
        return build_dicomdir(*args, **kwargs)


def _direct_results() -> tuple[list[bytes | None], Any]:
    """A stand-in for ``_direct_record`` that keeps what each call returned."""
    results: list[bytes | None] = []
    real = dicomdir._direct_record

    def spy(rtype: str, keys: Any) -> bytes | None:
        results.append(real(rtype, keys))
        return results[-1]

    return results, mock.patch.object(dicomdir, "_direct_record", spy)


@given(
    study=_STUDIES,
    series=st.lists(_SERIES, min_size=1, max_size=3, unique_by=lambda s: s[0]),
    fileset_id=st.from_regex(r"[A-Z0-9_ ]{0,16}", fullmatch=True),
)
@settings(max_examples=400, deadline=None)
def test_direct_encoding_gives_the_pydicom_bytes(
    study: StudyRecord, series: list[tuple], fileset_id: str
) -> None:
    entries = _entries(study, series)
    results, spy = _direct_results()
    with spy, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns of values it finds invalid
        fast = build_dicomdir(study, entries, fileset_id=fileset_id)
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        slow = _build_with_pydicom(study, entries, fileset_id=fileset_id)
    assert fast == slow
    assert fast.startswith(_pydicom_prefix(fast, fileset_id))
    if len(results) == 2 + len(series) and None not in results:
        # only what pydicom takes without a warning is encoded directly
        assert [str(w.message) for w in warned] == []


def test_direct_record_keys_are_those_of_the_dicom_dictionary() -> None:
    for rtype, keys in dicomdir._RECORD_KEYS.items():
        assert [tag for _, tag, _ in keys] == sorted(tag for _, tag, _ in keys), rtype
        for keyword, tag, vr in keys:
            assert (keyword_for_tag(tag), dictionary_VR(tag)) == (keyword, vr.decode()), keyword


_PLAIN = StudyRecord(
    study_uid="1.2.3",
    patient_name="O'BRIEN^SIOBHAN^^DR",
    patient_id="X" * 64,
    patient_birth_date="1970-01-31",
    patient_sex="F",
    study_date="20240229",
    study_time="235960.123456",
    study_id="S" * 16,
    study_description="CT Chest w/o contrast (low dose)",
    accession_number="A1",
)


@pytest.mark.parametrize(
    ("changes", "direct"),
    [
        ({}, True),
        ({"study_time": "", "patient_birth_date": "", "patient_sex": "", "study_id": ""}, True),
        ({"specific_character_set": "ISO_IR 100"}, False),  # ASCII, but a charset
        ({"patient_name": "Müller^Jürgen"}, False),
        ({"patient_name": "DOE^JANE="}, False),  # pydicom drops the empty component
        ({"patient_id": "X" * 65}, False),
        ({"study_id": "S" * 17}, False),
        ({"accession_number": "A\\B"}, False),  # two values
        ({"study_description": "line\nbreak"}, False),
        ({"study_time": "10.5"}, False),  # accepted by the index, refused by pydicom
        ({"study_uid": "1.02.3"}, False),
    ],
)
def test_only_plain_ascii_studies_are_encoded_directly(
    changes: dict[str, str], direct: bool
) -> None:
    study = msgspec.structs.replace(_PLAIN, **changes)
    entries = _entries(study, [("1.2.3.1", "CT", "Axial 1.0", 7, 2)])
    results, spy = _direct_results()
    with spy, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = build_dicomdir(study, entries)
        assert fast == _build_with_pydicom(study, entries)
    # a record falls back, or (with a charset) none is even tried
    assert (len(results) == 3 and None not in results) == direct


def test_series_records_fall_back_for_values_pydicom_must_encode() -> None:
    study = StudyRecord(study_uid="1.2.3")
    series = [
        ("1.2.3.1", "CT", "plain", 2**31 - 1, 1),
        ("1.2.3.2", "ct", "", 1, 1),  # CS is upper case
        ("1.2.3.3", "CT", "", 2**31, 1),  # beyond IS
        ("1.2.3.4", "CT", "D" * 65, None, 1),
    ]
    results, spy = _direct_results()
    with spy, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = build_dicomdir(study, _entries(study, series))
        assert fast == _build_with_pydicom(study, _entries(study, series))
    assert [r is not None for r in results] == [True, True, True, False, False, False]
