"""Storage estimates: what a practice's machines will need, and how long storage lasts.

:func:`project` turns a workload (machines, studies a day, working days a year, study
size, years to keep) into storage per year and in total, in decimal units (1 GB =
1000 MB, as disks are sold): 10 studies a day on 250 days of 150 MB are 375 GB a year
per ultrasound machine. Kept for 7 years, two such machines need 5.25 TB for the 7
years, and 6 TB at the most held at once under that retention (the 7 years kept plus
the year being filled, before the oldest year may be deleted): the seed's "about 6 TB".

:func:`observe` reads the live index: the bytes stored per month (by the time a study's
newest instance was stored by studyvault, not its study date), the growth per day and
month over recent months, and, for each image directory and archive, the days left
until its free space above its reserve is used up at that growth.
"""

from __future__ import annotations

import datetime as dt
import time

import msgspec

from .errors import StudyvaultError
from .storage import Role, Status, Storage
from .vault import Vault

MB = 1000**2
DAY = 86400.0
#: average days in a month (a Gregorian year of 365.2425 days / 12)
MONTH_DAYS = 365.2425 / 12


class Workload(msgspec.Struct, frozen=True, kw_only=True):
    """What the practice produces. Defaults: one ultrasound machine of the seed."""

    machines: int = 1
    studies_per_day: float = 10.0
    days_per_year: int = 250
    study_mb: float = 150.0
    years: int = 7


class YearRow(msgspec.Struct, kw_only=True):
    year: int
    studies: int  # stored that year, all machines
    added_bytes: int
    total_bytes: int  # cumulative at the end of the year


class Projection(msgspec.Struct, kw_only=True):
    workload: Workload
    studies_per_machine_per_year: int
    per_machine_per_year_bytes: int
    studies_per_year: int
    per_year_bytes: int
    total_studies: int
    total_bytes: int
    #: the most held at once when every study is kept ``years`` and then deleted: the
    #: years kept plus the year being filled, just before the oldest year may go
    peak_bytes: int
    years: list[YearRow]


def check_workload(workload: Workload) -> None:
    """Raise a one-line :class:`~studyvault.errors.StudyvaultError` naming the first
    option that is not a usable figure."""
    checks = (
        ("--machines", workload.machines, 1_000_000),
        ("--studies-per-day", workload.studies_per_day, 1_000_000),
        ("--days-per-year", workload.days_per_year, 366),
        ("--study-mb", workload.study_mb, 10_000_000),
        ("--years", workload.years, 1000),
    )
    for option, value, most in checks:
        if not value > 0:  # also refuses NaN
            raise StudyvaultError(f"{option}: must be more than 0, not {value:g}")
        if value > most:
            raise StudyvaultError(f"{option}: {value:g} is more than {most:,}")


def project(workload: Workload) -> Projection:
    """Storage needed per machine per year, per year, and in total over the years."""
    check_workload(workload)
    studies_machine = workload.studies_per_day * workload.days_per_year
    per_machine = round(studies_machine * workload.study_mb * MB)
    per_year = per_machine * workload.machines
    studies_year = round(studies_machine * workload.machines)
    rows = [
        YearRow(
            year=n,
            studies=studies_year,
            added_bytes=per_year,
            total_bytes=per_year * n,
        )
        for n in range(1, workload.years + 1)
    ]
    return Projection(
        workload=workload,
        studies_per_machine_per_year=round(studies_machine),
        per_machine_per_year_bytes=per_machine,
        studies_per_year=studies_year,
        per_year_bytes=per_year,
        total_studies=studies_year * workload.years,
        total_bytes=per_year * workload.years,
        peak_bytes=per_year * (workload.years + 1),
        years=rows,
    )


class MonthRow(msgspec.Struct, kw_only=True):
    month: str  # YYYY-MM, local time
    studies: int
    bytes: int


class StorageOutlook(msgspec.Struct, kw_only=True):
    """One storage's room at the observed growth."""

    name: str
    role: str  # "image directory" | "archive"
    status: str
    free_bytes: int | None  # None when not Online (an unmounted archive is not touched)
    reserve_mb: int  # the configured min_free_mb (MB of 1024 * 1024 bytes, as checked)
    reserve_bytes: int
    usable_bytes: int | None  # free above the reserve
    days_left: int | None  # None: no growth (never full), or not Online
    full_by: str | None  # ISO date it would be full, or None


