"""The study list: statuses, filters and the views ``studies`` and ``study show`` print."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import msgspec

from .errors import StudyvaultError, UnknownStudyError
from .records import InstanceRecord, StudyRecord
from .storage import Role
from .vault import Vault

STATUSES = ("online", "archived", "fetched")


class Copy(msgspec.Struct):
    storage: str
    role: str
    location: str


class StudyView(msgspec.Struct, kw_only=True):
    """One row of the study list."""

    study_uid: str
    patient_name: str
    patient_id: str
    patient_birth_date: str
    patient_sex: str
    study_date: str  # ISO date or ""
    study_time: str
    study_id: str
    description: str
    accession_number: str
    modalities: list[str]
    instances: int
    size: int
    status: str  # online | archived | fetched
    fetched_until: str | None
    copies: list[Copy]


class SeriesView(msgspec.Struct, kw_only=True):
    series_uid: str
    series_number: int | None
    modality: str
    description: str
    instances: int
    size: int


class StudyDetail(StudyView, kw_only=True):
    series: list[SeriesView]


def iso_date(value: str) -> str:
    return f"{value[:4]}-{value[4:6]}-{value[6:]}" if len(value) == 8 else ""


def parse_date(value: str, what: str) -> str:
    """A date given as YYYY-MM-DD or YYYYMMDD, as YYYYMMDD."""
    text = value.strip().replace("-", "")
    try:
        return dt.datetime.strptime(text, "%Y%m%d").strftime("%Y%m%d")
    except ValueError:
        raise StudyvaultError(f"{what}: {value!r} is not a date (use YYYY-MM-DD)") from None


def years_ago(years: int, today: dt.date | None = None) -> str:
    """YYYYMMDD of the day ``years`` years before ``today``; a study dated before it is
    older than ``years`` years."""
    today = today or dt.date.today()
    try:
        then = today.replace(year=today.year - years)
    except ValueError:  # 29 February
        then = today.replace(year=today.year - years, day=28)
    return then.strftime("%Y%m%d")


def status_of(vault: Vault, study: StudyRecord) -> str:
    online = any(
        (s := vault.storage_by_id(sid)) is not None and s.role is Role.IMAGE_DIRECTORY
        for sid in study.copies
    )
    if online and study.fetched_from:
        return "fetched"
    return "online" if online else "archived"


def view(vault: Vault, study: StudyRecord) -> StudyView:
    copies = []
    for sid, location in sorted(study.copies.items()):
        storage = vault.storage_by_id(sid)
        copies.append(
            Copy(
                storage=storage.name if storage else vault.storage_name(sid),
                role=storage.role.value if storage else "unknown",
                location=location,
            )
        )
    return StudyView(
        study_uid=study.study_uid,
        patient_name=study.patient_name,
        patient_id=study.patient_id,
        patient_birth_date=iso_date(study.patient_birth_date),
        patient_sex=study.patient_sex,
        study_date=iso_date(study.study_date),
        study_time=study.study_time,
        study_id=study.study_id,
        description=study.study_description,
        accession_number=study.accession_number,
        modalities=study.modalities,
        instances=study.instance_count,
        size=study.size,
        status=status_of(vault, study),
        fetched_until=study.fetched_until if study.fetched_from else None,
        copies=copies,
    )


def list_studies(
    vault: Vault,
    *,
    patient: str | None = None,
    older_than_years: int | None = None,
    date_from: str | None = None,
    date_to: str | None = None,
    status: str | None = None,
    storage: str | None = None,
) -> Iterator[StudyView]:
    """Stream the study list, oldest first, filtered."""
    if status is not None and status not in STATUSES:
        raise StudyvaultError(f"--status: {status!r} is not one of {', '.join(STATUSES)}")
    start = parse_date(date_from, "--from") if date_from else None
    end = parse_date(date_to, "--to") if date_to else None
    if older_than_years is not None:
        if older_than_years < 0:
            raise StudyvaultError(f"--older-than-years: {older_than_years} is negative")
        cutoff = years_ago(older_than_years)
        before_cutoff = (dt.datetime.strptime(cutoff, "%Y%m%d") - dt.timedelta(days=1)).strftime(
            "%Y%m%d"
        )
        end = min(end, before_cutoff) if end else before_cutoff
    storage_id = vault.storage(storage).id if storage else None
    needle = _fold(patient) if patient else None
    dated_only = start is not None or end is not None
    for study in vault.index.iter_studies(
        date_from=start, date_to=end, storage=storage_id, include_undated=not dated_only
    ):
        if (
            needle
            and needle not in _fold(study.patient_name)
            and needle not in _fold(study.patient_id)
        ):
            continue
        row = view(vault, study)
        if status is None or row.status == status:
            yield row


def _fold(text: str) -> str:
    return " ".join(text.replace("^", " ").casefold().split())


def get_study(vault: Vault, study_uid: str) -> StudyRecord:
    study = vault.index.get_study(study_uid)
    if study is None:
        raise UnknownStudyError(f"no study with StudyInstanceUID {study_uid} in the index")
    return study


def detail(vault: Vault, study_uid: str) -> StudyDetail:
    study = get_study(vault, study_uid)
    base = view(vault, study)
    series: dict[str, SeriesView] = {}
    for inst in vault.index.instances(study_uid):
        s = series.get(inst.series_uid)
        if s is None:
            s = series[inst.series_uid] = SeriesView(
                series_uid=inst.series_uid,
                series_number=inst.series_number,
                modality=inst.modality,
                description=inst.series_description,
                instances=0,
                size=0,
            )
        s.instances += 1
        s.size += inst.size
    ordered = sorted(series.values(), key=lambda s: (s.series_number or 0, s.series_uid))
    return StudyDetail(**msgspec.structs.asdict(base), series=ordered)


def instances_in(vault: Vault, study_uid: str) -> list[InstanceRecord]:
    return vault.index.instances(study_uid)
