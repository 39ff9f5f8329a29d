"""Names made from DICOM values never leave the archive, never collide, stay short."""

from __future__ import annotations

import random
import re
from pathlib import Path, PurePosixPath

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.fileset import is_conformant_file_id

from studyvault.naming import (
    assign_file_ids,
    is_safe_relpath,
    normalize_date,
    readable_study_path,
    sanitize_component,
    short_id,
    uid_study_path,
)
from studyvault.records import InstanceRecord, StudyRecord

HOSTILE_NAMES = [
    "../../x",
    "..",
    ".",
    "/",
    "\\",
    "..\\..\\windows",
    "/etc/passwd",
    "a\x00b",
    "tab\there\nnew\rline\x1b[31m",
    "CON",
    "con.txt",
    "Lpt1",
    "NUL ",
    "AUX^",
    "x" * 300,
    "山田^太郎",
    "Διονυσιος",
    "",
    "^^^",
    " . . ",
    'a<b>c:d"e|f?g*h',
    "trailing dot.",
    "\u202eevil\u202c",
    "é" * 200,
    "Yamada^Tarou=山田^太郎=やまだ^たろう",
]


def _study(uid: str, name: str = "DOE^JOHN", date: str = "20230105") -> StudyRecord:
    return StudyRecord(study_uid=uid, patient_name=name, study_date=date)


def _assert_inside(root: Path, rel: str) -> None:
    assert is_safe_relpath(rel), rel
    assert not PurePosixPath(rel).is_absolute()
    assert ".." not in PurePosixPath(rel).parts
    for part in PurePosixPath(rel).parts:
        assert len(part.encode("utf-8")) <= 255
    folder = root / rel
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "DICOMDIR").write_bytes(b"x")
    assert folder.resolve().is_relative_to(root.resolve())


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_patient_name_stays_inside_the_archive(tmp_path: Path, name: str) -> None:
    root = tmp_path / "studies"
    rel = readable_study_path(_study("1.2.3.4", name))
    _assert_inside(root, rel)
    year, leaf = rel.split("/")
    assert year == "2023"
    assert leaf.startswith("20230105 ")
    assert leaf.endswith(" " + short_id("1.2.3.4"))


@pytest.mark.parametrize("uid", ["../../x", "/", "..", "", "a\x00b", "CON", "1.2.3.", "1" * 300])
def test_hostile_study_uid_stays_inside_the_archive(tmp_path: Path, uid: str) -> None:
    rel = uid_study_path(_study(uid))
    _assert_inside(tmp_path / "studies", rel)
    assert "/" not in rel
    _assert_inside(tmp_path / "studies", readable_study_path(_study(uid)))


def test_valid_uid_is_the_folder_name() -> None:
    uid = "1.2.840.113619.2.55.3.604688119.969.1268071029.320"
    assert uid_study_path(_study(uid)) == uid


def test_hostile_uids_that_sanitise_alike_get_different_folders() -> None:
    paths = {uid_study_path(_study(uid)) for uid in ["a/b", "a\\b", "a:b", "a_b", "a|b"]}
    assert len(paths) == 5


def test_same_patient_and_date_never_collide() -> None:
    paths = {readable_study_path(_study(f"1.2.826.0.1.{n}")) for n in range(5000)}
    assert len(paths) == 5000


def test_readable_path_looks_like_the_design() -> None:
    rel = readable_study_path(_study("1.2.3", "DOE^JOHN^^^"))
    assert rel == f"2023/20230105 DOE JOHN {short_id('1.2.3')}"


@pytest.mark.parametrize("date", ["", "2023", "20231340", "20230229", "abcdefgh", "../../"])
def test_undated_study_goes_to_unknown_date(date: str) -> None:
    rel = readable_study_path(_study("1.2.3", date=date))
    assert rel == f"unknown-date/unknown-date DOE JOHN {short_id('1.2.3')}"


def test_old_style_dates_are_understood() -> None:
    assert normalize_date("2023.01.05") == "20230105"
    assert normalize_date("2023-01-05") == "20230105"
    assert normalize_date("20240229") == "20240229"
    assert normalize_date("20230229") is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("DOE^JOHN", "DOE JOHN"),
        ("山田^太郎", "山田 太郎"),
        ("Διονυσιος", "Διονυσιος"),
        ("CON", "_CON"),
        ("con.txt", "_con.txt"),
        ("COM9", "_COM9"),
        ("COM10", "COM10"),
        ("CONSOLE", "CONSOLE"),
        ("../../x", "_.._x"),
        ("..", "UNKNOWN"),
        ("", "UNKNOWN"),
        ("a\x00b\x07c", "abc"),
        ("a  b\t\tc", "a b c"),
        ("name. . ", "name"),
        ('a<b>c:d"e|f?g*h', "a_b_c_d_e_f_g_h"),
    ],
)
def test_sanitize_component(text: str, expected: str) -> None:
    assert sanitize_component(text) == expected


