"""Reading DICOM headers: what an import sees for real, generated, odd and broken files."""

from __future__ import annotations

import os
import random
import re
import struct
import subprocess
import zlib
from pathlib import Path

import pydicom
import pydicom.data
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
)

from studyvault.dicom import is_valid_uid, looks_like_dicom, read_header, read_header_bytes
from studyvault.errors import NotDicomError
from studyvault.records import InstanceHeader
from studyvault.testing.dicomgen import make_instance, make_study

# pydicom's bundled files, listed from disk: get_testdata_files("*") would also try to
# download the ones that are not shipped.
PYDICOM_DATA = Path(pydicom.data.__file__).parent
PYDICOM_FILES = sorted(
    path
    for folder in ("test_files", "charset_files")
    for path in (PYDICOM_DATA / folder).rglob("*")
    if path.is_file() and "__pycache__" not in path.parts
)
TEST_FILES = PYDICOM_DATA / "test_files"
CHARSET_FILES = PYDICOM_DATA / "charset_files"

STUDY = "1.2.826.0.1.3680043.8.498.1"
SERIES = "1.2.826.0.1.3680043.8.498.2"
SOP = "1.2.826.0.1.3680043.8.498.3"
TRANSFER_SYNTAXES = [
    ImplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
]
NOT_DICOM = "not a DICOM file (no DICM prefix and no DICOM data set)"
needs_dcmdump = pytest.mark.usefixtures("dcmtk")
# every transfer syntax with and without a preamble, but a deflated data set needs file meta
SYNTAX_AND_PREAMBLE = [
    (ts, preamble)
    for ts in TRANSFER_SYNTAXES
    for preamble in (True, False)
    if preamble or ts != DeflatedExplicitVRLittleEndian
]


def read_or_reason(path: Path) -> InstanceHeader | str:
    """The header, or the NotDicomError message; any other exception fails the test."""
    try:
        return read_header(path)
    except NotDicomError as exc:
        return str(exc)


def assert_reason(message: str, name: str, reason: str | None = None) -> None:
    assert "\n" not in message
    assert message.startswith(f"{name}: ")
    if reason is not None:
        assert message == f"{name}: {reason}"


def dcmdump(path: Path, *keywords: str) -> dict[str, str]:
    """Top-level values DCMTK's dcmdump prints for `keywords` (missing ones left out),
    with numeric UIDs, whole long values and text converted to UTF-8."""
    args = ["dcmdump", "-q", "-Un", "+p", "+L", "+U8"]
    for keyword in keywords:
        args += ["+P", keyword]
    out = subprocess.run([*args, str(path)], capture_output=True, check=False).stdout
    values = {}
    for line in out.decode("utf-8", "replace").splitlines():
        match = re.match(
            r"\([0-9a-f]{4},[0-9a-f]{4}\) \w\w (?:\[(.*)\]|\(no value.*?\)) +#.* (\w+)$", line
        )
        if match:
            values.setdefault(match.group(2), match.group(1) or "")
    return values


def bare_dataset(transfer_syntax: str = ImplicitVRLittleEndian, **attrs: object) -> bytes:
    """A data set encoded as a C-STORE receiver gets it: no preamble, no file meta."""
    ds = pydicom.Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = SOP
    ds.StudyInstanceUID = STUDY
    ds.SeriesInstanceUID = SERIES
    for keyword, value in attrs.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    syntax = pydicom.uid.UID(transfer_syntax)
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = syntax.is_implicit_VR, syntax.is_little_endian
    write_dataset(fp, ds)
    data = fp.getvalue()
    if syntax.is_deflated:
        compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        data = compressor.compress(data) + compressor.flush()
    return data


def element(tag: int, value: bytes) -> bytes:
    """One implicit VR little endian element."""
    return struct.pack("<HHL", tag >> 16, tag & 0xFFFF, len(value)) + value


# --- pydicom's own test files -------------------------------------------------------------


