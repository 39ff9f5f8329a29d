"""``import``, ``studies`` and ``study show``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import (
    JsonOption,
    console,
    err_console,
    human_bytes,
    print_json,
    print_table,
    progress_reporter,
    state,
)

study_app = typer.Typer(
    help="One study: show it, fetch it, forget lost copies.", no_args_is_help=True
)


def register(app: typer.Typer) -> None:
    app.command("import")(import_cmd)
    app.command("studies")(studies)
    app.add_typer(study_app, name="study")


def import_cmd(
    ctx: typer.Context,
    paths: Annotated[list[Path], typer.Argument(help="Files or folders (walked recursively).")],
    to: Annotated[
        str | None, typer.Option("--to", help="Image directory (default: the incoming one).")
    ] = None,
    json: Annotated[bool, JsonOption] = False,
) -> None:
    """Import DICOM files into an image directory, grouped into studies."""
    from ..importer import import_paths  # pydicom loads only for commands that read DICOM

    vault = state(ctx).vault()
    with progress_reporter("Importing") as progress:
        summary = import_paths(vault, paths, to=to, progress=progress)
    if json:
        print_json(summary)
        return
    console.print(
        f"Imported {summary.instances} instances in {summary.studies} studies "
        f"({human_bytes(summary.bytes)}) into {summary.storage}; "
        f"{summary.duplicates} duplicates, {len(summary.conflicts)} conflicts, "
        f"{len(summary.skipped)} skipped."
    )
    for item in summary.conflicts:
        err_console.print(f"conflict: {item.path}: {item.reason}", markup=False)
    for item in summary.skipped:
        err_console.print(f"skipped: {item.path}: {item.reason}", markup=False)


def studies(
    ctx: typer.Context,
    patient: Annotated[str | None, typer.Option(help="Part of the patient name or ID.")] = None,
    older_than_years: Annotated[
        int | None, typer.Option(help="Study date older than N years.")
    ] = None,
    date_from: Annotated[
        str | None, typer.Option("--from", help="First study date, YYYY-MM-DD.")
    ] = None,
    date_to: Annotated[
        str | None, typer.Option("--to", help="Last study date, YYYY-MM-DD.")
    ] = None,
    status: Annotated[str | None, typer.Option(help="online, archived or fetched.")] = None,
    storage: Annotated[str | None, typer.Option(help="Only studies in this storage.")] = None,
    json: Annotated[bool, JsonOption] = False,
) -> None:
    """List studies, oldest first."""
    from ..studies import list_studies

    vault = state(ctx).vault()
    rows = list_studies(
        vault,
        patient=patient,
        older_than_years=older_than_years,
        date_from=date_from,
        date_to=date_to,
        status=status,
        storage=storage,
    )
    if json:
        print_json(list(rows))
        return
    table = [
        (
            r.patient_name.replace("^", " "),
            r.patient_id,
            r.study_date,
            "/".join(r.modalities),
            r.description,
            r.instances,
            human_bytes(r.size),
            f"fetched until {r.fetched_until}" if r.status == "fetched" else r.status,
            ", ".join(c.storage for c in r.copies),
            r.study_uid,
        )
        for r in rows
    ]
    print_table(
        [
            "Patient",
            "Patient ID",
            "Date",
            "Mod",
            "Description",
            "Inst",
            "Size",
            "Status",
            "Location",
            "Study UID",
        ],
        table,
    )
    console.print(f"{len(table)} studies")


@study_app.command("show")
def show(
    ctx: typer.Context,
    uid: Annotated[str, typer.Argument(help="StudyInstanceUID.")],
    json: Annotated[bool, JsonOption] = False,
) -> None:
    """Show one study: patient, status, locations, series."""
    from ..studies import detail

    vault = state(ctx).vault()
    d = detail(vault, uid)
    if json:
        print_json(d)
        return
    status = f"fetched until {d.fetched_until}" if d.status == "fetched" else d.status
    lines = [
        ("Study UID", d.study_uid),
        (
            "Patient",
            f"{d.patient_name.replace('^', ' ')} (ID {d.patient_id or '-'}, "
            f"born {d.patient_birth_date or '-'}, sex {d.patient_sex or '-'})",
        ),
        ("Study", f"{d.study_date or 'no date'} {d.study_time} {d.description}".strip()),
        ("Accession", d.accession_number or "-"),
        ("Instances", f"{d.instances} ({human_bytes(d.size)})"),
        ("Status", status),
    ]
    for c in d.copies:
        lines.append(("Location", f"{c.storage} ({c.role.replace('_', ' ')}): {c.location}"))
    for label, value in lines:
        console.print(f"{label + ':':<11} {value}", markup=False)
    print_table(
        ["Series", "Modality", "Description", "Instances", "Size", "Series UID"],
        [
            (
                s.series_number,
                s.modality,
                s.description,
                s.instances,
                human_bytes(s.size),
                s.series_uid,
            )
            for s in d.series
        ],
    )


@study_app.command("fetch")
def fetch(
    ctx: typer.Context,
    uids: Annotated[list[str] | None, typer.Argument(help="StudyInstanceUIDs to fetch.")] = None,
    patient: Annotated[
        str | None, typer.Option(help="Fetch every archived study of this patient (name or ID).")
    ] = None,
    to: Annotated[
        str | None, typer.Option("--to", help="Image directory (default: the incoming one).")
    ] = None,
    json: Annotated[bool, JsonOption] = False,
) -> None:
    """Fetch archived studies back online; they return to their archive after
    [fetch] keep_days days."""
    from ..errors import StudyvaultError
    from ..fetch import fetch_study
    from ..studies import list_studies

    vault = state(ctx).vault()
    wanted = list(uids or [])
    if patient:
        wanted += [s.study_uid for s in list_studies(vault, patient=patient, status="archived")]
    if not wanted:
        raise StudyvaultError("name at least one StudyInstanceUID or --patient")
    results = []
    for uid in wanted:
        results.append(fetch_study(vault, uid, to=to))
        if not json:
            console.print(results[-1].message, markup=False)
    if json:
        print_json(results)


@study_app.command("forget")
def forget_cmd(
    ctx: typer.Context,
    uids: Annotated[
        list[str] | None, typer.Argument(help="StudyInstanceUIDs whose missing copies to forget.")
    ] = None,
    storage: Annotated[
        str | None,
        typer.Option(help="Forget the missing copies of every study in this storage."),
    ] = None,
    confirm_word: Annotated[
        str | None, typer.Option("--confirm", help="Type FORGET to confirm (for scripts).")
    ] = None,
    json: Annotated[bool, JsonOption] = False,
) -> None:
    """Accept that lost studies are gone: drop from the index each copy whose folder or
    zip is missing from its (Online) storage. A study keeps its other copies (e.g. in
    an archive); one with no copy left leaves the index. Files are never touched; each
    forgotten copy writes an audit line."""
    import sys

    from ..forget import ForgetItem, forget, plan_forget
    from .common import confirm

    what = "forget the missing copies"
    if confirm_word is not None or not sys.stdin.isatty():
        confirm("FORGET", confirm_word, what)  # refused before any work
    vault = state(ctx).vault()
    plan = plan_forget(vault, uids or [], storage=storage)
    if not plan.items:
        if json:
            print_json(plan)
        else:
            console.print(
                f"Nothing to forget: all {plan.checked} copies checked are there.", markup=False
            )
        return
    if confirm_word is None:
        for item in plan.items:
            console.print(item.line(), markup=False)
        confirm("FORGET", None, f"forget these {len(plan.items)} missing copies")

    def acted(item: ForgetItem) -> None:
        if not json:
            console.print(item.line(), markup=False)

    report = forget(vault, plan, report=acted)
    if json:
        print_json(report)
    else:
        kept = report.forgotten - report.studies_forgotten
        console.print(
            f"Forgot {report.forgotten} missing copies of {report.checked} checked: "
            f"{report.studies_forgotten} studies left the index, {kept} stay with their "
            f"other copies; {report.skipped} skipped. The audit log lists each one "
            "(op forget).",
            markup=False,
        )
    if report.skipped:
        raise typer.Exit(1)