def test_long_names_are_cut_on_a_character_boundary() -> None:
    cut = sanitize_component("山" * 100)
    assert len(cut.encode("utf-8")) <= 64
    assert set(cut) == {"山"}
    assert len(sanitize_component("x" * 300, max_len=255).encode()) <= 255


def test_short_id_is_stable_hex() -> None:
    assert short_id("1.2.3") == short_id("1.2.3")
    assert re.fullmatch(r"[0-9a-f]{8}", short_id("1.2.3"))
    assert len(short_id("1.2.3", 16)) == 16
    assert short_id("1.2.3") != short_id("1.2.4")
    with pytest.raises(ValueError):
        short_id("1.2.3", 0)


@pytest.mark.parametrize(
    "path",
    [
        "DICOMDIR",
        "DICOM/S0000001/I0000001",
        "2023/20230105 DOE JOHN 1a2b3c4d/DICOMDIR",
        "DICOM/",
        "山田 太郎/x.dcm",
    ],
)
def test_safe_relpaths_are_accepted(path: str) -> None:
    assert is_safe_relpath(path)


@pytest.mark.parametrize(
    "path",
    [
        "",
        "/",
        "/etc/passwd",
        "../x",
        "a/../../b",
        "a/./b",
        ".",
        "a//b",
        "a\\..\\b",
        "C:/Windows",
        "C:x",
        "CON",
        "a/nul.txt",
        "a\x00b",
        "dir /x",
        "x" * 256,
    ],
)
def test_zip_slip_members_are_rejected(path: str) -> None:
    assert not is_safe_relpath(path)


@given(name=st.text(max_size=400), uid=st.text(max_size=100), date=st.text(max_size=12))
@settings(max_examples=300, deadline=None)
def test_any_values_give_a_safe_relative_path(name: str, uid: str, date: str) -> None:
    study = StudyRecord(study_uid=uid, patient_name=name, study_date=date)
    for rel in (readable_study_path(study), uid_study_path(study)):
        assert is_safe_relpath(rel)
        parts = PurePosixPath(rel).parts
        assert ".." not in parts and not PurePosixPath(rel).is_absolute()
        assert all(len(p.encode("utf-8")) <= 255 for p in parts)


@given(text=st.text(max_size=400), max_len=st.integers(min_value=8, max_value=255))
@settings(max_examples=300, deadline=None)
def test_sanitized_components_are_safe_bounded_and_stable(text: str, max_len: int) -> None:
    name = sanitize_component(text, max_len)
    assert is_safe_relpath(name)
    assert len(name.encode("utf-8")) <= max_len
    assert sanitize_component(name, max_len) == name


def _instance(series: str, sop: str, s_no: int | None, i_no: int | None) -> InstanceRecord:
    return InstanceRecord(
        study_uid="1.2.3",
        series_uid=series,
        sop_uid=sop,
        series_number=s_no,
        instance_number=i_no,
    )


def test_file_ids_follow_series_and_instance_numbers() -> None:
    instances = [
        _instance("1.9", "1.9.2", 2, 2),
        _instance("1.9", "1.9.1", 2, 1),
        _instance("1.8", "1.8.1", 1, None),
        _instance("1.8", "1.8.0", 1, 5),
        _instance("1.7", "1.7.1", None, 1),
    ]
    assigned = [(inst.sop_uid, fid) for inst, fid in assign_file_ids(instances)]
    assert assigned == [
        ("1.8.0", "DICOM/S0000001/I0000001"),
        ("1.8.1", "DICOM/S0000001/I0000002"),
        ("1.9.1", "DICOM/S0000002/I0000001"),
        ("1.9.2", "DICOM/S0000002/I0000002"),
        ("1.7.1", "DICOM/S0000003/I0000001"),
    ]


def test_file_ids_are_conformant_and_do_not_depend_on_input_order() -> None:
    instances = [
        _instance(f"1.{s}", f"1.{s}.{i}", s % 3 or None, i % 7 or None)
        for s in range(12)
        for i in range(30)
    ]
    first = [(inst.sop_uid, fid) for inst, fid in assign_file_ids(instances)]
    random.Random(7).shuffle(instances)
    assert [(inst.sop_uid, fid) for inst, fid in assign_file_ids(instances)] == first
    file_ids = [fid for _, fid in first]
    assert len(set(file_ids)) == len(file_ids)
    for fid in file_ids:
        assert is_conformant_file_id(Path(fid))
        assert all(re.fullmatch(r"[A-Z0-9_]{1,8}", part) for part in fid.split("/"))


def test_file_ids_refuse_duplicates_and_mixed_studies() -> None:
    with pytest.raises(ValueError, match="twice"):
        assign_file_ids([_instance("1.1", "1.1.1", 1, 1), _instance("1.1", "1.1.1", 1, 1)])
    other = InstanceRecord(study_uid="9.9", series_uid="9.9.1", sop_uid="9.9.1.1")
    with pytest.raises(ValueError, match="studies"):
        assign_file_ids([_instance("1.1", "1.1.1", 1, 1), other])
