"""``verify``, ``check``, ``index rebuild`` and ``audit``: integrity and recovery."""

from __future__ import annotations

import datetime as dt
import os
from typing import TYPE_CHECKING, Annotated

import msgspec
import typer

from .. import audit
from ..errors import StudyvaultError
from .common import JsonOption, console, human_bytes, print_json, print_table, progress_reporter
from .common import state as cli_state

if TYPE_CHECKING:
    from ..check import Problem

index_app = typer.Typer(help="The study index.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.command("verify")(verify_cmd)
    app.command("check")(check_cmd)
    app.command("audit")(audit_cmd)
    app.add_typer(index_app, name="index")


def _n(count: int, word: str, plural: str | None = None) -> str:
    return f"{count:,} {word if count == 1 else plural or word + 's'}"


def _say(text: str) -> None:
    console.print(text, markup=False, highlight=False)


def verify_cmd(
    ctx: typer.Context,
    storage: Annotated[
        str | None, typer.Argument(help="Image directory or archive (default: all).")
    ] = None,
    sample: Annotated[
        str | None,
        typer.Option("--sample", help="Hash only this share of the instances, e.g. 10%."),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for a reproducible sample.")] = None,
    json: Annotated[bool, JsonOption] = False,
) -> None:
    """Re-read stored instances and compare them with their recorded SHA-256.

    Reports missing, changed (e.g. encrypted by ransomware), unreadable and unknown
    files per study; exits 1 when anything is wrong."""
    from ..integrity import parse_sample, verify  # pydicom loads only when needed

    fraction = parse_sample(sample)
    vault = cli_state(ctx).vault()
    if storage is not None:
        vault.storage(storage)  # an unknown name is bad input: exit 2 before any work
    with progress_reporter("Verifying", "studies") as progress:
        # worker processes: per small file the work is Python's, not the hash's
        processes = min(4, os.cpu_count() or 1)
        report = verify(
            vault, storage, sample=fraction, seed=seed, progress=progress, processes=processes
        )
    if json:
        print_json(report)
    else:
        for found in report.problems:
            who = found.patient_name.replace("^", " ") or "-"
            when = found.study_date or "no date"
            _say(f"{found.storage}: study {found.study_uid} ({who}, {when}) at {found.location}:")
            for line in found.lines():
                _say(f"  {line}")
        files = sum(r.files for r in report.storages)
        size = sum(r.bytes for r in report.storages)
        studies = sum(r.studies for r in report.storages)
        for result in report.storages:
            if result.note:
                _say(f"{result.name}: {result.note}")
        what = f"a {report.sample_percent:g}% sample of " if report.sample_percent < 100 else ""
        storages = sum(r.verified for r in report.storages)
        outcome = (
            f"{_n(len(report.problems), 'study', 'studies')} with problems."
            if report.problems
            else "no problems."
        )
        _say(
            f"Verified {what}{_n(files, 'file')} ({human_bytes(size)}) in "
            f"{_n(studies, 'study', 'studies')} of {_n(storages, 'storage')} in "
            f"{report.seconds:.1f} s: {outcome}"
        )
    if not report.ok:
        raise typer.Exit(1)


def check_cmd(
    ctx: typer.Context,
    repair: Annotated[
        bool, typer.Option("--repair", help="Fix what is safe to fix; prints each action.")
    ] = False,
    json: Annotated[bool, JsonOption] = False,
) -> None:
    """Check that the index and the storages agree: indexed files exist, no unindexed
    studies, no orphaned staging, no stuck journal entries. Exits 1 when a problem
    remains."""
    vault = cli_state(ctx).vault()

    from ..check import check

    def acted(problem: Problem) -> None:
        if json:
            return
        _say(problem.line())
        verb = "repaired" if problem.repaired else "not repaired"
        _say(f"  {verb}: {problem.action}")

    with progress_reporter("Checking", "studies") as progress:
        report = check(vault, repair=repair, progress=progress, report=acted)
    if json:
        print_json(report)
    else:
        for problem in report.problems:
            if not (repair and problem.action):
                _say(problem.line())
        for note in report.notes:
            _say(f"note: {note}")
        if not report.problems:
            _say(f"The index and the storages agree ({report.studies} studies).")
        elif repair:
            _say(
                f"{len(report.problems)} problems: {report.repaired} repaired, "
                f"{report.remaining} remain."
            )
        else:
            fixable = sum(p.repairable for p in report.problems)
            _say(
                f"{len(report.problems)} problems ({fixable} can be fixed with "
                "`studyvault check --repair`)."
            )
    if not report.ok:
        raise typer.Exit(1)


@index_app.command("rebuild")
def rebuild_cmd(
    ctx: typer.Context,
    force: Annotated[
        bool,
        typer.Option("--force", help="Rebuild even if the journal holds unfinished work."),
    ] = False,
    json: Annotated[bool, JsonOption] = False,
) -> None:
    """Recreate the study index from every image directory and readable archive.
    Deletes nothing: the old index folder is kept beside the new one."""
    vault = cli_state(ctx).vault()
    with progress_reporter("Rebuilding", "studies") as progress:
        from ..rebuild import rebuild_index

        summary = rebuild_index(vault, force=force, progress=progress)
    if json:
        print_json(summary)
        return
    for result in summary.storages:
        if result.read:
            text = f"{result.name}: {result.studies} studies, {result.instances} instances"
            if result.moved_out:
                text += f", {result.moved_out} moved out (not listed)"
        else:
            text = f"{result.name}: {result.status.lower()}, not read"
            if result.carried_over:
                text += f"; {result.carried_over} studies kept from the old index"
        _say(text)
        for line in result.skipped:
            _say(f"  skipped: {line}")
        for line in result.mismatched:
            _say(f"  damaged: {line}")
    for note in summary.notes:
        _say(f"note: {note}")
    _say(
        f"Rebuilt the index at {summary.index}: {summary.studies} studies, "
        f"{summary.instances} instances in {summary.seconds:.1f} s."
    )
    if summary.previous:
        _say(f"The old index was kept at {summary.previous}; delete it when satisfied.")


def _since(value: str | None) -> str | None:
    """``--since`` as the UTC ISO time audit lines are compared with."""
    if value is None:
        return None
    try:
        when = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise StudyvaultError(
            f"--since: {value!r} is not a date or time (use YYYY-MM-DD or YYYY-MM-DDTHH:MM, UTC)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.astimezone(dt.UTC).isoformat(timespec="seconds")


def _patient(entry: audit.AuditEntry) -> str:
    name = entry.patient_name.replace("^", " ")
    return f"{name} ({entry.patient_id})" if entry.patient_id else name


def audit_cmd(
    ctx: typer.Context,
    since: Annotated[
        str | None, typer.Option("--since", help="From this date or time on (UTC).")
    ] = None,
    json: Annotated[bool, JsonOption] = False,
) -> None:
    """Show the audit log: every delete, move, archive, return and repair."""
    start = _since(since)
    vault = cli_state(ctx).vault()
    entries = list(audit.read(vault.config.data_dir / "audit.log", start))
    if json:
        # every field on every line, empty ones too, so scripts need no defaults
        print_json([msgspec.structs.asdict(e) for e in entries])
        return
    columns = ["Time", "User", "Op", "Task", "Patient", "Study UID", "Instances", "From", "To"]
    detail = any(e.detail for e in entries)
    rows = []
    for e in entries:
        row = [
            e.time.replace("T", " ").replace("+00:00", "Z"),
            e.user,
            e.op,
            e.task,
            _patient(e),
            e.study_uid,
            e.instances or "",
            e.source,
            e.destination,
        ]
        rows.append([*row, e.detail] if detail else row)
    print_table([*columns, "Detail"] if detail else columns, rows)
    _say(f"{len(entries)} entries")
