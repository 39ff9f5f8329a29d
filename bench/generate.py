"""Generate realistic sample DICOM studies for the benchmarks.

Run it as a script::

    python bench/generate.py OUT_DIR --profile mixed --studies 100 [--scale 0.1] [--seed 0]

or import it from another benchmark script (``bench/`` is not a package)::

    sys.path.insert(0, str(Path(__file__).parent))
    from generate import generate

    summary = generate(Path("/tmp/studies"), "ct", studies=10, scale=0.1)

Profiles (one folder per study, ``OUT_DIR/study000001/`` …):

``ultrasound``
    3-6 Ultrasound Multi-frame instances of 640x480 pixels (RGB, or 8-bit monochrome),
    12-55 MB each, with no file name extension (only content says they are DICOM).
``ct``
    150-250 CT instances of 512x512 16-bit (about 0.5 MB each) in 1-2 series, ``.dcm``.
``small``
    2-4 Secondary Capture instances of a few KB each: for index scaling runs to
    100,000 studies.
``mixed``
    each study drawn at random: 60 % small, 30 % ultrasound, 10 % ct.

``--scale`` multiplies the pixel bytes of every instance (frames first, then rows and
columns); the number of studies, series and instances stays the same, so a quick run
has the same shape as a full one. ``--seed`` makes a run reproducible: the same
profile, seed and ``--today`` give the same UIDs, names and dates at any scale, and
byte-equal files at the same scale; so two runs meant to be imported together need
different seeds (or profiles), or their studies would share UIDs.

Study dates spread over the 12 years before ``--today``; patients (a few studies each)
are drawn from a built-in list of names, some non-ASCII (written with
SpecificCharacterSet ``ISO_IR 192``, UTF-8). Pixel data is random but
not white noise (dark margins, few grey levels), so it compresses somewhat like real
images. No numpy needed: bytes come from :meth:`random.Random.randbytes`.
"""

from __future__ import annotations

import argparse
import math
import random
import struct
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path

import pydicom
from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.tag import BaseTag, Tag
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian

__all__ = ["PROFILES", "Summary", "generate", "main"]

US_MULTIFRAME = UID("1.2.840.10008.5.1.4.1.1.3.1")  # Ultrasound Multi-frame Image Storage
CT_IMAGE = UID("1.2.840.10008.5.1.4.1.1.2")  # CT Image Storage
SECONDARY_CAPTURE = UID("1.2.840.10008.5.1.4.1.1.7")  # Secondary Capture Image Storage

#: Study kinds and, for ``mixed``, the share of studies drawn from each.
MIX: dict[str, float] = {"small": 0.6, "ultrasound": 0.3, "ct": 0.1}
PROFILES: tuple[str, ...] = (*MIX, "mixed")

#: (PatientName, PatientSex); non-ASCII names are written as UTF-8 (ISO_IR 192).
NAMES: tuple[tuple[str, str], ...] = (
    ("Smith^John", "M"),
    ("Johnson^Mary^Ann", "F"),
    ("Brown^Michael", "M"),
    ("Garcia^Maria", "F"),
    ("Miller^David^R", "M"),
    ("Davis^Linda", "F"),
    ("Wilson^James", "M"),
    ("Taylor^Susan", "F"),
    ("O'Brien^Siobhan", "F"),
    ("van der Berg^Pieter", "M"),
    ("Anderson^Thomas", "M"),
    ("Nakamura^Keiko", "F"),
    ("Müller^Jürgen", "M"),
    ("Øvergård^Åse", "F"),
    ("Dvořák^Jiří", "M"),
    ("García Márquez^José", "M"),
    ("Łukasiewicz^Zofia", "F"),
    ("Nguyễn^Thị Mai", "F"),
    ("Иванова^Ольга", "F"),
    ("Yamada^Tarou=山田^太郎=やまだ^たろう", "M"),
)

