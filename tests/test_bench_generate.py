"""The benchmark sample-data generator (bench/generate.py) writes valid, realistic studies."""

from __future__ import annotations

import io
import subprocess
import sys
from collections import defaultdict
from datetime import date, timedelta
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))  # bench/ is not a package: benchmark scripts import it so
try:
    import generate as bench_generate
finally:
    sys.path.remove(str(BENCH))

TODAY = date(2025, 3, 14)
SCALE = 0.002  # one small frame per ultrasound clip, 24x24 CT slices
SOP_CLASS = {
    "US": "1.2.840.10008.5.1.4.1.1.3.1",  # Ultrasound Multi-frame Image Storage
    "CT": "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "OT": "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
}
SOP_CLASS_NAMES = {"US": "=UltrasoundMultiframeImageStorage", "CT": "=CTImageStorage"}
INSTANCES = {"US": range(3, 7), "CT": range(150, 251), "OT": range(2, 5)}
NEEDS_DCMDUMP = pytest.mark.usefixtures("dcmtk")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bench_generate.Summary]:
    """One small run of every profile."""
    studies = {"ultrasound": 2, "ct": 1, "small": 12, "mixed": 10}
    return {
        profile: bench_generate.generate(
            tmp_path_factory.mktemp(profile), profile, count, scale=SCALE, seed=7, today=TODAY
        )
        for profile, count in studies.items()
    }


def study_folders(summary: bench_generate.Summary) -> list[Path]:
    return sorted(path for path in summary.out.iterdir() if path.is_dir())


def read_study(folder: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(path) for path in sorted(folder.iterdir())]


def first_file(summary: bench_generate.Summary, modality: str) -> Path:
    for folder in study_folders(summary):
        for path in sorted(folder.iterdir()):
            if pydicom.dcmread(path, stop_before_pixels=True).Modality == modality:
                return path
    raise AssertionError(f"no {modality} file in {summary.out}")


def test_every_file_reads_with_the_right_sop_class(
    runs: dict[str, bench_generate.Summary],
) -> None:
    for profile, summary in runs.items():
        folders = study_folders(summary)
        assert len(folders) == summary.studies
        for folder in folders:
            for ds in read_study(folder):
                assert ds.SOPClassUID == SOP_CLASS[ds.Modality]
                assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
                assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
                assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
                expected_pixels = (
                    ds.Rows
                    * ds.Columns
                    * ds.SamplesPerPixel
                    * int(ds.get("NumberOfFrames", 1))
                    * ds.BitsAllocated
                    // 8
                )
                assert len(ds.PixelData) == expected_pixels, profile


def test_instances_of_a_study_share_its_uid_and_differ_in_sop_instance_uid(
    runs: dict[str, bench_generate.Summary],
) -> None:
    study_uids: set[str] = set()
    for summary in runs.values():
        for folder in study_folders(summary):
            instances = read_study(folder)
            modalities = {ds.Modality for ds in instances}
            assert len(modalities) == 1
            assert len(instances) in INSTANCES[modalities.pop()]
            assert len({ds.StudyInstanceUID for ds in instances}) == 1
            assert len({ds.SOPInstanceUID for ds in instances}) == len(instances)
            assert len({(ds.SeriesInstanceUID, ds.InstanceNumber) for ds in instances}) == len(
                instances
            )
            patient = {(ds.PatientID, str(ds.PatientName), ds.StudyDate) for ds in instances}
            assert len(patient) == 1
            study_uids.add(instances[0].StudyInstanceUID)
    assert len(study_uids) == sum(summary.studies for summary in runs.values())


def test_ultrasound_clips_are_multi_frame_and_pixels_differ_per_instance(
    runs: dict[str, bench_generate.Summary],
) -> None:
    for folder in study_folders(runs["ultrasound"]):
        instances = read_study(folder)
        for ds in instances:
            assert int(ds.NumberOfFrames) >= 1
            assert ds.FrameIncrementPointer == 0x00181063
            assert ds.PhotometricInterpretation in ("RGB", "MONOCHROME2")
        assert all(not path.suffix for path in folder.iterdir())  # only content says DICOM
        assert len({ds.PixelData for ds in instances}) == len(instances)


def test_summary_counts_what_is_on_disk(runs: dict[str, bench_generate.Summary]) -> None:
    for summary in runs.values():
        files = [path for folder in study_folders(summary) for path in folder.iterdir()]
        assert summary.files == len(files)
        assert summary.bytes == sum(path.stat().st_size for path in files)
        assert sum(summary.kinds.values()) == summary.studies
        assert f"{summary.files} files" in str(summary)
    assert set(runs["mixed"].kinds) <= {"ultrasound", "ct", "small"}


def test_study_dates_spread_over_the_twelve_years_before_today(
    runs: dict[str, bench_generate.Summary],
) -> None:
    dates = []
    for summary in runs.values():
        for folder in study_folders(summary):
            ds = pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True)
            assert ds.PatientBirthDate < ds.StudyDate
            dates.append(date.fromisoformat(ds.StudyDate))
    assert all(TODAY - timedelta(days=12 * 365) <= day <= TODAY for day in dates)
    assert max(dates) - min(dates) > timedelta(days=365)


