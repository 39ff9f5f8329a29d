"""``serve``, ``status`` and ``housekeeping``."""

from __future__ import annotations

import datetime as dt
import time
from typing import TYPE_CHECKING, Annotated

import typer

from .common import JsonOption, console, human_bytes, print_json, print_table, state

if TYPE_CHECKING:
    from ..service import StatusReport

# ..service is imported in the commands: it loads pynetdicom, which other commands need not


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
    app.command("status")(status)
    app.command("housekeeping")(housekeeping_cmd)


def serve(
    ctx: typer.Context,
    grace: Annotated[
        float,
        typer.Option(help="Seconds open associations get to finish when stopping."),
    ] = 5.0,
) -> None:
    """Run the DICOM receiver, the task scheduler and housekeeping until SIGTERM."""
    from ..service import Service, configure_logging

    st = state(ctx)
    vault = st.vault()
    configure_logging(vault, debug=st.debug)
    Service(vault, grace=grace).run()


def status(ctx: typer.Context, json: Annotated[bool, JsonOption] = False) -> None:
    """What the service is doing: receiver, running task, storages."""
    from ..service import collect_status

    report = collect_status(state(ctx).vault())
    if json:
        print_json(report)
        return
    _print_status(report)


def housekeeping_cmd(ctx: typer.Context, json: Annotated[bool, JsonOption] = False) -> None:
    """Do the service's chores now: finish interrupted transfers, check free space."""
    from ..service import housekeeping

    report = housekeeping(state(ctx).vault())
    if json:
        print_json(report)
        return
    console.print(
        f"Resumed {report.journal_replayed} interrupted study operations; "
        f"returned {len(report.returned)} fetched studies.",
        markup=False,
    )
    if report.received_recovered:
        console.print(
            f"Indexed {report.received_recovered} received instances a stopped service "
            "had not indexed yet.",
            markup=False,
        )
    for line in [*report.returned, *report.low_space]:
        console.print(f"  {line}", markup=False)


def _when(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")


def _print_status(report: StatusReport) -> None:
    service = report.service
    if not report.running:
        console.print("Service:   not running", markup=False)
    elif service is None:
        console.print("Service:   running (no status yet)", markup=False)
    else:
        age = time.time() - service.heartbeat
        note = "" if report.responding else f", NOT RESPONDING for {age:.0f} s"
        note += ", stopping" if service.stopping else ""
        console.print(
            f"Service:   running, pid {service.pid} on {service.host} since "
            f"{_when(service.started)}{note}",
            markup=False,
        )
        rx = service.receiver
        if rx is not None:
            where = f"{rx.ae_title} on {rx.host}:{rx.port}" if rx.listening else "not listening"
            console.print(
                f"Receiver:  {where}; {len(rx.associations)} active associations; "
                f"{rx.instances} instances ({human_bytes(rx.bytes)}) received, "
                f"{rx.duplicates} duplicates, {rx.conflicts} conflicts, {rx.refused} refused, "
                f"{rx.rejected_associations} associations rejected",
                markup=False,
            )
            for a in rx.associations:
                console.print(
                    f"           {a.calling_ae} at {a.address} since {_when(a.since)}: "
                    f"{a.instances} instances",
                    markup=False,
                )
        console.print(f"Incoming:  {service.incoming}", markup=False)
        console.print(f"Task:      {service.task or 'none running'}", markup=False)
    if report.tasks:
        print_table(["Task", "Status"], [(t.name, t.status) for t in report.tasks])
    print_table(
        ["Storage", "Role", "Status", "Free", "Reserve", "Incoming"],
        [
            (
                s.name,
                s.role.replace("_", " "),
                s.status,
                human_bytes(s.free_bytes),
                f"{s.min_free_mb} MB",
                "yes" if s.incoming else "",
            )
            for s in report.storages
        ],
    )
    health = report.health
    if health is not None:
        text = "ok" if health.ok else "NOT OK: " + "; ".join(health.problems)
        console.print(f"Health:    {text}", markup=False)
        fetch = health.oldest_fetch
        if fetch is not None:
            late = " (OVERDUE)" if fetch.overdue else ""
            console.print(
                f"Oldest fetch: {fetch.study_uid} ({fetch.patient_name or '-'}) due back "
                f"{fetch.fetched_until}{late}",
                markup=False,
            )
