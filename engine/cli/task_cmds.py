"""``tasks``: storage tasks (archive, move, delete studies), by hand or on a schedule."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import msgspec
import typer

from ..config import TaskConfig, append_table, edit_config, remove_table
from ..errors import TaskError, UnknownTaskError
from ..vault import Vault
from .common import JsonOption, confirm, console, print_json, print_table, progress_reporter, state

tasks_app = typer.Typer(
    help="Storage tasks: archive, move or delete studies.", no_args_is_help=True
)


def register(app: typer.Typer) -> None:
    app.add_typer(tasks_app, name="tasks")


class TaskRow(msgspec.Struct, kw_only=True):
    name: str
    action: str
    description: str
    schedule: str
    status: str
    running: bool
    done: int
    total: int
    errors: int
    last_result: str
    last_success: float


def _row(vault: Vault, task: TaskConfig) -> TaskRow:
    from .. import tasks as engine  # the task engine loads only for task commands

    st = vault.index.task_state(task.name)
    problem = engine.invalid_reason(vault, task)
    if problem:
        # listed as it is written, so the admin sees what to change (or remove)
        description = f"{task.action} from {task.from_}" + (f" to {task.to}" if task.to else "")
        schedule = ",".join(task.days) + (f" {task.hours}" if task.hours else "")
        status = f"Invalid: {problem}"
    else:
        plan = engine.plan_task(vault, task)
        description, schedule, status = (
            engine.describe(plan),
            engine.schedule_text(plan),
            engine.status_text(st),
        )
    return TaskRow(
        name=task.name,
        action=task.action,
        description=description,
        schedule=schedule.strip() or "<unscheduled>",
        status=status,
        running=st.running,
        done=st.done,
        total=st.total,
        errors=st.errors,
        last_result=st.last_result,
        last_success=st.last_success,
    )


def _get(vault: Vault, name: str) -> TaskConfig:
    task = vault.config.task(name)
    if task is None:
        known = ", ".join(t.name for t in vault.config.tasks) or "none"
        raise UnknownTaskError(f"no storage task named {name!r} (known: {known})")
    return task


@tasks_app.command("list")
def list_cmd(ctx: typer.Context, json: Annotated[bool, JsonOption] = False) -> None:
    """Name, description, schedule and status of every task."""
    vault = state(ctx).vault()
    rows = [_row(vault, t) for t in vault.config.tasks]
    if json:
        print_json(rows)
        return
    print_table(
        ["Name", "Description", "Schedule", "Status"],
        [(r.name, r.description, r.schedule, r.status) for r in rows],
    )


@tasks_app.command("show")
def show_cmd(ctx: typer.Context, name: str, json: Annotated[bool, JsonOption] = False) -> None:
    """One task in full."""
    vault = state(ctx).vault()
    task = _get(vault, name)
    row = _row(vault, task)
    if json:
        print_json({"config": msgspec.to_builtins(task), **msgspec.to_builtins(row)})
        return
    for label, value in (
        ("Name", row.name),
        ("Description", row.description),
        ("Schedule", row.schedule),
        ("Throttle", f"{task.throttle_ms} ms"),
        ("Status", row.status),
    ):
        console.print(f"{label + ':':<13}{value}", markup=False)


@tasks_app.command("add")
def add_cmd(
    ctx: typer.Context,
    name: str,
    action: Annotated[str, typer.Option("--action", help="archive, move, delete, ...")],
    from_: Annotated[str, typer.Option("--from", help="Storage the studies are in.")],
    to: Annotated[str, typer.Option("--to", help="Destination storage.")] = "",
    older_than_years: Annotated[
        int | None, typer.Option(help="Study date older than N years.")
    ] = None,
    dates: Annotated[
        str, typer.Option(help="Study dates FROM..TO, e.g. 2010-01-01..2012-12-31.")
    ] = "",
    all_: Annotated[bool, typer.Option("--all", help="Every study.")] = False,
    days: Annotated[str, typer.Option(help="Schedule days, e.g. Sa,Su.")] = "",
    hours: Annotated[str, typer.Option(help="Schedule window, e.g. 22:00-04:00.")] = "",
    throttle_ms: Annotated[int, typer.Option(help="Pause between studies, ms.")] = 200,
    replace: Annotated[
        bool, typer.Option("--replace", help="Replace a task of that name.")
    ] = False,
    json: Annotated[bool, JsonOption] = False,
) -> None:
    """Add (or with --replace, change) a storage task."""
    from .. import tasks as engine  # the task engine loads only for task commands

    vault = state(ctx).vault()
    task = TaskConfig(
        name=name,
        action=action,
        from_=from_,
        to=to,
        older_than_years=older_than_years,
        dates=dates,
        all=all_,
        days=[d.strip() for d in days.split(",") if d.strip()],
        hours=hours,
        throttle_ms=throttle_ms,
    )
    plan = engine.plan_task(vault, task)  # refuse invalid combinations before writing
    if vault.config.task(name) is not None and not replace:
        if not sys.stdin.isatty() or not typer.confirm(f"Task {name!r} exists. Replace it?"):
            raise TaskError(f"task {name!r} already exists (use --replace to change it)")
    values: dict[str, Any] = {
        k: v
        for k, v in msgspec.to_builtins(task).items()
        if v not in ("", [], False, None) or k == "throttle_ms"
    }

    def change(doc: Any) -> None:
        remove_table(doc, "tasks", name)
        append_table(doc, "tasks", values)

    edit_config(vault.config.path, change)
    if json:
        print_json(
            {
                "name": name,
                "description": engine.describe(plan),
                "schedule": engine.schedule_text(plan),
            }
        )
    else:
        console.print(
            f"Added task {name}: {engine.describe(plan)} | {engine.schedule_text(plan)}",
            markup=False,
        )


@tasks_app.command("remove")
def remove_cmd(ctx: typer.Context, name: str) -> None:
    """Remove a task (not while it runs)."""
    from .. import tasks as engine  # the task engine loads only for task commands

    vault = state(ctx).vault()
    _get(vault, name)
    if engine.is_running(vault.index.task_state(name)):
        raise TaskError(f"task {name!r} is running; stop it first (studyvault tasks stop)")
    edit_config(vault.config.path, lambda doc: remove_table(doc, "tasks", name))
    vault.index.delete_task_state(name)
    console.print(f"Removed task {name}.", markup=False)


@tasks_app.command("run")
def run_cmd(
    ctx: typer.Context,
    name: str,
    confirm_word: Annotated[
        str | None, typer.Option("--confirm", help="Type DELETE for delete tasks.")
    ] = None,
    json: Annotated[bool, JsonOption] = False,
) -> None:
    """Run a task now, in the foreground, until done (or stopped)."""
    from .. import tasks as engine  # the task engine loads only for task commands

    vault = state(ctx).vault()
    task = _get(vault, name)
    action = vault.plugins.actions.get(task.action)
    if action.confirm_word:
        confirm(action.confirm_word, confirm_word, f"run {name!r} ({task.action} studies)")
        confirm_word = action.confirm_word
    with progress_reporter(name, "studies") as progress:
        result = engine.TaskRunner(vault, name, progress=progress, confirmed=confirm_word).run()
    if json:
        print_json(result)
    else:
        console.print(f"{name}: {result.message}", markup=False)
        for line in result.error_messages:
            console.print(f"  error: {line}", markup=False)
    if result.outcome == "aborted" or result.errors:
        raise typer.Exit(1)


@tasks_app.command("stop")
def stop_cmd(ctx: typer.Context, name: str) -> None:
    """Ask a running task (in any process) to stop after its current study."""
    from .. import tasks as engine  # the task engine loads only for task commands

    if engine.request_stop(state(ctx).vault(), name):
        console.print(f"Asked {name} to stop after its current study.", markup=False)
    else:
        console.print(f"{name} is not running.", markup=False)