@pytest.mark.parametrize(
    "path", PYDICOM_FILES, ids=[str(p.relative_to(PYDICOM_DATA)) for p in PYDICOM_FILES]
)
def test_every_pydicom_test_file_gives_a_header_or_a_reason(path: Path):
    result = read_or_reason(path)
    if isinstance(result, str):
        assert_reason(result, str(path))
    else:
        assert result.study_uid and result.sop_uid
        assert looks_like_dicom(path)


def test_pydicom_test_files_include_the_interesting_cases():
    """Guards the parametrised test above against an empty or shrunken data folder."""
    names = {p.name for p in PYDICOM_FILES}
    assert {"CT_small.dcm", "MR_small_bigendian.dcm", "image_dfl.dcm", "DICOMDIR"} <= names
    assert read_header(TEST_FILES / "image_dfl.dcm").transfer_syntax == (
        DeflatedExplicitVRLittleEndian
    )


KNOWN = [
    TEST_FILES / "CT_small.dcm",
    TEST_FILES / "MR_small_bigendian.dcm",
    TEST_FILES / "MR_small_implicit.dcm",
    TEST_FILES / "image_dfl.dcm",
    TEST_FILES / "ExplVR_BigEndNoMeta.dcm",
    TEST_FILES / "ExplVR_LitEndNoMeta.dcm",
    TEST_FILES / "rtplan.dcm",
    TEST_FILES / "693_J2KI.dcm",
    TEST_FILES / "dicomdirtests" / "98892003" / "MR700" / "4467",
    CHARSET_FILES / "chrGreek.dcm",
    CHARSET_FILES / "chrX1.dcm",
    CHARSET_FILES / "chrFren.dcm",
]


@needs_dcmdump
@pytest.mark.parametrize("path", KNOWN, ids=[p.name for p in KNOWN])
def test_header_matches_what_dcmdump_prints(path: Path):
    header = read_header(path)
    dumped = dcmdump(
        path,
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
        "SOPClassUID",
        "PatientName",
        "PatientID",
        "Modality",
        "SeriesNumber",
        "InstanceNumber",
    )
    assert dumped["StudyInstanceUID"] == header.study_uid
    assert dumped["SOPInstanceUID"] == header.sop_uid
    assert dumped.get("SeriesInstanceUID", "") == header.series_uid
    assert dumped.get("SOPClassUID", "") == header.sop_class_uid
    assert dumped.get("PatientName", "").rstrip() == header.patient_name
    assert dumped.get("PatientID", "").rstrip() == header.patient_id
    assert dumped.get("Modality", "").rstrip() == header.modality
    for keyword, number in [
        ("SeriesNumber", header.series_number),
        ("InstanceNumber", header.instance_number),
    ]:
        assert (int(dumped[keyword]) if dumped.get(keyword, "").strip() else None) == number


@needs_dcmdump
def test_transfer_syntax_matches_dcmdump_file_meta():
    for name in ["CT_small.dcm", "MR_small_bigendian.dcm", "image_dfl.dcm", "JPEG2000.dcm"]:
        path = TEST_FILES / name
        assert dcmdump(path, "TransferSyntaxUID")["TransferSyntaxUID"] == (
            read_header(path).transfer_syntax
        )


def test_ct_small_values():
    header = read_header(TEST_FILES / "CT_small.dcm")
    assert header == InstanceHeader(
        study_uid="1.3.6.1.4.1.5962.1.2.1.20040119072730.12322",
        series_uid="1.3.6.1.4.1.5962.1.3.1.1.20040119072730.12322",
        sop_uid="1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322",
        sop_class_uid=CTImageStorage,
        transfer_syntax=ExplicitVRLittleEndian,
        patient_name="CompressedSamples^CT1",
        patient_id="1CT1",
        patient_birth_date="",
        patient_sex="O",
        study_date="20040119",
        study_time="072730",
        study_id="1CT1",
        study_description="e+1",
        accession_number="",
        series_number=1,
        modality="CT",
        series_description="",
        instance_number=1,
        specific_character_set="ISO_IR 100",
    )