class Growth(msgspec.Struct, kw_only=True):
    """Growth seen in the live index over the last ``months`` calendar months."""

    months: list[MonthRow]
    since: str  # ISO date the growth is averaged from
    days: float  # length of that period in days (at least 1)
    studies: int
    bytes: int
    bytes_per_day: float
    bytes_per_month: float
    bytes_per_year: float
    unknown_time_studies: int  # stored at an unknown time (e.g. rebuilt from a zip)
    storages: list[StorageOutlook]


def _month_start(day: dt.date, back: int) -> dt.date:
    index = day.year * 12 + day.month - 1 - back
    return dt.date(index // 12, index % 12 + 1, 1)


def observe(vault: Vault, *, months: int = 6, now: float | None = None) -> Growth:
    """Growth per month over the last ``months`` calendar months (this one included),
    by the time each study's newest instance was stored, and each storage's days left.

    The growth per day is averaged from the start of the first month, or from the first
    study ever stored when that is later (a new vault is not diluted by empty months),
    over at least one day. Each storage is judged against the whole practice's growth,
    as if every new study went there: true of the incoming image directory until
    studies are archived, and of an archive in the long run.

    :param months: calendar months to look back, at least 1.
    :param now: the current unix time (tests).
    """
    if months < 1:
        raise StudyvaultError(f"--months: must be more than 0, not {months}")
    now = time.time() if now is None else now
    today = dt.datetime.fromtimestamp(now).date()
    first_month = _month_start(today, months - 1)
    start = dt.datetime.combine(first_month, dt.time()).timestamp()
    labels = [_month_start(today, back).strftime("%Y-%m") for back in range(months - 1, -1, -1)]
    rows = {label: MonthRow(month=label, studies=0, bytes=0) for label in labels}
    earliest = None
    unknown = 0
    for study in vault.index.iter_studies():
        stored = study.last_received
        if stored <= 0:
            unknown += 1
            continue
        earliest = stored if earliest is None else min(earliest, stored)
        if start <= stored <= now:
            row = rows[dt.datetime.fromtimestamp(stored).strftime("%Y-%m")]
            row.studies += 1
            row.bytes += study.size
    since = start if earliest is None else max(start, earliest)
    days = max((now - since) / DAY, 1.0)
    total = sum(r.bytes for r in rows.values())
    per_day = total / days
    return Growth(
        months=list(rows.values()),
        since=dt.datetime.fromtimestamp(since).date().isoformat(),
        days=round(days, 2),
        studies=sum(r.studies for r in rows.values()),
        bytes=total,
        bytes_per_day=per_day,
        bytes_per_month=per_day * MONTH_DAYS,
        bytes_per_year=per_day * MONTH_DAYS * 12,
        unknown_time_studies=unknown,
        storages=[_outlook(s, per_day, today) for s in vault.storages.values()],
    )


def _outlook(storage: Storage, per_day: float, today: dt.date) -> StorageOutlook:
    status = storage.status()
    reserve = storage.config.min_free_mb * 1024 * 1024  # as check_room counts it
    outlook = StorageOutlook(
        name=storage.name,
        role="archive" if storage.role is Role.ARCHIVE else "image directory",
        status=status.value,
        free_bytes=None,
        reserve_mb=storage.config.min_free_mb,
        reserve_bytes=reserve,
        usable_bytes=None,
        days_left=None,
        full_by=None,
    )
    if status is not Status.ONLINE:
        return outlook  # no figures for a storage that cannot be asked
    outlook.free_bytes = storage.free_bytes()
    outlook.usable_bytes = max(outlook.free_bytes - reserve, 0)
    if per_day > 0:
        outlook.days_left = int(outlook.usable_bytes // per_day)
        try:
            outlook.full_by = (today + dt.timedelta(days=outlook.days_left)).isoformat()
        except OverflowError:  # after the year 9999: the count of days says enough
            outlook.full_by = None
    return outlook


def size_text(nbytes: float) -> str:
    """Decimal units with up to two decimals, no trailing zeros: ``375 GB``, ``5.25 TB``."""
    value, units = float(nbytes), ["B", "KB", "MB", "GB", "TB", "PB"]
    unit = units.pop(0)
    while abs(value) >= 1000 and units:
        value, unit = value / 1000, units.pop(0)
    text = f"{value:.2f}".rstrip("0").rstrip(".")
    return f"{text} {unit}"
