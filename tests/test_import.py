"""Importing DICOM files: grouping into studies, duplicates, conflicts, bad files."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_files

from studyvault.testing.dicomgen import make_instance, make_study


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_import_groups_files_into_studies_and_lists_them(home, run, tmp_path):
    src = tmp_path / "incoming"
    a = make_study(src / "a", n_instances=3, patient_name="DOE^JANE", study_date="20120305")
    b = make_study(
        src / "b" / "deeper",
        n_instances=2,
        n_series=2,
        patient_name="ROE^RICHARD",
        study_date="20190101",
        modality="US",
    )
    result = run("import", src)
    assert result.code == 0, result.err
    assert "Imported 5 instances in 2 studies" in result.out
    assert "0 duplicates" in result.out

    studies = run("studies", "--json").json()
    assert [s["patient_name"] for s in studies] == ["DOE^JANE", "ROE^RICHARD"]  # oldest first
    assert [s["instances"] for s in studies] == [3, 2]
    assert all(s["status"] == "online" for s in studies)
    assert studies[0]["study_date"] == "2012-03-05"
    assert studies[0]["copies"][0]["storage"] == "Image Center Storage"

    # every stored file is byte-identical to its source
    stored = sorted((home / "images" / "studies").rglob("*.dcm"))
    assert sorted(sha(p) for p in stored) == sorted(sha(p) for p in a + b)

    table = run("studies")
    assert "DOE JANE" in table.out and "2 studies" in table.out


def test_importing_the_same_files_twice_adds_nothing(home, run, tmp_path):
    make_study(tmp_path / "s", n_instances=4)
    assert run("import", tmp_path / "s").code == 0
    before = sorted(p.name for p in (home / "images").rglob("*.dcm"))
    again = run("import", tmp_path / "s", "--json").json()
    assert again["instances"] == 0 and again["duplicates"] == 4
    assert sorted(p.name for p in (home / "images").rglob("*.dcm")) == before
    assert run("studies", "--json").json()[0]["instances"] == 4


def test_same_sop_instance_with_different_bytes_is_reported_not_overwritten(home, run, tmp_path):
    original = make_instance(
        tmp_path / "one.dcm", study_uid="1.2.3.4", sop_uid="1.2.3.4.5", patient_name="FIRST^VERSION"
    )
    run("import", original)
    changed = make_instance(
        tmp_path / "changed" / "one.dcm",
        study_uid="1.2.3.4",
        sop_uid="1.2.3.4.5",
        patient_name="SECOND^VERSION",
    )
    result = run("import", changed)
    assert result.code == 0
    assert "1 conflicts" in result.out
    assert "SOPInstanceUID 1.2.3.4.5 is already stored with different content" in result.err
    stored = next((home / "images").rglob("*.dcm"))
    assert sha(stored) == sha(original)


def test_the_same_instance_twice_in_one_import_is_stored_once(home, run, tmp_path):
    """Files are stored two at a time: a copy and a changed version of one instance
    next to each other in the same import are a duplicate and a conflict, and the
    first one seen is what is stored."""
    first = make_instance(
        tmp_path / "src" / "a1.dcm", study_uid="1.2.3.4", sop_uid="1.2.3.4.5",
        patient_name="FIRST^VERSION", pixel_bytes=3_000_000,
    )  # fmt: skip
    (tmp_path / "src" / "a2.dcm").write_bytes(first.read_bytes())
    make_instance(
        tmp_path / "src" / "a3.dcm", study_uid="1.2.3.4", sop_uid="1.2.3.4.5",
        patient_name="SECOND^VERSION",
    )  # fmt: skip
    for i in range(4):  # others around them, so the workers are busy
        make_instance(tmp_path / "src" / f"b{i}.dcm", study_uid="1.2.3.4", pixel_bytes=2_000_000)
    summary = run("import", tmp_path / "src", "--json").json()
    assert summary["instances"] == 5 and summary["duplicates"] == 1
    assert [c["path"] for c in summary["conflicts"]] == [str(tmp_path / "src" / "a3.dcm")]
    stored = sorted((home / "images").rglob("*.dcm"))
    assert len(stored) == 5 and sha(first) in {sha(p) for p in stored}
    [study] = run("studies", "--json").json()
    assert study["instances"] == 5
    assert run("verify", "--json").json()["ok"] is True


def test_files_without_dcm_extension_are_found_by_content(home, run, tmp_path):
    make_instance(tmp_path / "in" / "IM0001", study_uid="1.2.840.1.1")
    make_instance(tmp_path / "in" / "IM0002", study_uid="1.2.840.1.1", preamble=False)
    result = run("import", tmp_path / "in", "--json").json()
    assert result["instances"] == 2 and result["skipped"] == []


def test_bad_files_are_skipped_with_a_reason_and_the_run_goes_on(home, run, tmp_path):
    src = tmp_path / "mixed"
    make_study(src, n_instances=2)
    (src / "notes.txt").write_text("not an image")
    (src / "empty.dcm").write_bytes(b"")
    good = make_instance(tmp_path / "x.dcm", study_uid="1.2.3.99")
    (src / "cut.dcm").write_bytes(good.read_bytes()[:200])
    no_study = make_instance(tmp_path / "nostudy.dcm", study_uid="1.2.3.98")
    ds = pydicom.dcmread(no_study)
    del ds.StudyInstanceUID
    ds.save_as(src / "nostudy.dcm")
    result = run("import", src)
    assert result.code == 0
    assert "Imported 2 instances in 1 studies" in result.out
    assert "4 skipped" in result.out
    lines = [line for line in result.err.splitlines() if line.startswith("skipped:")]
    reasons = {Path(line.split(": ")[1]).name: line for line in lines}
    assert set(reasons) == {"notes.txt", "empty.dcm", "cut.dcm", "nostudy.dcm"}
    assert "StudyInstanceUID" in reasons["nostudy.dcm"]


def test_import_of_a_missing_path_is_one_clear_error(home, run, tmp_path):
    result = run("import", tmp_path / "nope")
    assert result.code == 2
    assert result.err.strip() == f"studyvault: error: {tmp_path / 'nope'}: no such file or folder"


def test_import_into_a_named_image_directory(home, run, tmp_path):
    assert run("image-dirs", "add", "Second Disk", tmp_path / "second").code == 0
    make_study(tmp_path / "s", n_instances=2)
    assert run("import", tmp_path / "s", "--to", "Second Disk").code == 0
    rows = {r["name"]: r for r in run("image-dirs", "list", "--json").json()}
    assert rows["Second Disk"]["studies"] == 1
    assert rows["Image Center Storage"]["studies"] == 0
    assert run("import", tmp_path / "s", "--to", "Nowhere").code == 2


@pytest.mark.parametrize(
    "name", ["../../etc/x", "/abs^path", "NUL\x00BYTE", "A" * 300, "山田^太郎", "Διονυσιος"]
)
def test_hostile_patient_names_stay_inside_the_image_directory(home, run, tmp_path, name):
    make_instance(
        tmp_path / "in" / "a.dcm",
        study_uid="1.2.3.77",
        patient_name=name,
        SpecificCharacterSet="ISO_IR 192",
    )
    result = run("import", tmp_path / "in", "--json").json()
    assert result["instances"] == 1
    images = (home / "images").resolve()
    for path in images.rglob("*"):
        assert path.resolve().is_relative_to(images)
    shown = run("studies", "--json").json()[0]["patient_name"]
    assert shown.replace("\x00", "") == name.replace("\x00", "")[: len(shown)]


def test_every_pydicom_test_file_with_uids_is_indexed_the_rest_skipped(home, run, tmp_path):
    src = tmp_path / "pydicom-data"
    src.mkdir()
    expected = 0
    for i, path in enumerate(sorted(get_testdata_files())):
        p = Path(path)
        if not p.is_file():
            continue
        shutil.copy(p, src / f"{i:03d}-{p.name}")
        # pydicom itself is the judge of which files carry both UIDs
        try:
            ds = pydicom.dcmread(p, force=True, stop_before_pixels=True)
            if ds.get("StudyInstanceUID") and ds.get("SOPInstanceUID"):
                expected += 1
        except Exception:
            pass
    result = run("import", src, "--json")
    assert result.code == 0, result.err
    summary = result.json()
    assert summary["instances"] + summary["duplicates"] + len(summary["conflicts"]) == expected
    assert summary["instances"] > 50
    assert len(summary["skipped"]) == summary["files"] - expected
    assert all(s["reason"] for s in summary["skipped"])