def test_files_without_file_meta_get_their_transfer_syntax_inferred():
    assert read_header(TEST_FILES / "ExplVR_BigEndNoMeta.dcm").transfer_syntax == (
        ExplicitVRBigEndian
    )
    assert read_header(TEST_FILES / "ExplVR_LitEndNoMeta.dcm").transfer_syntax == (
        ExplicitVRLittleEndian
    )
    assert read_header(TEST_FILES / "rtplan.dcm").transfer_syntax == ImplicitVRLittleEndian


def test_a_dicomdir_is_dicom_but_not_an_instance():
    path = TEST_FILES / "dicomdirtests" / "DICOMDIR"
    assert looks_like_dicom(path)
    with pytest.raises(NotDicomError) as caught:
        read_header(path)
    assert_reason(str(caught.value), str(path), "a DICOMDIR (file-set directory), not an instance")


def test_a_file_cut_inside_its_pixel_data_still_gives_its_header():
    # dcmdump rejects MR_truncated.dcm; its header is complete, which is all an index needs
    assert read_header(TEST_FILES / "MR_truncated.dcm").study_uid


# --- generated files ----------------------------------------------------------------------


@pytest.mark.parametrize(("transfer_syntax", "preamble"), SYNTAX_AND_PREAMBLE)
def test_generated_files_read_back_in_every_transfer_syntax(tmp_path, transfer_syntax, preamble):
    path = make_instance(
        tmp_path / "IM0001",
        study_uid=STUDY,
        series_uid=SERIES,
        sop_uid=SOP,
        transfer_syntax=transfer_syntax,
        preamble=preamble,
        patient_name="DOE^JOHN",
        StudyDescription="CHEST ",
        AccessionNumber="A123",
        SeriesNumber=7,
        InstanceNumber=42,
        PatientBirthDate="19700101",
        PatientSex="M",
    )
    assert looks_like_dicom(path)
    assert (path.read_bytes()[128:132] == b"DICM") is preamble
    header = read_header(path)
    assert header == InstanceHeader(
        study_uid=STUDY,
        series_uid=SERIES,
        sop_uid=SOP,
        sop_class_uid=CTImageStorage,
        transfer_syntax=transfer_syntax,
        patient_name="DOE^JOHN",
        patient_id="PID1",
        patient_birth_date="19700101",
        patient_sex="M",
        study_date="20100101",
        study_time="120000",
        study_id="1",
        study_description="CHEST",
        accession_number="A123",
        series_number=7,
        modality="CT",
        series_description="",
        instance_number=42,
    )
    assert read_header_bytes(path.read_bytes()) == header
    assert read_header_bytes(memoryview(path.read_bytes())) == header


def test_file_meta_without_preamble_is_read(tmp_path):
    full = make_instance(tmp_path / "full.dcm", study_uid=STUDY, sop_uid=SOP)
    cut = tmp_path / "nopreamble"
    cut.write_bytes(full.read_bytes()[132:])  # starts with (0002,0000)
    assert looks_like_dicom(cut)
    assert read_header(cut) == read_header(full)


def test_the_name_does_not_matter(tmp_path):
    for name in ["scan.jpg", "IM_0001", "a.b.c", "noext"]:
        path = make_instance(tmp_path / name, study_uid=STUDY, sop_uid=SOP)
        assert read_header(path).study_uid == STUDY
    text = tmp_path / "looks.dcm"
    text.write_text("hello")
    with pytest.raises(NotDicomError):
        read_header(text)


