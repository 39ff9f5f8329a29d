"""What the service watches for alerts: the conditions, and the thread that checks them.

Each check (every ``[alerts] check_seconds``) looks at the storages, the tasks' states
in the index, the last ``verify`` of each storage and the receiver's refusals, and
hands what it found to an :class:`~studyvault.alerts.AlertBook`, which decides what to
send. Everything is read from shared state (index, storages, ``verify-last.json``), so
a task run or a verify started by hand in another process is seen as well.

Kinds of condition (the part of the key before the colon):

``space``     a storage has less free space than ``free_warning_gb`` (or twice its
              reserve): warning; than ``free_critical_gb`` (or its reserve): critical
``offline``   a storage (an archive, mostly) cannot be reached
``task``      a task's last run stopped (storage full or offline) or had errors
``overdue``   a scheduled task has not completed without errors for N days
``verify``    the last verify of a storage found missing, changed or unreadable files
``rejected``  many associations were refused in a short time
``receiver``  the DICOM receiver could not start
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable

from .alerts import Alert, AlertBook, Condition, channels
from .index import TaskState
from .integrity import last_verify
from .storage import Role, Status, Storage
from .tasks import is_running
from .vault import Vault

log = logging.getLogger(__name__)

GB = 1e9
Rejections = Callable[[], list[tuple[float, str, str, str]]]


def _what(storage: Storage) -> str:
    kind = "Image directory" if storage.role is Role.IMAGE_DIRECTORY else "Archive"
    return f"{kind} {storage.name!r}"


def _date(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M")


def storage_conditions(vault: Vault) -> list[Condition]:
    """``space`` and ``offline`` conditions of every mounted storage."""
    settings = vault.config.alerts
    found = []
    for storage in vault.storages.values():
        status = storage.status()
        if status is Status.UNMOUNTED:
            continue
        if status is not Status.ONLINE:
            role = "archive" if storage.role is Role.ARCHIVE else "image directory"
            found.append(
                Condition(
                    key=f"offline:{storage.name}",
                    severity="critical",
                    title=f"{_what(storage)} is offline",
                    details=[
                        f"{storage.describe()} cannot be reached, or its key file does not "
                        f"match this {role}",
                        "tasks that use it pause; no study is marked lost",
                    ],
                    action=(
                        f"check the disk or network share of {storage.name} (is it mounted, "
                        "is the server up?). studyvault uses it again by itself once it can "
                        "be reached; `studyvault status` shows its state."
                    ),
                )
            )
            continue
        free = storage.free_bytes()
        reserve = storage.config.min_free_mb * 1024 * 1024
        critical = max(settings.free_critical_gb * GB, reserve)
        warning = max(settings.free_warning_gb * GB, 2 * reserve)
        if free >= warning:
            continue
        severity, limit = ("critical", critical) if free < critical else ("warning", warning)
        if storage.role is Role.IMAGE_DIRECTORY:
            action = (
                "archive or move old studies (`studyvault tasks run NAME`), or add an image "
                "directory (`studyvault image-dirs add NAME PATH`). Below its reserve, new "
                "studies go to the next image directory with room, or are refused."
            )
        else:
            action = (
                "free space on the archive's disk, or add another archive (`studyvault "
                "archives add NAME PATH`) and point the archive task at it; a task stops "
                "when an archive is full."
            )
        found.append(
            Condition(
                key=f"space:{storage.name}",
                severity=severity,
                title=f"{_what(storage)} has {free / GB:.1f} GB free "
                f"({severity} below {limit / GB:.1f} GB)",
                details=[
                    f"location: {storage.describe()}",
                    f"free: {free / GB:.2f} GB; reserve (min_free_mb): {reserve / GB:.2f} GB",
                    f"warning below {warning / GB:.1f} GB, critical below {critical / GB:.1f} GB",
                ],
                action=action,
            )
        )
    return found


def task_conditions(vault: Vault, *, now: float, first_seen: dict[str, float]) -> list[Condition]:
    """``task`` (last run stopped or had errors) and ``overdue`` conditions.

    :param first_seen: task name -> when it was first seen (updated here), the start of
        the overdue count for a task that never succeeded.
    """
    settings = vault.config.alerts
    found = []
    names = {t.name for t in vault.config.tasks}
    for name in list(first_seen):
        if name not in names:
            del first_seen[name]
    for task in vault.config.tasks:
        state: TaskState = vault.index.task_state(task.name)
        first_seen.setdefault(task.name, now)
        if not is_running(state) and not state.running and state.finished:
            failed = state.outcome in ("aborted", "errors") or (
                state.errors > 0 and state.outcome != "stopped"
            )
            if failed:
                found.append(_task_failed(vault, task.name, task.action, state))
        days = settings.task_overdue_days
        if task.days and days:
            since = state.last_success or first_seen[task.name]
            if now - since > days * 86400:
                last = _date(state.last_success) if state.last_success else "never"
                found.append(
                    Condition(
                        key=f"overdue:{task.name}",
                        severity="warning",
                        title=f"Task {task.name!r} has not completed without errors for "
                        f"{(now - since) / 86400:.0f} days",
                        details=[
                            f"last success: {last}",
                            f"last run: {state.last_result or 'none'}",
                            f"schedule: {', '.join(task.days)} {task.hours}".rstrip(),
                        ],
                        action=(
                            "check that `studyvault serve` runs, that the task's storages are "
                            "Online (`studyvault status`) and what its last run says "
                            f"(`studyvault tasks show {task.name!r}`); run it by hand with "
                            f"`studyvault tasks run {task.name!r}`."
                        ),
                    )
                )
    return found


def _task_failed(vault: Vault, name: str, action: str, state: TaskState) -> Condition:
    result = state.last_result
    if action == "verify":
        title = (
            f"Verify task {name!r} found problems in {state.errors} of {state.done} studies"
            if state.errors
            else f"Verify task {name!r} stopped: {result}"
        )
        what = (
            f"see which files with `studyvault verify` on the task's storage; restore them "
            "from another copy (or the backup), then run `studyvault check --repair` and "
            f"`studyvault tasks run {name!r}`."
        )
    else:
        title = f"Task {name!r}: {result}"
        lowered = result.lower()
        if "full" in lowered or "free" in lowered:
            what = "free space on the destination or add another archive, then "
        elif "offline" in lowered or "unmounted" in lowered:
            what = "make the storage reachable again (disk, network share, mount), then "
        else:
            what = "see the service log for the studies that failed, fix the cause, then "
        what += (
            f"run it again with `studyvault tasks run {name!r}` (a scheduled run also "
            "resumes in its next window)."
        )
    return Condition(
        key=f"task:{name}",
        severity="critical" if state.outcome == "aborted" or action == "verify" else "warning",
        title=title,
        details=[
            f"last run: {result}",
            f"ended: {_date(state.finished)}",
            f"studies done: {state.done} of {state.total}, errors: {state.errors}",
        ],
        action=what,
    )


def verify_conditions(vault: Vault) -> list[Condition]:
    """``verify``: the last verify of a storage found missing, changed or unreadable files."""
    found = []
    for name, summary in sorted(last_verify(vault).items()):
        if name not in vault.storages:
            continue
        if not (summary.missing or summary.changed or summary.unreadable):
            continue
        found.append(
            Condition(
                key=f"verify:{name}",
                severity="critical",
                title=f"Verify of {name!r} found {summary.studies_with_problems} studies with "
                f"missing or changed files",
                details=[
                    f"verified: {_date(summary.time)}, {summary.studies} studies"
                    + (
                        f" ({summary.sample_percent:g}% sample)"
                        if summary.sample_percent < 100
                        else ""
                    ),
                    f"missing files: {summary.missing}, changed: {summary.changed}, "
                    f"unreadable: {summary.unreadable}",
                    *summary.examples,
                ],
                action=(
                    f"run `studyvault verify {name!r}` to list every file; changed files can "
                    "mean a failing disk or ransomware. Restore them from another copy or the "
                    "backup, then `studyvault check --repair`; the alert is resolved by a "
                    "verify that finds nothing."
                ),
            )
        )
    return found


def rejection_conditions(vault: Vault, rejections: Rejections, *, now: float) -> list[Condition]:
    """``rejected``: at least ``rejected_associations`` refusals in the window."""
    settings = vault.config.alerts
    if not settings.rejected_associations:
        return []
    since = now - settings.rejected_window_minutes * 60
    recent = [r for r in rejections() if r[0] >= since]
    if len(recent) < settings.rejected_associations:
        return []
    who = Counter((calling, address, why) for _, calling, address, why in recent)
    return [
        Condition(
            key="rejected:associations",
            severity="warning",
            title=f"{len(recent)} DICOM associations were refused in the last "
            f"{settings.rejected_window_minutes:g} minutes",
            details=[
                f"{count} from {calling or '?'} at {address}: {why}"
                for (calling, address, why), count in who.most_common(5)
            ],
            action=(
                "if the device is one of yours, add its AE title to [receiver] "
                "allowed_calling_ae_titles (and its address to allowed_hosts), or correct "
                "the called AE title configured on the device; otherwise find out what on "
                "the network is trying to send."
            ),
        )
    ]


def receiver_failed(error: str) -> Condition:
    return Condition(
        key="receiver:start",
        severity="critical",
        title="The DICOM receiver could not start: studies cannot be received",
        details=[error],
        action=(
            "free the port or change [receiver] host/port in the config, then start the "
            "service again (e.g. `systemctl restart studyvault`); devices keep their studies "
            "and send them again."
        ),
    )


class AlertWatcher:
    """Checks the conditions and delivers alerts, in a thread of ``serve`` (or by hand
    with :meth:`check`, which tests call with their own ``now``).

    :param vault: the open vault (its config may be replaced while the service runs).
    :param rejections: the receiver's recent refusals (None: the receiver is not watched).
    """

    def __init__(self, vault: Vault, *, rejections: Rejections | None = None) -> None:
        self.vault = vault
        self.rejections = rejections
        self.book = AlertBook(
            vault.config.data_dir / "alerts-state.json",
            repeat_seconds=vault.config.alerts.repeat_minutes * 60,
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def conditions(self, *, now: float) -> tuple[list[Condition], set[str]]:
        """The conditions found now, and the kinds that were checked."""
        found = storage_conditions(self.vault)
        found += task_conditions(self.vault, now=now, first_seen=self.book.state.first_seen)
        found += verify_conditions(self.vault)
        kinds = {"space", "offline", "task", "overdue", "verify"}
        if self.rejections is not None:
            found += rejection_conditions(self.vault, self.rejections, now=now)
            kinds |= {"rejected", "receiver"}  # the receiver runs: its start is resolved
        return found, kinds

    def check(self, *, now: float | None = None) -> list[Alert]:
        """Find the conditions, send what is due (and retry the outbox); never raises
        for a delivery failure. Returns the messages produced this time."""
        now = time.time() if now is None else now
        with self._lock:
            found, kinds = self.conditions(now=now)
            return self._publish(found, kinds, now)

    def report(self, condition: Condition, *, now: float | None = None) -> list[Alert]:
        """Send one condition now (the receiver failed to start: the service ends)."""
        now = time.time() if now is None else now
        with self._lock:
            return self._publish([condition], {condition.kind}, now)

    def _publish(self, found: list[Condition], kinds: set[str], now: float) -> list[Alert]:
        config = self.vault.config
        self.book.repeat_seconds = config.alerts.repeat_minutes * 60
        targets = channels(config)
        plugins = self.vault.plugins
        routed = bool(plugins.hook.studyvault_alert.get_hookimpls())
        if not targets and not routed:
            # nothing is recorded as sent: a channel added later hears of every problem
            self.book.save()
            return []
        alerts = self.book.observe(found, kinds, now=now)
        self.book.deliver(alerts, targets, now=now)
        self.book.save()
        for alert in alerts:
            plugins.notify("alert", alert=alert)
        return alerts

    # -- in the service ----------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="alerts", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 15.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.check()
            except Exception:  # noqa: BLE001 -- a failed check must not end the watch
                log.exception("alerts: the check failed")
            self._stop.wait(self.vault.config.alerts.check_seconds)
