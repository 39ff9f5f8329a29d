"""Starting storage tasks in their schedule windows (``studyvault serve``).

The service calls :meth:`TaskScheduler.check` once a minute (from the ``schedule``
package's loop) and at start-up. A task with a schedule window is *due* when the
window contains the current moment and the task has not run since this occurrence of
the window opened -- a run that completed, was stopped with ``tasks stop``, or paused
at the end of the previous window all count as "ran before". So a task runs once per
window occurrence, a paused run resumes in the next one, and a task stopped by hand
stays stopped until its next window. A run that stopped because a storage was full or
offline is tried again every :attr:`TaskScheduler.retry_minutes` inside the window.

One task runs at a time, in a worker thread: when several are due, the first in config
order starts, the others at the next check after it ends. A scheduled run pauses by
itself at the end of its window (:class:`~studyvault.tasks.TaskRunner` with
``scheduled=True``) and yields to ingest between studies. A scheduled ``delete`` task
runs without asking: giving it a schedule was the confirmation.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable
from typing import Any

from .config import TaskConfig
from .errors import StudyvaultError
from .index import TaskState
from .tasks import RunResult, TaskRunner, plan_task
from .transfer import _alive
from .vault import Vault
from .window import now

log = logging.getLogger(__name__)

RunnerFactory = Callable[..., Any]


class TaskScheduler:
    """Starts due storage tasks, one at a time, each in a worker thread.

    :param vault: the open vault; its config may be replaced while the service runs.
    :param clock: the current local time (injectable for tests).
    :param yield_to_ingest: handed to each runner: seconds to wait between studies.
    :param runner: makes the runner; :class:`~studyvault.tasks.TaskRunner` or a fake.
    :param retry_minutes: wait before retrying a run that stopped on a full or offline
        storage, inside the same window.
    """

    def __init__(
        self,
        vault: Vault,
        *,
        clock: Callable[[], dt.datetime] = now,
        yield_to_ingest: Callable[[], float] | None = None,
        runner: RunnerFactory = TaskRunner,
        retry_minutes: float = 15.0,
    ) -> None:
        self.vault = vault
        self.clock = clock
        self.yield_to_ingest = yield_to_ingest
        self.runner = runner
        self.retry = dt.timedelta(minutes=retry_minutes)
        self._thread: threading.Thread | None = None
        self._current: str | None = None
        self._last_run: dict[str, tuple[dt.datetime, str]] = {}  # name -> (end, outcome)
        self._reported: dict[str, str] = {}  # name -> last problem logged

    @property
    def current(self) -> str | None:
        """Name of the task running now, if any."""
        return self._current

    def check(self) -> str | None:
        """Start the first due task unless one is running; returns its name."""
        if self._thread is not None and self._thread.is_alive():
            return None
        moment = self.clock()
        for task in list(self.vault.config.tasks):
            if self.is_due(task, moment):
                return self._start(task, moment)
        return None

    def is_due(self, task: TaskConfig, moment: dt.datetime) -> bool:
        """Whether ``task`` should start at ``moment`` (see the module's notes)."""
        try:
            plan = plan_task(self.vault, task, moment.date())
        except StudyvaultError as exc:
            self._report(task.name, f"task {task.name!r} cannot be scheduled: {exc}")
            return False
        window = plan.window
        if window is None or not window.contains(moment):
            return False
        state = self.vault.index.task_state(task.name)
        if state.running and _alive(state.pid):
            return False  # run by hand in another process
        if state.running:
            return True  # interrupted (the process died): resume
        last = self._last_ended(task.name, state)
        if last is None:
            return True
        ended, outcome = last
        if outcome == "aborted" and moment - ended >= self.retry:
            return True
        return window.next_start(ended) <= moment

    def _last_ended(self, name: str, state: TaskState) -> tuple[dt.datetime, str] | None:
        mine = self._last_run.get(name)
        theirs = dt.datetime.fromtimestamp(state.finished) if state.finished else None
        if mine is not None and (theirs is None or mine[0] >= theirs):
            return mine
        return (theirs, "") if theirs is not None else None

    def _start(self, task: TaskConfig, moment: dt.datetime) -> str | None:
        name = task.name
        try:
            plan = plan_task(self.vault, task, moment.date())
            runner = self.runner(
                self.vault,
                name,
                scheduled=True,
                clock=self.clock,
                yield_to_ingest=self.yield_to_ingest,
                confirmed=plan.action.confirm_word,
            )
        except StudyvaultError as exc:
            self._report(name, f"task {name!r} cannot start: {exc}")
            return None
        self._reported.pop(name, None)
        self._current = name
        self._thread = threading.Thread(
            target=self._run, args=(name, runner), name=f"task:{name}", daemon=True
        )
        log.info("task %s: starting in its window %s", name, plan.window and plan.window.describe())
        self._thread.start()
        return name

    def _run(self, name: str, runner: Any) -> None:
        outcome = "aborted"
        try:
            result: RunResult = runner.run()
            outcome = result.outcome
            level = logging.INFO if outcome != "aborted" and not result.errors else logging.WARNING
            log.log(level, "task %s: %s", name, result.message)
        except StudyvaultError as exc:
            log.warning("task %s: %s", name, exc)
        except Exception:
            log.exception("task %s failed", name)
        finally:
            self._last_run[name] = (self.clock(), outcome)
            self._current = None

    def stop(self, timeout: float | None = None) -> None:
        """Ask the running task to stop after its current study, and wait for it."""
        thread, name = self._thread, self._current
        if thread is None or not thread.is_alive() or name is None:
            return
        log.info("task %s: asked to stop after its current study", name)

        def change(state: TaskState) -> None:
            state.stop_requested = True

        try:
            self.vault.index.update_task_state(name, change)
        except StudyvaultError as exc:
            log.error("task %s: cannot ask it to stop: %s", name, exc)
        thread.join(timeout)

    def join(self, timeout: float | None = None) -> None:
        """Wait for the running task, if any, to end."""
        if self._thread is not None:
            self._thread.join(timeout)

    def _report(self, name: str, problem: str) -> None:
        """Log a problem once, not every minute."""
        if self._reported.get(name) != problem:
            self._reported[name] = problem
            log.error("%s", problem)