@pytest.mark.parametrize("transfer_syntax", TRANSFER_SYNTAXES)
def test_a_received_data_set_is_read_from_bytes(transfer_syntax):
    data = bare_dataset(transfer_syntax, PatientName="DOE^JANE", InstanceNumber=3)
    header = read_header_bytes(data, "AE1 C-STORE", transfer_syntax=transfer_syntax)
    assert (header.study_uid, header.sop_uid, header.series_uid) == (STUDY, SOP, SERIES)
    assert header.patient_name == "DOE^JANE" and header.instance_number == 3
    assert header.transfer_syntax == transfer_syntax
    if transfer_syntax != DeflatedExplicitVRLittleEndian:
        # without the hint, the encoding is inferred from the data itself
        assert read_header_bytes(data).transfer_syntax == transfer_syntax


def test_missing_study_instance_uid_is_rejected(tmp_path):
    path = make_instance(tmp_path / "scan.dcm", study_uid=STUDY)
    ds = pydicom.dcmread(path)
    del ds.StudyInstanceUID
    ds.save_as(path)
    with pytest.raises(NotDicomError) as caught:
        read_header(path)
    assert_reason(str(caught.value), str(path), "no StudyInstanceUID")
    with pytest.raises(NotDicomError, match=r"^<bytes>: no StudyInstanceUID$"):
        read_header_bytes(bare_dataset(StudyInstanceUID=None))


def test_missing_sop_instance_uid_is_rejected_unless_the_file_meta_has_it(tmp_path):
    path = make_instance(tmp_path / "scan.dcm", study_uid=STUDY, sop_uid=SOP)
    ds = pydicom.dcmread(path)
    del ds.SOPInstanceUID
    del ds.SOPClassUID
    ds.save_as(path)
    header = read_header(path)  # MediaStorageSOPInstanceUID / MediaStorageSOPClassUID
    assert (header.sop_uid, header.sop_class_uid) == (SOP, CTImageStorage)

    bare = tmp_path / "bare"
    bare.write_bytes(bare_dataset(SOPInstanceUID=None))
    with pytest.raises(NotDicomError) as caught:
        read_header(bare)
    assert_reason(str(caught.value), str(bare), "no SOPInstanceUID")


def test_uids_after_later_elements_are_still_found():
    """Elements out of order (a writer bug): the UIDs come after Rows (0028,0010)."""
    data = b"".join(
        [
            element(0x00080016, MRImageStorage.encode() + b"\0"),
            element(0x00080018, b"1.2.3.4"),
            element(0x00280010, struct.pack("<H", 256)),
            element(0x0020000D, b"1.2.3.5\0"),
            element(0x0020000E, b"1.2.3.6\0"),
        ]
    )
    header = read_header_bytes(data)
    assert (header.study_uid, header.series_uid, header.sop_uid) == (
        "1.2.3.5",
        "1.2.3.6",
        "1.2.3.4",
    )
    assert header.transfer_syntax == ImplicitVRLittleEndian


def test_a_header_longer_than_the_first_read_is_read_whole(tmp_path):
    path = make_instance(tmp_path / "big", study_uid=STUDY, sop_uid=SOP, pixel_bytes=200_000)
    ds = pydicom.dcmread(path)
    ds.add_new(0x00191010, "OB", bytes(150_000))  # a private element before group 0020
    ds.save_as(path)
    assert read_header(path).study_uid == STUDY
    cut = tmp_path / "cut"
    cut.write_bytes(path.read_bytes()[:100_000])
    with pytest.raises(NotDicomError, match=r": truncated DICOM header$"):
        read_header(cut)


