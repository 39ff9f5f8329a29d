"""``estimate``: storage needed per year and in total, and how long storage lasts."""

from __future__ import annotations

from typing import Annotated

import typer

from ..config import resolve_config_path
from ..errors import StudyvaultError
from ..estimate import Growth, Projection, Workload, observe, project, size_text
from .common import JsonOption, console, print_json, print_table, state


def register(app: typer.Typer) -> None:
    app.command("estimate")(estimate_cmd)


def _say(text: str = "") -> None:
    console.print(text, markup=False, highlight=False)


def _n(count: float, word: str, plural: str | None = None) -> str:
    return f"{count:,g} {word if count == 1 else plural or word + 's'}"


def estimate_cmd(
    ctx: typer.Context,
    machines: Annotated[int, typer.Option(help="Modalities (machines) producing studies.")] = 1,
    studies_per_day: Annotated[
        float, typer.Option(help="Studies a machine produces on a working day.")
    ] = 10.0,
    days_per_year: Annotated[int, typer.Option(help="Working days a year.")] = 250,
    study_mb: Annotated[float, typer.Option(help="Average study size in MB.")] = 150.0,
    years: Annotated[int, typer.Option(help="Years studies are kept.")] = 7,
    months: Annotated[
        int, typer.Option(help="Months of the live index to average the growth over.")
    ] = 6,
    live: Annotated[
        bool,
        typer.Option("--live/--no-live", help="Add the growth seen in the live study index."),
    ] = True,
    json: Annotated[bool, JsonOption] = False,
) -> None:
    """Storage needed per machine, per year and in total (1 GB = 1000 MB), and, from the
    live study index, the growth per month and the days until each storage is full."""
    workload = Workload(
        machines=machines,
        studies_per_day=studies_per_day,
        days_per_year=days_per_year,
        study_mb=study_mb,
        years=years,
    )
    projection = project(workload)
    if months < 1:
        raise StudyvaultError(f"--months: must be more than 0, not {months}")
    growth, why = _live_growth(ctx, months) if live else (None, "")
    if json:
        print_json({"projection": projection, "live": growth})
        return
    _print_projection(projection)
    if growth is not None:
        _print_growth(growth, months)
    elif why:
        _say()
        _say(why)


def _live_growth(ctx: typer.Context, months: int) -> tuple[Growth | None, str]:
    """The growth in the live index, or None and why there is none. Nothing is created:
    not the default config, not an index."""
    st = state(ctx)
    path, explicit = resolve_config_path(st.config_path)
    if not explicit and not path.exists():
        return None, "No studyvault set up here yet: no observed growth to show."
    vault = st.vault()
    if not (vault.config.index_dir / "data.mdb").exists():
        return None, "There is no study index yet: no observed growth to show."
    return observe(vault, months=months), ""


def _print_projection(p: Projection) -> None:
    w = p.workload
    _say(
        f"Workload: {_n(w.machines, 'machine')} x {_n(w.studies_per_day, 'study', 'studies')}"
        f" a day x {_n(w.days_per_year, 'day')} a year x {w.study_mb:g} MB a study"
    )
    _say(
        f"  {size_text(p.per_machine_per_year_bytes)} per machine per year "
        f"({p.studies_per_machine_per_year:,} studies)"
    )
    _say(
        f"  {size_text(p.per_year_bytes)} per year for {_n(w.machines, 'machine')} "
        f"({p.studies_per_year:,} studies)"
    )
    _say(
        f"  {size_text(p.total_bytes)} in total for {_n(w.years, 'year')} "
        f"({p.total_studies:,} studies)"
    )
    _say(
        f"  {size_text(p.peak_bytes)} at the most held at once when studies are deleted "
        f"after {_n(w.years, 'year')} (the years kept plus the year being filled)"
    )
    print_table(
        ["Year", "Studies", "Added", "Total"],
        [
            (r.year, f"{r.studies:,}", size_text(r.added_bytes), size_text(r.total_bytes))
            for r in p.years
        ],
    )
    _say("Decimal units, as disks are sold: 1 GB = 1000 MB, 1 TB = 1000 GB.")


def _days(days_left: int | None, usable: int | None) -> str:
    if usable is None:
        return ""  # not Online: its status says why
    return "never" if days_left is None else f"{days_left:,}"


def _print_growth(g: Growth, months: int) -> None:
    _say()
    _say(f"Observed in the study index (studies by the month they were stored, last {months}):")
    print_table(
        ["Month", "Studies", "Stored"],
        [(r.month, f"{r.studies:,}", size_text(r.bytes)) for r in g.months],
    )
    _say(
        f"Growth: {size_text(g.bytes_per_month)} a month, {size_text(g.bytes_per_day)} a day, "
        f"{size_text(g.bytes_per_year)} a year (averaged over {_n(g.days, 'day')} since {g.since})"
    )
    if g.unknown_time_studies:
        _say(f"  {g.unknown_time_studies:,} studies were stored at an unknown time; not counted")
    print_table(
        ["Storage", "Role", "Status", "Free", "Reserve", "Days Left", "Full By"],
        [
            (
                s.name,
                s.role,
                s.status,
                "" if s.free_bytes is None else size_text(s.free_bytes),
                f"{s.reserve_mb:,} MB",
                _days(s.days_left, s.usable_bytes),
                s.full_by or "",
            )
            for s in g.storages
        ],
    )
    _say("Days left: free space above the reserve at this growth, if all of it went there.")
