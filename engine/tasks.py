"""Storage tasks: validation, descriptions, status, and the runner.

A run walks the studies of the task's ``from`` storage that match its limits, oldest
first, streaming from the index, and applies the action to each through an
:class:`~studyvault.actions.ActionContext`. Progress lives in the index's task-state
record, so ``tasks list`` and ``tasks stop`` work from any other process.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import msgspec

from .actions import Action
from .config import TaskConfig
from .errors import (
    StorageFullError,
    StorageInUseError,
    StorageOfflineError,
    StudyvaultError,
    TaskError,
)
from .index import TaskState
from .records import StudyRecord
from .storage import Role, Storage
from .studies import parse_date, years_ago
from .transfer import _alive, delete_study, replay_journal, transfer_study
from .vault import Vault
from .window import Window

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """A validated task: its action, storages, date limits and schedule window."""

    task: TaskConfig
    action: type[Action]
    source: Storage
    destination: Storage | None
    date_from: str | None
    date_to: str | None
    window: Window | None


def _role_names(roles: tuple[Role, ...]) -> str:
    return " or ".join(r.value.replace("_", " ") for r in roles)


def plan_task(vault: Vault, task: TaskConfig, today: dt.date | None = None) -> Plan:
    """Check a task against the config and plugins; one clear error for what is wrong."""
    where = f"task {task.name!r}"
    action = vault.plugins.actions.get(task.action)
    source = vault.storage(task.from_)
    if source.role not in action.source_roles:
        raise TaskError(
            f"{where}: {task.action} works on studies in an {_role_names(action.source_roles)}, "
            f"and {source.name!r} is an {source.role.value.replace('_', ' ')}"
        )
    destination = None
    if action.destination_roles:
        if not task.to:
            raise TaskError(f"{where}: {task.action} needs a destination (--to)")
        destination = vault.storage(task.to)
        if destination.role not in action.destination_roles:
            raise TaskError(
                f"{where}: {task.action} stores into an {_role_names(action.destination_roles)}, "
                f"and {destination.name!r} is an {destination.role.value.replace('_', ' ')}"
            )
        if destination is source:
            raise TaskError(f"{where}: from and to are the same storage {source.name!r}")
    elif task.to:
        raise TaskError(f"{where}: {task.action} takes no destination (remove --to {task.to!r})")
    limits = [task.older_than_years is not None, bool(task.dates), task.all]
    if sum(limits) != 1:
        raise TaskError(
            f"{where}: give exactly one limit: --older-than-years N, --dates D..D or --all"
        )
    date_from = date_to = None
    if task.older_than_years is not None:
        if task.older_than_years < 0:
            raise TaskError(f"{where}: older-than-years {task.older_than_years} is negative")
        cutoff = dt.datetime.strptime(years_ago(task.older_than_years, today), "%Y%m%d")
        date_to = (cutoff - dt.timedelta(days=1)).strftime("%Y%m%d")
    elif task.dates:
        first, sep, last = task.dates.partition("..")
        if not sep:
            raise TaskError(
                f"{where}: dates {task.dates!r} is not a range like 2010-01-01..2012-12-31"
            )
        try:
            date_from, date_to = parse_date(first, "dates"), parse_date(last, "dates")
        except StudyvaultError as exc:
            raise TaskError(f"{where}: {exc}") from None
        if date_from > date_to:
            raise TaskError(f"{where}: dates {task.dates!r} end before they start")
    if task.throttle_ms < 0:
        raise TaskError(f"{where}: throttle-ms {task.throttle_ms} is negative")
    try:
        window = Window.parse(",".join(task.days) if task.days else None, task.hours or None)
    except ValueError as exc:
        raise TaskError(f"{where}: {exc}") from None
    return Plan(task, action, source, destination, date_from, date_to, window)


def refuse_if_used(vault: Vault, name: str) -> None:
    """Refuse to remove the storage called ``name`` while a task names it as its
    ``from`` or ``to``: the task could no longer run, nor be listed."""
    users = [t.name for t in vault.config.tasks_using(name)]
    if users:
        quoted = ", ".join(f'"{u}"' for u in users)
        who, uses, them = (
            (f"tasks {quoted}", "use", "them")
            if len(users) > 1
            else (f"task {quoted}", "uses", "it")
        )
        first = f'"{users[0]}"'
        raise StorageInUseError(
            f"cannot remove {name}: {who} {uses} it as from or to; remove {them} first "
            f"(`studyvault tasks remove {first}`) or point {them} at another storage "
            f"(`studyvault tasks add {first} --replace ...`)"
        )


def invalid_reason(vault: Vault, task: TaskConfig) -> str:
    """Why ``task`` cannot run with the current config (e.g. a hand-edited config names
    a storage that is gone), or "" when it is valid."""
    for name in (task.from_, task.to):
        if name and name not in vault.storages:
            return f"no storage named {name!r}"
    try:
        plan_task(vault, task)
    except StudyvaultError as exc:
        return str(exc)
    return ""


def _storage_label(storage: Storage) -> str:
    return f"S:{storage.name}" if storage.role is Role.IMAGE_DIRECTORY else storage.name


def describe(plan: Plan) -> str:
    """``Archive studies older than 7 years from S:Image Center Storage to My Study Archive``."""
    task = plan.task
    if task.older_than_years is not None:
        unit = "year" if task.older_than_years == 1 else "years"
        what = f"studies older than {task.older_than_years} {unit}"
    elif task.dates:
        first, _, last = task.dates.partition("..")
        what = f"studies dated {first} to {last}"
    else:
        what = "all studies"
    text = f"{plan.action.verb} {what} from {_storage_label(plan.source)}"
    if plan.destination is not None:
        text += f" to {_storage_label(plan.destination)}"
    return text


def schedule_text(plan: Plan) -> str:
    return plan.window.describe() if plan.window else "<unscheduled>"


def is_running(state: TaskState) -> bool:
    """A run is in progress in a live process."""
    return state.running and _alive(state.pid)


def status_text(state: TaskState) -> str:
    """``Ready``, ``34/1001 studies (2%) [0 errors]`` while running, or the last result."""
    if is_running(state):
        pct = 100 * state.done // state.total if state.total else 0
        return f"{state.done}/{state.total} studies ({pct}%) [{state.errors} errors]"
    if state.running:
        return f"Interrupted at {state.done}/{state.total} studies [{state.errors} errors]"
    return state.last_result or "Ready"


def select(vault: Vault, plan: Plan) -> Iterator[StudyRecord]:
    """The studies a run would touch, oldest first, streamed from the index."""
    dated = plan.date_from is not None or plan.date_to is not None
    return vault.index.iter_studies(
        storage=plan.source.id,
        date_from=plan.date_from,
        date_to=plan.date_to,
        include_undated=not dated,
    )


class _Context:
    """The :class:`~studyvault.actions.ActionContext` the runner gives an action."""

    def __init__(self, vault: Vault, task: str, source: Storage, destination: Storage | None):
        self.vault = vault
        self.task = task
        self.source = source
        self.destination = destination

    def transfer(self, study: StudyRecord, *, op: str, keep_in_list: bool = True) -> StudyRecord:
        if self.destination is None:
            raise TaskError(f"task {self.task!r}: {op} needs a destination")
        result = transfer_study(
            self.vault,
            study.study_uid,
            self.source,
            self.destination,
            op=op,
            keep_in_list=keep_in_list,
            task=self.task,
        )
        return result or study

    def copy(self, study: StudyRecord, destination: Storage) -> None:
        transfer_study(
            self.vault,
            study.study_uid,
            self.source,
            destination,
            op="copy",
            keep_source=True,
            task=self.task,
        )

    def delete(self, study: StudyRecord) -> None:
        delete_study(self.vault, study.study_uid, self.source, task=self.task)

    def verify(self, study: StudyRecord) -> list[str]:
        from .integrity import verify_study

        return verify_study(self.vault, study, self.source)


class RunResult(msgspec.Struct, kw_only=True):
    task: str
    outcome: str  # completed | stopped | paused | aborted
    done: int
    total: int
    errors: int
    skipped_unstable: int
    message: str
    error_messages: list[str] = []


class TaskRunner:
    """Runs one task to completion, a stop request, the end of its window, or a
    storage that became full or offline.

    :param scheduled: a scheduled run pauses at the end of its window.
    :param clock: the current local time (injectable for tests).
    :param progress: called as ``progress(done, total, errors)`` after each study.
    :param yield_to_ingest: called between studies; returns seconds to wait first
        (the service slows tasks while studies are being received).
    """

    def __init__(
        self,
        vault: Vault,
        name: str,
        *,
        scheduled: bool = False,
        clock: Callable[[], dt.datetime] = dt.datetime.now,
        progress: Callable[[int, int, int], None] | None = None,
        yield_to_ingest: Callable[[], float] | None = None,
        confirmed: str | None = None,
    ) -> None:
        task = vault.config.task(name)
        if task is None:
            from .errors import UnknownTaskError

            raise UnknownTaskError(f"no storage task named {name!r}")
        self.vault = vault
        self.plan = plan_task(vault, task, clock().date())
        self.scheduled = scheduled
        self.clock = clock
        self.progress = progress
        self.yield_to_ingest = yield_to_ingest
        word = self.plan.action.confirm_word
        if word and confirmed != word:
            from .errors import ConfirmationRequired

            raise ConfirmationRequired(
                f"task {name!r} {self.plan.action.name}s studies: confirm with --confirm {word}"
            )

    def _claim(self, total: int) -> None:
        name = self.plan.task.name

        def change(state: TaskState) -> None:
            if state.running and _alive(state.pid) and state.pid != os.getpid():
                raise TaskError(f"task {name!r} is already running (process {state.pid})")
            state.running, state.pid, state.host = True, os.getpid(), socket.gethostname()
            state.started, state.done, state.total, state.errors = time.time(), 0, total, 0
            state.stop_requested = state.paused = False

        self.vault.index.update_task_state(name, change)

    def run(self) -> RunResult:
        vault, plan, name = self.vault, self.plan, self.plan.task.name
        if self.scheduled and plan.window and not plan.window.contains(self.clock()):
            return RunResult(
                task=name,
                outcome="paused",
                done=0,
                total=0,
                errors=0,
                skipped_unstable=0,
                message="outside its window",
            )
        vault.require_online(plan.source)
        if plan.destination is not None:
            vault.require_online(plan.destination)
        total = sum(1 for _ in select(vault, plan))
        self._claim(total)
        errors: list[str] = []
        done = unstable = 0
        outcome, message = "completed", ""
        try:
            replay_journal(vault)
            action = plan.action()
            ctx = _Context(vault, name, plan.source, plan.destination)
            stable_before = time.time() - vault.config.studyvault.stable_age_minutes * 60
            end = plan.window.current_end(self.clock()) if self.scheduled and plan.window else None
            first = True
            for study in select(vault, plan):
                state = vault.index.task_state(name)
                if state.stop_requested:
                    outcome, message = "stopped", "stopped by request"
                    break
                if end is not None and self.clock() >= end:
                    outcome, message = "paused", "window ended; resumes in the next window"
                    break
                if not first:
                    self._pause(plan.task.throttle_ms / 1000)
                first = False
                if study.last_received > stable_before:
                    unstable += 1
                    done += 1
                    continue
                try:
                    action.run(ctx, study)
                except (StorageFullError, StorageOfflineError) as exc:
                    outcome, message = "aborted", str(exc)
                    errors.append(f"{study.study_uid}: {exc}")
                    break
                except StudyvaultError as exc:
                    errors.append(f"{study.study_uid}: {exc}")
                    log.error("task %s: study %s: %s", name, study.study_uid, exc)
                done += 1
                self._progress(done, total, len(errors))
        finally:
            result = RunResult(
                task=name,
                outcome=outcome,
                done=done,
                total=total,
                errors=len(errors),
                skipped_unstable=unstable,
                message=message,
                error_messages=errors,
            )
            self._release(result)
        return result

    def _pause(self, seconds: float) -> None:
        if self.yield_to_ingest is not None:
            seconds = max(seconds, self.yield_to_ingest())
        if seconds > 0:
            time.sleep(seconds)

    def _progress(self, done: int, total: int, errors: int) -> None:
        def change(state: TaskState) -> None:
            state.done, state.total, state.errors = done, total, errors

        self.vault.index.update_task_state(self.plan.task.name, change)
        if self.progress is not None:
            self.progress(done, total, errors)

    def _release(self, result: RunResult) -> None:
        summary = f"{result.done}/{result.total} studies [{result.errors} errors]"
        text = {
            "completed": f"Completed {summary}",
            "stopped": f"Stopped by request at {summary}",
            "paused": f"Paused at {summary}: window ended",
            "aborted": f"Stopped at {summary}: {result.message}",
        }[result.outcome]
        if result.skipped_unstable:
            text += f", {result.skipped_unstable} still receiving"

        def change(state: TaskState) -> None:
            state.running = False
            state.paused = result.outcome == "paused"
            state.stop_requested = False
            state.finished = time.time()
            state.done, state.total, state.errors = result.done, result.total, result.errors
            state.last_result = text
            if result.outcome == "completed" and not result.errors:
                state.last_success = state.finished
            outcome = result.outcome
            if outcome == "completed" and result.errors:
                outcome = "errors"
            state.outcome = outcome
            state.runs = {**state.runs, outcome: state.runs.get(outcome, 0) + 1}

        self.vault.index.update_task_state(self.plan.task.name, change)
        result.message = text


def request_stop(vault: Vault, name: str) -> bool:
    """Ask a running task to stop after its current study; False when not running."""
    if vault.config.task(name) is None:
        from .errors import UnknownTaskError

        raise UnknownTaskError(f"no storage task named {name!r}")
    if not is_running(vault.index.task_state(name)):
        return False

    def change(s: TaskState) -> None:
        s.stop_requested = True

    vault.index.update_task_state(name, change)
    return True