@pytest.mark.parametrize(("transfer_syntax", "preamble"), SYNTAX_AND_PREAMBLE)
def test_a_file_cut_anywhere_is_rejected_or_gives_its_whole_header(
    tmp_path, transfer_syntax, preamble
):
    path = make_instance(
        tmp_path / "cut.dcm",
        study_uid=STUDY,
        sop_uid=SOP,
        transfer_syntax=transfer_syntax,
        preamble=preamble,
        pixel_bytes=2048,
    )
    ds = pydicom.dcmread(path, force=True)
    item = pydicom.Dataset()
    item.ReferencedSOPClassUID = CTImageStorage
    item.ReferencedSOPInstanceUID = "1.2.3.4"
    item.is_undefined_length_sequence_item = True
    ds.ReferencedImageSequence = [item]  # undefined length: pydicom parses it to its end
    ds["ReferencedImageSequence"].is_undefined_length = True
    if preamble:
        ds.save_as(path, enforce_file_format=True)
    else:
        syntax = pydicom.uid.UID(transfer_syntax)
        ds.save_as(path, implicit_vr=syntax.is_implicit_VR, little_endian=syntax.is_little_endian)
    data = path.read_bytes()
    full = read_header(path)
    # where the last element read, Instance Number, ends (positions in a deflated file
    # are inside the compressed stream, so no such bound there)
    header_end = len(data)
    if transfer_syntax != DeflatedExplicitVRLittleEndian:
        raw = pydicom.dcmread(path, force=True).get_item(0x00200013)
        header_end = raw.value_tell + raw.length
    offsets = range(len(data)) if header_end == len(data) else range(len(data) - 2048 + 40)
    for offset in [*offsets, len(data) - 1000, len(data) - 1]:
        try:
            header = read_header_bytes(data[:offset], "cut.dcm")
        except NotDicomError as exc:
            assert_reason(str(exc), "cut.dcm")
            continue
        if offset >= header_end:
            assert header == full, offset
        else:
            # cut exactly between two elements: nothing tells that from a data set that
            # ends there, and every value read is whole -- later ones are just missing
            assert (header.study_uid, header.sop_uid) == (full.study_uid, full.sop_uid)
            for field in header.__struct_fields__:
                assert getattr(header, field) in (getattr(full, field), "", None), offset
    for offset in (0, 100, 131, 132, 300, header_end - 1, header_end, len(data) - 1):
        path.write_bytes(data[:offset])
        result = read_or_reason(path)
        assert isinstance(result, str) or result == full
        if isinstance(result, str):
            assert_reason(result, str(path))


def test_truncated_header_message(tmp_path):
    good = make_instance(tmp_path / "x.dcm", study_uid=STUDY)
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(good.read_bytes()[:400])
    with pytest.raises(NotDicomError) as caught:
        read_header(cut)
    assert_reason(str(caught.value), str(cut), "truncated DICOM header")


# --- files that are not DICOM ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("empty.dcm", b"", "not a DICOM file (empty)"),
        ("notes.txt", b"Patient DOE^JOHN was scanned on 2010-01-01.\n" * 10, NOT_DICOM),
        ("image.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(200), NOT_DICOM),
        ("zeros.dcm", bytes(1000), NOT_DICOM),
        ("short", b"\x08\x00", NOT_DICOM),
    ],
)
def test_non_dicom_files_are_rejected_with_a_reason(tmp_path, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content)
    assert not looks_like_dicom(path)
    with pytest.raises(NotDicomError) as caught:
        read_header(path)
    assert_reason(str(caught.value), str(path), reason)


def test_random_bytes_never_raise_anything_but_not_dicom(tmp_path):
    rng = random.Random(1234)
    prefixes = [b"", bytes(128) + b"DICM", b"\x08\x00\x05\x00", b"\x08\x00\x16\x00UI"]
    for index in range(400):
        data = rng.choice(prefixes) + rng.randbytes(rng.randrange(0, 3000))
        path = tmp_path / f"r{index}"
        path.write_bytes(data)
        result = read_or_reason(path)
        if isinstance(result, str):
            assert_reason(result, str(path))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    prefix=st.sampled_from([b"", b"\x08\x00", b"\x02\x00\x00\x00UL\x04\x00", bytes(128) + b"DICM"]),
    body=st.binary(max_size=600),
)
def test_arbitrary_bytes_never_raise_anything_but_not_dicom(prefix, body):
    try:
        header = read_header_bytes(prefix + body, "fuzz")
    except NotDicomError as exc:
        assert_reason(str(exc), "fuzz")
    else:
        assert header.study_uid and header.sop_uid