def test_non_ascii_patient_names_are_written_as_utf8(
    runs: dict[str, bench_generate.Summary],
) -> None:
    names = {name for name, _ in bench_generate.NAMES}
    seen_non_ascii = False
    for folder in study_folders(runs["small"]):
        ds = pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True)
        assert str(ds.PatientName) in names
        if not str(ds.PatientName).isascii():
            seen_non_ascii = True
            assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert seen_non_ascii


def test_files_are_exactly_what_pydicom_writes(runs: dict[str, bench_generate.Summary]) -> None:
    """The fast per-series encoder gives the same bytes as pydicom's own save_as."""
    for summary in runs.values():
        folder = study_folders(summary)[0]
        for path in sorted(folder.iterdir())[:3]:
            buffer = io.BytesIO()
            pydicom.dcmread(path).save_as(buffer, enforce_file_format=True)
            assert buffer.getvalue() == path.read_bytes(), path


@NEEDS_DCMDUMP
@pytest.mark.parametrize("modality", ["US", "CT"])
def test_dcmtk_reads_ultrasound_and_ct_files(
    runs: dict[str, bench_generate.Summary], modality: str
) -> None:
    path = first_file(runs["ultrasound" if modality == "US" else "ct"], modality)
    result = subprocess.run(["dcmdump", str(path)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert SOP_CLASS_NAMES[modality] in result.stdout


def test_same_seed_gives_the_same_files(tmp_path: Path) -> None:
    first = bench_generate.generate(tmp_path / "a", "small", 3, seed=1, today=TODAY)
    again = bench_generate.generate(tmp_path / "b", "small", 3, seed=1, today=TODAY)
    other = bench_generate.generate(tmp_path / "c", "small", 3, seed=2, today=TODAY)

    def contents(summary: bench_generate.Summary) -> list[bytes]:
        return [p.read_bytes() for f in study_folders(summary) for p in sorted(f.iterdir())]

    assert contents(first) == contents(again)
    assert contents(first) != contents(other)


def test_scale_changes_sizes_not_uids(tmp_path: Path) -> None:
    small = bench_generate.generate(tmp_path / "s", "ct", 1, scale=0.001, seed=3, today=TODAY)
    large = bench_generate.generate(tmp_path / "l", "ct", 1, scale=0.01, seed=3, today=TODAY)

    def uids(summary: bench_generate.Summary) -> list[str]:
        return [ds.SOPInstanceUID for ds in read_study(study_folders(summary)[0])]

    assert uids(small) == uids(large)
    assert small.bytes < large.bytes


def test_full_scale_sizes_are_realistic(tmp_path: Path) -> None:
    """One CT slice is about 0.5 MB and a small instance a few KB (a scale-1 US clip is tens
    of MB, too big for a unit test: 20-120 frames of 640x480)."""
    bench_generate.generate(tmp_path / "ct", "ct", 1, today=TODAY)
    slice_ = next((tmp_path / "ct" / "study000001").iterdir())
    assert 512 * 512 * 2 < slice_.stat().st_size < 600_000
    bench_generate.generate(tmp_path / "small", "small", 1, today=TODAY)
    for path in (tmp_path / "small" / "study000001").iterdir():
        assert 4096 < path.stat().st_size < 10_000


@pytest.mark.parametrize(
    ("profile", "studies", "scale", "message"),
    [
        ("xray", 1, 1.0, "unknown profile 'xray'"),
        ("ct", -1, 1.0, "studies must be 0 or more"),
        ("ct", 1, 0.0, "scale must be above 0"),
    ],
)
def test_bad_arguments_are_refused(
    tmp_path: Path, profile: str, studies: int, scale: float, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        bench_generate.generate(tmp_path, profile, studies, scale=scale)


def test_a_folder_that_is_not_empty_is_refused(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        bench_generate.generate(tmp_path, "small", 1)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_command_line_prints_a_summary(tmp_path: Path) -> None:
    out = tmp_path / "out"
    command = [sys.executable, str(BENCH / "generate.py"), str(out), "--profile", "small"]
    command += ["--studies", "2", "--scale", "0.5", "--seed", "4", "--quiet"]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("2 studies (2 small), ")
    assert len(list(out.iterdir())) == 2

    again = subprocess.run(command, capture_output=True, text=True, check=False)
    assert again.returncode == 2
    assert "not an empty folder" in again.stderr
    assert again.stderr.count("\n") == 1


def test_instances_by_series_are_numbered_from_one(
    runs: dict[str, bench_generate.Summary],
) -> None:
    for folder in study_folders(runs["ct"]):
        numbers: dict[str, list[int]] = defaultdict(list)
        for ds in read_study(folder):
            numbers[ds.SeriesInstanceUID].append(int(ds.InstanceNumber))
        for series in numbers.values():
            assert sorted(series) == list(range(1, len(series) + 1))