DESCRIPTIONS: dict[str, tuple[str, ...]] = {
    "ultrasound": (
        "US ABDOMEN COMPLETE",
        "US OB 2ND TRIMESTER",
        "ECHOCARDIOGRAM TTE",
        "US THYROID",
        "US CAROTID DOPPLER",
        "US PELVIS TRANSVAGINAL",
    ),
    "ct": (
        "CT CHEST W/O CONTRAST",
        "CT ABDOMEN PELVIS W CONTRAST",
        "CT HEAD W/O CONTRAST",
        "CT LUMBAR SPINE",
    ),
    "small": ("SCANNED REFERRAL", "OUTSIDE REPORT", "KEY IMAGES", "DOSE REPORT SCREEN"),
}

_PREAMBLE = bytes(128) + b"DICM"
_ASCII = [default_encoding]
_SHADES_64 = bytes(b >> 2 for b in range(256))  # 64 grey levels per 8-bit sample
_LOW_BITS_2 = bytes(b & 0x03 for b in range(256))  # high byte of a 10-bit value


@dataclass(frozen=True)
class Summary:
    """What one :func:`generate` run wrote.

    :param out: the folder holding one folder per study.
    :param profile: the profile asked for.
    :param studies: studies written.
    :param files: DICOM files written.
    :param bytes: their total size.
    :param seconds: wall-clock time taken.
    :param kinds: studies written of each kind (``ultrasound``, ``ct``, ``small``).
    """

    out: Path
    profile: str
    studies: int
    files: int
    bytes: int
    seconds: float
    kinds: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        seconds = max(self.seconds, 1e-9)
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(self.kinds.items()))
        return (
            f"{self.studies} studies ({kinds or 'none'}), {self.files} files, "
            f"{_human(self.bytes)} in {self.seconds:.1f} s "
            f"({_human(self.bytes / seconds)}/s, {self.files / seconds:,.0f} files/s) "
            f"in {self.out}"
        )


def _human(size: float) -> str:
    """Return a size in B, KB, MB, GB or TB (powers of 1000)."""
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:,.1f} TB"


@dataclass(frozen=True)
class _Patient:
    name: str
    sex: str
    patient_id: str
    birth_date: date


