"""Small, valid DICOM files for tests and benchmarks, written with pydicom.

Plugin authors use these to put studies into a storage under test::

    from studyvault.testing.dicomgen import make_study

    paths = make_study(tmp_path / "in", n_instances=3, n_series=2)

Files are quick to make (hundreds per second): a minimal CT-like header and
``pixel_bytes`` of zeroed 8-bit pixel data.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    generate_uid,
)

__all__ = ["make_instance", "make_study"]

_MAX_COLUMNS = 1024


def make_instance(
    path: str | os.PathLike[str],
    *,
    study_uid: str,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    patient_name: str = "DOE^JOHN",
    patient_id: str = "PID1",
    study_date: str = "20100101",
    modality: str = "CT",
    sop_class_uid: str = CTImageStorage,
    pixel_bytes: int = 1024,
    transfer_syntax: str = ExplicitVRLittleEndian,
    preamble: bool = True,
    **extra: Any,
) -> Path:
    """Write one DICOM instance and return its path.

    With ``preamble=True`` (the normal case) the file is PS3.10 conformant: preamble,
    ``DICM``, file meta, then the data set in `transfer_syntax`. With ``preamble=False``
    it is a bare data set -- no preamble, no file meta -- as old modalities wrote them;
    a deflated transfer syntax needs the file meta, so it cannot be combined with that.

    The pixel data is 8-bit monochrome, zero-filled: a single row when `pixel_bytes`
    is at most 1024, else rows of 1024 columns (`pixel_bytes` is rounded up to fill the
    last row, and to an even length). ``pixel_bytes=0`` writes no image at all.

    :param path: where to write; parent folders are created.
    :param study_uid: the StudyInstanceUID.
    :param series_uid: the SeriesInstanceUID; a new UID when None.
    :param sop_uid: the SOPInstanceUID; a new UID when None.
    :param patient_name: PatientName; non-ASCII names need ``SpecificCharacterSet`` in
        `extra` (for example ``"ISO_IR 192"``).
    :param patient_id: PatientID.
    :param study_date: StudyDate, YYYYMMDD.
    :param modality: Modality.
    :param sop_class_uid: SOPClassUID, CT Image Storage by default.
    :param pixel_bytes: the size of the pixel data in bytes.
    :param transfer_syntax: the transfer syntax UID of the data set.
    :param preamble: False for a bare data set without preamble and file meta.
    :param extra: more data set attributes by keyword (``SeriesNumber=2``,
        ``StudyDescription="CHEST"``, ``NumberOfFrames=10``...); they are set last, so
        they replace the defaults above.
    :returns: `path` as a :class:`~pathlib.Path`.
    """
    if not preamble and transfer_syntax == DeflatedExplicitVRLittleEndian:
        raise ValueError("a deflated data set needs file meta: use preamble=True")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sop_uid = sop_uid or generate_uid()

    ds = Dataset()
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = study_date
    ds.StudyTime = "120000"
    ds.AccessionNumber = ""
    ds.Modality = modality
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    if pixel_bytes > 0:
        columns = min(pixel_bytes, _MAX_COLUMNS)
        rows = math.ceil(pixel_bytes / columns)
        length = rows * columns
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = columns
        ds.BitsAllocated = 8
        ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelRepresentation = 0
        ds.PixelData = bytes(length + length % 2)
    for keyword, value in extra.items():
        setattr(ds, keyword, value)

    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)
    if preamble:
        ds.save_as(path, enforce_file_format=True)
    else:
        tsyntax = ds.file_meta.TransferSyntaxUID
        del ds.file_meta
        dcmwrite(
            path,
            ds,
            implicit_vr=tsyntax.is_implicit_VR,
            little_endian=tsyntax.is_little_endian,
        )
    return path


def make_study(
    folder: str | os.PathLike[str],
    *,
    n_instances: int,
    n_series: int = 1,
    study_uid: str | None = None,
    study_date: str = "20100101",
    patient_name: str = "DOE^JOHN",
    patient_id: str = "PID1",
    pixel_bytes: int = 1024,
    modality: str = "CT",
    **extra: Any,
) -> list[Path]:
    """Write a whole study into `folder` and return the paths of its instances.

    The instances are shared out over `n_series` series in turn, numbered from 1 in
    each series, and named ``<folder>/<series number>/IM<n>.dcm``.

    :param folder: where to write; created when missing.
    :param n_instances: how many instances (files) the study has.
    :param n_series: how many series share them.
    :param study_uid: the StudyInstanceUID; a new UID when None.
    :param study_date: StudyDate, YYYYMMDD.
    :param patient_name: PatientName.
    :param patient_id: PatientID.
    :param pixel_bytes: the pixel data size of each instance.
    :param modality: Modality of every series.
    :param extra: more attributes for every instance, as in :func:`make_instance`.
    :returns: the instance paths, in creation order.
    """
    folder = Path(folder)
    study_uid = study_uid or generate_uid()
    series_uids = [generate_uid() for _ in range(n_series)]
    paths = []
    for index in range(n_instances):
        series = index % n_series
        number = index // n_series + 1
        paths.append(
            make_instance(
                folder / str(series + 1) / f"IM{number}.dcm",
                study_uid=study_uid,
                series_uid=series_uids[series],
                patient_name=patient_name,
                patient_id=patient_id,
                study_date=study_date,
                modality=modality,
                pixel_bytes=pixel_bytes,
                **{"SeriesNumber": series + 1, "InstanceNumber": number, **extra},
            )
        )
    return paths