def test_corrupt_values_inside_a_real_file_never_crash(tmp_path):
    data = bytearray(make_instance(tmp_path / "x.dcm", study_uid=STUDY, sop_uid=SOP).read_bytes())
    rng = random.Random(99)
    for _ in range(300):
        mutated = bytearray(data)
        for _ in range(rng.randrange(1, 6)):
            mutated[rng.randrange(132, 700)] = rng.randrange(256)
        try:
            read_header_bytes(bytes(mutated), "mutated")
        except NotDicomError as exc:
            assert_reason(str(exc), "mutated")


def test_an_unreadable_file_raises_os_error_naming_it(tmp_path):
    missing = tmp_path / "gone.dcm"
    with pytest.raises(FileNotFoundError) as caught:
        read_header(missing)
    assert str(missing) in str(caught.value)
    with pytest.raises(OSError) as caught:
        read_header(tmp_path)  # a folder
    assert str(tmp_path) in str(caught.value)


# --- values ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("charset", "name"),
    [
        ("ISO_IR 192", "Yamada^Tarou=山田^太郎=やまだ^たろう"),
        (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう"),
        ("ISO_IR 126", "Διονυσιος"),
        ("ISO_IR 100", "Buc^Jérôme"),
    ],
    ids=["utf8", "jis", "greek", "latin1"],
)
def test_patient_names_are_decoded_with_the_files_character_set(tmp_path, charset, name):
    path = make_instance(
        tmp_path / "x.dcm",
        study_uid=STUDY,
        patient_name=name,
        SpecificCharacterSet=charset,
        StudyDescription=name.split("=")[-1],
    )
    header = read_header(path)
    assert header.patient_name == name
    assert header.study_description == name.split("=")[-1]
    assert header.specific_character_set == (
        charset if isinstance(charset, str) else "\\".join(charset)
    )


@needs_dcmdump
def test_a_greek_name_reads_as_dcmdump_converts_it(tmp_path):
    path = make_instance(
        tmp_path / "x.dcm",
        study_uid=STUDY,
        patient_name="Διονυσιος",
        SpecificCharacterSet="ISO_IR 126",
    )
    assert dcmdump(path, "PatientName")["PatientName"] == read_header(path).patient_name


def test_japanese_names_from_pydicoms_charset_files():
    header = read_header(CHARSET_FILES / "chrH31.dcm")
    assert header.patient_name == "Yamada^Tarou=山田^太郎=やまだ^たろう"
    assert header.specific_character_set == "\\ISO 2022 IR 87"
    assert read_header(CHARSET_FILES / "chrH32.dcm").patient_name.startswith("ﾔﾏﾀﾞ^ﾀﾛｳ=山田")


@pytest.mark.filterwarnings("ignore:The PN component length:UserWarning")
def test_long_and_hostile_patient_names_come_back_as_written(tmp_path):
    long_name = "A" * 150 + "^" + "B" * 149
    path = make_instance(tmp_path / "long", study_uid=STUDY, patient_name=long_name)
    assert read_header(path).patient_name == long_name

    hostile = "../../etc^pa\x00sswd"
    path = make_instance(tmp_path / "hostile", study_uid=STUDY, patient_name=hostile + "\x00")
    # trailing NUL padding goes; the rest is kept -- layouts sanitise names, not the reader
    assert read_header(path).patient_name == hostile