@dataclass
class _Writer:
    """Writes the instances of one run and counts them."""

    scale: float
    meta: random.Random  # UIDs, names, dates, counts: independent of scale
    pixels: random.Random  # pixel bytes and their per-instance shift
    files: int = 0
    size: int = 0

    def uid(self) -> UID:
        """Return a fresh ``2.25`` UID (a version-4 UUID drawn from the seeded generator)."""
        return UID(f"2.25.{uuid.UUID(int=self.meta.getrandbits(128), version=4).int}")

    def write_series(
        self,
        folder: Path,
        ds: Dataset,
        pixels: bytes,
        count: int,
        name: str,
        *,
        align: int,
        per_instance: Callable[[Dataset, int], None] | None = None,
        varying: tuple[str, ...] = (),
    ) -> None:
        """Write ``count`` instances of one series from one dataset, changing only what differs.

        The elements every instance shares are encoded once; per instance only the UIDs,
        the instance number and the ``varying`` elements are, and the pixel data is
        written from the series' buffer without a copy. The files are byte for byte
        what ``ds.save_as(path, enforce_file_format=True)`` would write; opening the
        file is then most of the cost of a small one.

        :param folder: the study folder.
        :param ds: the series' dataset, with file meta and without pixel data; mutated
            per instance.
        :param pixels: the series' pixel data; each instance gets it rotated by a
            random multiple of ``align`` bytes, so no two files are alike.
        :param count: instances in the series.
        :param name: file name pattern with ``{n}`` for the instance number.
        :param align: bytes per pixel, keeping the rotation on pixel boundaries.
        :param per_instance: sets further per-instance attributes (slice position).
        :param varying: keywords of the attributes ``per_instance`` sets.
        """
        if "PixelData" in ds:
            raise ValueError("pass the pixel data apart from the dataset; it is written last")
        if len(pixels) % 2:
            pixels += b"\0"  # an odd-length value is padded to even length
        vr = b"OW" if ds.BitsAllocated > 8 else b"OB"
        pixel_header = struct.pack("<HH2s2xI", 0x7FE0, 0x0010, vr, len(pixels))
        view = memoryview(pixels)
        body = meta = None
        for number in range(1, count + 1):
            sop_uid = self.uid()
            ds.SOPInstanceUID = sop_uid
            ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
            ds.InstanceNumber = number
            if per_instance is not None:
                per_instance(ds, number)
            if body is None or meta is None:
                body = _Template(ds, ("SOPInstanceUID", "InstanceNumber", *varying))
                meta = _Template(ds.file_meta, ("MediaStorageSOPInstanceUID",))
            meta_parts = meta.encode()
            group_length = DataElement(0x00020000, "UL", sum(map(len, meta_parts)))
            shift = self.pixels.randrange(len(pixels) // align) * align
            parts: list[bytes | memoryview] = [
                _PREAMBLE,
                _encode([group_length], _ASCII),
                *meta_parts,
                *body.encode(),
                pixel_header,
                view[shift:],
                view[:shift],
            ]
            with open(folder / name.format(n=number), "wb") as file:
                file.writelines(parts)
            self.files += 1
            self.size += sum(map(len, parts))


def _encode(elements: Iterable[DataElement], encodings: list[str]) -> bytes:
    """Encode data elements as explicit VR little endian."""
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    for element in elements:
        write_data_element(buffer, element, encodings)
    return buffer.getvalue()


class _Template:
    """A dataset encoded once, except for a few elements re-encoded on every call.

    :param ds: the dataset, later changed only in its ``varying`` elements.
    :param varying: keywords of the elements that change between calls.
    """

    def __init__(self, ds: Dataset, varying: Iterable[str]) -> None:
        self._ds = ds
        self._encodings = convert_encodings(ds.get("SpecificCharacterSet", default_encoding))
        changing = {Tag(keyword) for keyword in varying}
        self._parts: list[bytes | BaseTag] = []
        run: list[DataElement] = []
        for tag in sorted(ds.keys()):
            if tag in changing:
                self._parts += [_encode(run, self._encodings), tag]
                run = []
            else:
                run.append(ds[tag])
        self._parts.append(_encode(run, self._encodings))

    def encode(self) -> list[bytes]:
        """Return the dataset's encoding in pieces, in tag order."""
        ds, encodings = self._ds, self._encodings
        return [p if isinstance(p, bytes) else _encode([ds[p]], encodings) for p in self._parts]


def generate(
    out: Path,
    profile: str,
    studies: int,
    scale: float = 1.0,
    seed: int = 0,
    *,
    today: date | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Summary:
    """Write ``studies`` sample studies into ``out``, one folder per study.

    :param out: a new or empty folder.
    :param profile: ``ultrasound``, ``ct``, ``small`` or ``mixed``.
    :param studies: how many studies to write.
    :param scale: multiplies the pixel bytes of each instance (``0.01`` for quick runs).
    :param seed: makes the run reproducible.
    :param today: study dates spread over the 12 years before it (default: today).
    :param progress: called as ``progress(done, studies)`` after each study.
    :raises ValueError: for an unknown profile, a negative count or a scale not above 0.
    :raises FileExistsError: when ``out`` exists and is not an empty folder.
    """
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r} (choose from {', '.join(PROFILES)})")
    if studies < 0:
        raise ValueError(f"studies must be 0 or more, not {studies}")
    if not scale > 0:
        raise ValueError(f"scale must be above 0, not {scale}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} is not an empty folder; give a new or empty one")
    out.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    today = today or date.today()
    # seeded per profile, so runs of different profiles never share UIDs
    meta, pixels = random.Random(f"{profile}:{seed}"), random.Random(f"{profile}:{seed}:pixels")
    writer = _Writer(scale=scale, meta=meta, pixels=pixels)
    patients = _patients(writer.meta, max(1, round(studies / 2.5)), today)
    kinds: Counter[str] = Counter()
    for index in range(1, studies + 1):
        kind = profile
        if profile == "mixed":
            kind = writer.meta.choices(list(MIX), weights=list(MIX.values()))[0]
        kinds[kind] += 1
        study = _study_dataset(writer, writer.meta.choice(patients), kind, today)
        folder = out / f"study{index:06d}"
        folder.mkdir()
        _STUDY_WRITERS[kind](writer, folder, study)
        if progress is not None:
            progress(index, studies)
    return Summary(
        out=out,
        profile=profile,
        studies=studies,
        files=writer.files,
        bytes=writer.size,
        seconds=time.perf_counter() - started,
        kinds=dict(kinds),
    )


def _patients(rng: random.Random, count: int, today: date) -> list[_Patient]:
    patients = []
    for number in range(count):
        name, sex = rng.choice(NAMES)
        # born at least 13 years ago, so before any study of the last 12 years
        birth = today - timedelta(days=rng.randint(13 * 365, 95 * 365))
        patients.append(_Patient(name, sex, f"SV{100000 + number:07d}", birth))
    return patients


def _study_dataset(writer: _Writer, patient: _Patient, kind: str, today: date) -> Dataset:
    """Return the patient and study attributes shared by every instance of one study."""
    rng = writer.meta
    study_date = today - timedelta(days=rng.randrange(12 * 365))
    ds = Dataset()
    if not patient.name.isascii():
        ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = f"{patient.birth_date:%Y%m%d}"
    ds.PatientSex = patient.sex
    ds.StudyInstanceUID = writer.uid()
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = f"{study_date:%Y%m%d}"
    ds.StudyTime = f"{rng.randint(7, 18):02d}{rng.randrange(60):02d}{rng.randrange(60):02d}"
    ds.SeriesTime = ds.ContentTime = ds.StudyTime
    ds.AccessionNumber = f"A{rng.randrange(10**8):08d}"
    ds.StudyID = str(rng.randint(1, 99999))
    ds.StudyDescription = rng.choice(DESCRIPTIONS[kind])
    ds.ReferringPhysicianName = rng.choice(("Jones^Peter^^Dr", "Okafor^Ada^^Dr", ""))
    ds.InstitutionName = "Studyvault Sample Clinic"
    ds.Manufacturer = "studyvault bench"
    return ds


def _series_dataset(
    writer: _Writer, study: Dataset, sop_class: UID, modality: str, number: int, text: str
) -> Dataset:
    """Return a copy of ``study`` with file meta and the attributes of one new series."""
    ds = Dataset()
    ds.update(study)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.FileMetaInformationVersion = b"\0\1"
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta.ImplementationVersionName = f"PYDICOM {pydicom.__version__}"
    ds.SOPClassUID = sop_class
    ds.Modality = modality
    ds.SeriesInstanceUID = writer.uid()
    ds.SeriesNumber = number
    ds.SeriesDescription = text
    return ds


def _shrink(rows: int, columns: int, factor: float) -> tuple[int, int]:
    """Scale an image's area by ``factor``, keeping its aspect; sides are multiples of 8."""
    side = math.sqrt(factor)
    return max(8, round(rows * side / 8) * 8), max(8, round(columns * side / 8) * 8)


def _image(rng: random.Random, rows: int, columns: int, frames: int, sample: int) -> bytes:
    """Return random frames with black left and right margins, ``sample`` bytes a pixel."""
    row = columns * sample
    margin = (columns // 6) * sample
    pixels = bytearray(rng.randbytes(rows * row * frames).translate(_SHADES_64))
    blank = bytes(margin)
    for start in range(0, len(pixels), row):
        pixels[start : start + margin] = blank
        pixels[start + row - margin : start + row] = blank
    return bytes(pixels)


def _ultrasound_study(writer: _Writer, folder: Path, study: Dataset) -> None:
    rng = writer.meta
    rgb = rng.random() < 0.7
    frames = rng.randint(20, 60) if rgb else rng.randint(40, 120)
    count = rng.randint(3, 6)
    rows, columns = 480, 640
    wanted = frames * writer.scale
    if wanted >= 1:
        frames = round(wanted)
    else:
        frames, (rows, columns) = 1, _shrink(rows, columns, wanted)
    ds = _series_dataset(writer, study, US_MULTIFRAME, "US", 1, study.StudyDescription)
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SamplesPerPixel = 3 if rgb else 1
    ds.PhotometricInterpretation = "RGB" if rgb else "MONOCHROME2"
    if rgb:
        ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.NumberOfFrames = frames
    ds.FrameTime = 33.3
    ds.FrameIncrementPointer = 0x00181063  # FrameTime
    ds.CineRate = 30
    ds.LossyImageCompression = "00"
    sample = 3 if rgb else 1
    pixels = _image(writer.pixels, rows, columns, frames, sample)
    writer.write_series(folder, ds, pixels, count, "US1_{n:04d}", align=sample)


def _ct_study(writer: _Writer, folder: Path, study: Dataset) -> None:
    rng = writer.meta
    total = rng.randint(150, 250)
    series_count = rng.randint(1, 2)
    rows, columns = _shrink(512, 512, writer.scale)
    frame_of_reference = writer.uid()
    for series in range(1, series_count + 1):
        count = total // series_count + (series <= total % series_count)
        thickness = rng.choice((1.0, 1.25, 2.5, 5.0))
        text = f"AXIAL {thickness:g}mm {rng.choice(('SOFT TISSUE', 'BONE', 'LUNG'))}"
        ds = _series_dataset(writer, study, CT_IMAGE, "CT", series, text)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = rows, columns
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.WindowCenter, ds.WindowWidth = 40, 400
        ds.KVP = rng.choice((100, 120))
        ds.AcquisitionNumber = series
        ds.SliceThickness = thickness
        ds.PixelSpacing = [round(350 / columns, 4), round(350 / rows, 4)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PatientPosition = "HFS"
        ds.FrameOfReferenceUID = frame_of_reference
        ds.PositionReferenceIndicator = ""

        def place(ds: Dataset, number: int, thickness: float = thickness) -> None:
            z = round(-number * thickness, 2)
            ds.ImagePositionPatient = [-175, -175, z]
            ds.SliceLocation = z

        # 16-bit little endian with the high byte 0-3: values below 1024 (BitsStored 12)
        pixels = bytearray(_image(writer.pixels, rows, columns, 1, 2))
        pixels[1::2] = pixels[1::2].translate(_LOW_BITS_2)
        writer.write_series(
            folder,
            ds,
            bytes(pixels),
            count,
            f"CT{series}_{{n:04d}}.dcm",
            align=2,
            per_instance=place,
            varying=("ImagePositionPatient", "SliceLocation"),
        )


def _small_study(writer: _Writer, folder: Path, study: Dataset) -> None:
    rng = writer.meta
    rows, columns = _shrink(64, 64, writer.scale)
    ds = _series_dataset(writer, study, SECONDARY_CAPTURE, "OT", 1, study.StudyDescription)
    ds.ConversionType = "WSD"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    pixels = _image(writer.pixels, rows, columns, 1, 1)
    writer.write_series(folder, ds, pixels, rng.randint(2, 4), "SC1_{n:04d}.dcm", align=1)


_STUDY_WRITERS: dict[str, Callable[[_Writer, Path, Dataset], None]] = {
    "ultrasound": _ultrasound_study,
    "ct": _ct_study,
    "small": _small_study,
}


def main(argv: list[str] | None = None) -> int:
    """Run the generator from the command line; return the exit status.

    :param argv: arguments without the program name (default: ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, metavar="OUT_DIR", help="new or empty folder")
    parser.add_argument("--profile", choices=PROFILES, default="mixed")
    parser.add_argument("--studies", type=int, default=10)
    parser.add_argument("--scale", type=float, default=1.0, help="pixel bytes multiplier")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--today", type=date.fromisoformat, default=None, help="YYYY-MM-DD")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = parser.parse_args(argv)

    last = time.monotonic()

    def progress(done: int, total: int) -> None:
        nonlocal last
        if not args.quiet and (time.monotonic() - last > 5 or done == total):
            last = time.monotonic()
            print(f"{done}/{total} studies", file=sys.stderr, flush=True)

    try:
        summary = generate(
            args.out,
            args.profile,
            args.studies,
            args.scale,
            args.seed,
            today=args.today,
            progress=progress,
        )
    except (ValueError, FileExistsError) as error:
        print(f"generate.py: {error}", file=sys.stderr)
        return 2
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