def test_odd_uids_are_kept_exactly_but_flagged_invalid(tmp_path):
    long_uid = "1.2." + "3" * 70
    path = make_instance(tmp_path / "x", study_uid=STUDY, sop_uid=SOP)
    ds = pydicom.dcmread(path)
    with pytest.warns(UserWarning):
        ds.StudyInstanceUID = "../../etc/passwd "
        ds.SOPInstanceUID = long_uid
        ds.SeriesInstanceUID = "1.2.3\x00"
        ds.save_as(path)
    header = read_header(path)
    assert (header.study_uid, header.sop_uid, header.series_uid) == (
        "../../etc/passwd",
        long_uid,
        "1.2.3",
    )
    assert not is_valid_uid(header.study_uid) and not is_valid_uid(header.sop_uid)
    assert is_valid_uid(header.series_uid) and is_valid_uid(SOP)
    assert is_valid_uid("1.2.840.0123")  # a leading zero breaks PS3.5, not a path
    for bad in ["", "..", ".1", "1.", "1..2", "1/2", "1.2 3", "1" * 65]:
        assert not is_valid_uid(bad), bad


@pytest.mark.parametrize(
    ("attrs", "expected"),
    [
        ({"StudyDate": "20100101"}, ("20100101", 1, 1)),
        ({"StudyDate": "20101301"}, ("", 1, 1)),
        ({"StudyDate": "2010.01.01"}, ("", 1, 1)),
        ({"StudyDate": ""}, ("", 1, 1)),
        ({"SeriesNumber": None, "InstanceNumber": None}, ("", None, None)),
        ({"SeriesNumber": " 12 ", "InstanceNumber": "-3"}, ("", 12, -3)),
        ({"SeriesNumber": "x1", "InstanceNumber": "99999999999"}, ("", None, None)),
        ({"SeriesNumber": "1.5", "InstanceNumber": "1\\2"}, ("", None, None)),
    ],
)
def test_dates_and_numbers_are_clean_or_empty(attrs, expected):
    raw = {"StudyDate": "", "SeriesNumber": "1", "InstanceNumber": "1"}
    raw.update(attrs)
    data = bytearray(bare_dataset(ImplicitVRLittleEndian))
    for keyword, tag in [
        ("StudyDate", 0x00080020),
        ("SeriesNumber", 0x00200011),
        ("InstanceNumber", 0x00200013),
    ]:
        value = raw[keyword]
        if value is not None:
            encoded = value.encode() + b" " * (len(value) % 2)
            data += element(tag, encoded)
    # the elements appended after Series Instance UID must stay in tag order
    elements = _sorted_implicit(bytes(data))
    header = read_header_bytes(elements)
    assert (header.study_date, header.series_number, header.instance_number) == expected


def _sorted_implicit(data: bytes) -> bytes:
    """Re-order the top-level elements of an implicit VR little endian data set."""
    parts, pos = [], 0
    while pos < len(data):
        group, elem, length = struct.unpack_from("<HHL", data, pos)
        parts.append(((group << 16) | elem, data[pos : pos + 8 + length]))
        pos += 8 + length
    return b"".join(part for _, part in sorted(parts))


# --- the test kit ---------------------------------------------------------------------------


def test_make_study_writes_a_study_in_series(tmp_path):
    paths = make_study(tmp_path / "s", n_instances=5, n_series=2, patient_name="ROE^JANE")
    headers = [read_header(p) for p in paths]
    assert len({h.study_uid for h in headers}) == 1
    assert len({h.series_uid for h in headers}) == 2
    assert len({h.sop_uid for h in headers}) == 5
    assert sorted((h.series_number, h.instance_number) for h in headers) == [
        (1, 1),
        (1, 2),
        (1, 3),
        (2, 1),
        (2, 2),
    ]
    assert {h.patient_name for h in headers} == {"ROE^JANE"}
    assert all(os.path.getsize(p) > 1024 for p in paths)


def test_make_instance_without_pixels(tmp_path):
    path = make_instance(tmp_path / "sr", study_uid=STUDY, pixel_bytes=0, modality="SR")
    assert "PixelData" not in pydicom.dcmread(path)
    assert read_header(path).modality == "SR"
