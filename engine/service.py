"""``studyvault serve``: the receiver, the task scheduler and housekeeping in one process.

Start-up, in order: take the exclusive lock ``<data_dir>/serve.lock`` (a second
``serve`` on the same data is refused), index what a killed predecessor received but
did not commit (:func:`~studyvault.incoming.recover_received`), run
:func:`housekeeping` (journal replay first, so interrupted transfers finish), start the
receiver, the metrics endpoint (``[metrics] port``, :mod:`studyvault.metrics`), the alert
watch (:mod:`studyvault.watch`, its own thread) and the scheduler. A receiver that cannot
start is reported as an alert before the service exits. Then the ``schedule`` loop runs
the jobs: the task check every minute, the free-space watch every five minutes,
housekeeping every hour (put
off while a task runs: the two never move studies at once), the status file and a look
at the config file every two seconds (an edited config -- a task added with
``studyvault tasks add`` -- is picked up without a restart; changes to ``[receiver]``
other than the allowed lists need one).

SIGTERM or SIGINT stop it cleanly: no new association is accepted, the running task is
asked to stop after its current study, open associations get a few seconds to finish
and are then aborted, pending index entries are committed, and the lock is released.

The status file ``<data_dir>/serve-status.json`` (rewritten every two seconds) is what
``studyvault status`` shows about the service; storages and tasks it reads itself, so
it works whether the service runs or not.
"""

from __future__ import annotations

import fcntl
import logging
import logging.handlers
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import msgspec
import schedule

from .config import load_config
from .errors import ConfigError, ServiceError, StudyvaultError
from .health import Health, check_health
from .incoming import RECEIVE_LOG, IncomingStore, recover_received
from .receiver import Receiver, ReceiverStats
from .scheduler import TaskScheduler
from .storage import Status
from .tasks import plan_task, status_text
from .transfer import replay_journal
from .vault import Vault
from .watch import AlertWatcher, receiver_failed

if TYPE_CHECKING:
    from .metrics import MetricsServer

log = logging.getLogger(__name__)

LOCK_NAME = "serve.lock"
STATUS_NAME = "serve-status.json"
#: A status file older than this belongs to a service that hangs or died.
STALE_AFTER = 30.0
_SWITCH_INTERVAL = 0.0005  # seconds (Python's default is 0.005)
_LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


# -- housekeeping -----------------------------------------------------------------------


class HousekeepingReport(msgspec.Struct, kw_only=True):
    """What :func:`housekeeping` did."""

    received_recovered: int = 0  # acknowledged instances a killed service left unindexed
    journal_replayed: int = 0  # interrupted study operations finished or rolled back
    low_space: list[str] = []  # storages below (or near) their free-space reserve
    returned: list[str] = []  # fetched studies returned to their archive


def housekeeping(vault: Vault, *, replay: bool = True) -> HousekeepingReport:
    """The service's chores, also run by ``studyvault housekeeping``.

    :param replay: replay the journal (interrupted transfers of processes that are gone)
        and, when no service runs, index what a killed one received but did not commit.
        The service does both only at start-up, while no task of its own runs.
    """
    report = HousekeepingReport()
    if replay:
        report.received_recovered = _recover_without_service(vault)
        report.journal_replayed = replay_journal(vault)
    report.low_space = free_space_warnings(vault)
    # The service calls this with replay=False every hour, never while one of its tasks
    # runs, so a return never runs beside a task's transfers.
    from .fetch import return_due

    report.returned = [r.message for r in return_due(vault)]
    return report


def _recover_without_service(vault: Vault) -> int:
    """Read the receive log of a killed service, holding its lock meanwhile (so that no
    service starts and reads it too); a running service owns its log: skip. (The
    service itself reads it at start-up, before calling :func:`housekeeping`.)"""
    data_dir = vault.config.data_dir
    log_path = data_dir / RECEIVE_LOG
    if not log_path.exists():
        return 0
    fd = os.open(data_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return 0
        return recover_received(vault, log_path)
    finally:
        os.close(fd)


def free_space_warnings(vault: Vault) -> list[str]:
    """One line per storage that is offline, below its reserve, or within twice it."""
    lines = []
    for storage in vault.storages.values():
        status = storage.status()
        if status is Status.UNMOUNTED:
            continue
        if status is not Status.ONLINE:
            lines.append(f"{storage.name} is offline ({storage.root})")
            continue
        reserve = storage.config.min_free_mb * 1024 * 1024
        if not reserve:
            continue
        free = storage.free_bytes()
        if free < reserve:
            lines.append(
                f"{storage.name}: {free / 1e9:.1f} GB free, below its reserve of "
                f"{reserve / 1e9:.1f} GB"
            )
        elif free < 2 * reserve:
            lines.append(
                f"{storage.name}: {free / 1e9:.1f} GB free, close to its reserve of "
                f"{reserve / 1e9:.1f} GB"
            )
    return lines


# -- status -----------------------------------------------------------------------------


class ServiceState(msgspec.Struct, kw_only=True):
    """The service's own account of itself, in ``<data_dir>/serve-status.json``."""

    pid: int
    host: str
    started: float
    heartbeat: float
    config: str
    incoming: str = ""
    task: str | None = None  # the task the scheduler runs now
    stopping: bool = False
    receiver: ReceiverStats | None = None


class StorageState(msgspec.Struct, kw_only=True):
    name: str
    role: str
    kind: str
    status: str  # Online | Offline | Unmounted
    free_bytes: int
    min_free_mb: int
    incoming: bool = False


class TaskStatus(msgspec.Struct, kw_only=True):
    name: str
    status: str  # as ``tasks list`` shows it
    running: bool
    done: int
    total: int
    errors: int


class StatusReport(msgspec.Struct, kw_only=True):
    """What ``studyvault status`` prints."""

    running: bool  # a service holds the lock of this data folder
    responding: bool  # …and wrote its status file in the last STALE_AFTER seconds
    service: ServiceState | None
    storages: list[StorageState]
    tasks: list[TaskStatus]
    health: Health | None = None  # receiver up, scheduler alive, storages, oldest fetch


_state_decoder = msgspec.json.Decoder(ServiceState)


def service_running(data_dir: Path) -> bool:
    """Whether a ``studyvault serve`` holds the lock of ``data_dir`` now."""
    try:
        fd = os.open(Path(data_dir) / LOCK_NAME, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the shared lock, if taken
    return False


def collect_status(vault: Vault) -> StatusReport:
    """The service (from its status file, when it runs), storages and tasks."""
    running = service_running(vault.config.data_dir)
    state = None
    if running:
        try:
            state = _state_decoder.decode((vault.config.data_dir / STATUS_NAME).read_bytes())
        except (OSError, msgspec.DecodeError):
            state = None
    responding = state is not None and time.time() - state.heartbeat < STALE_AFTER
    incoming = state.incoming if state and state.incoming else vault.config.studyvault.incoming
    storages = [
        StorageState(
            name=s.name,
            role=s.role.value,
            kind=s.kind,
            status=s.status().value,
            free_bytes=s.free_bytes(),
            min_free_mb=s.config.min_free_mb,
            incoming=s.name == incoming,
        )
        for s in vault.storages.values()
    ]
    tasks = []
    for task in vault.config.tasks:
        st = vault.index.task_state(task.name)
        tasks.append(
            TaskStatus(
                name=task.name,
                status=status_text(st),
                running=st.running,
                done=st.done,
                total=st.total,
                errors=st.errors,
            )
        )
    health = check_health(
        vault,
        receiver_up=bool(responding and state and state.receiver and state.receiver.listening),
        scheduler_alive=responding and state is not None and not state.stopping,
    )
    return StatusReport(
        running=running,
        responding=responding,
        service=state,
        storages=storages,
        tasks=tasks,
        health=health,
    )


# -- running ----------------------------------------------------------------------------


def configure_logging(vault: Vault, *, debug: bool = False) -> None:
    """Log to stderr, and to ``studyvault.log_file`` when set, in a readable format."""
    settings = vault.config.studyvault
    level_name = "DEBUG" if debug else settings.log_level.upper()
    level = logging.getLevelName(level_name)
    if not isinstance(level, int):
        raise ConfigError(
            f"{vault.config.path}: studyvault.log_level: {settings.log_level!r} is not "
            "DEBUG, INFO, WARNING or ERROR"
        )
    formatter = logging.Formatter(_LOG_FORMAT, datefmt="%Y-%m-%d %H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if settings.log_file:
        path = Path(settings.log_file).expanduser()
        path = path if path.is_absolute() else vault.config.base / path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # WatchedFileHandler reopens the file after logrotate moves it
            handlers.append(logging.handlers.WatchedFileHandler(path, encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(
                f"{vault.config.path}: studyvault.log_file: cannot write {path}: "
                f"{exc.strerror or exc}"
            ) from None
    root = logging.getLogger()
    for handler in root.handlers[:]:
        root.removeHandler(handler)
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(level)
    # pynetdicom logs every PDU at INFO; its warnings and errors are enough
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if debug else logging.WARNING)


class Service:
    """One ``studyvault serve``: call :meth:`run`, stop it with :meth:`request_stop`
    (the signal handlers do).

    :param vault: the open vault.
    :param grace: seconds open associations get to finish when the service stops.
    """

    def __init__(self, vault: Vault, *, grace: float = 5.0) -> None:
        self.vault = vault
        self.grace = grace
        data_dir = vault.config.data_dir
        self.store = IncomingStore(vault, data_dir / RECEIVE_LOG)
        self.receiver = Receiver(vault.config.receiver, self.store)
        self.scheduler = TaskScheduler(vault, yield_to_ingest=self.receiver.busy_pause)
        self.jobs = schedule.Scheduler()
        self._stop = threading.Event()
        self._housekeeping_due = threading.Event()
        self._stop_reason = ""
        self._lock_fd: int | None = None
        self._started = time.time()
        self._config_mtime = self._mtime()
        self._loop_beat = time.monotonic()  # the run loop's last turn (scheduler alive)
        self.alerts = AlertWatcher(vault, rejections=self.receiver.recent_rejections)
        self.metrics: MetricsServer | None = None

    # -- life cycle -------------------------------------------------------------------
    def run(self, *, install_signals: bool = True) -> None:
        """Serve until :meth:`request_stop` (or SIGTERM/SIGINT); then stop cleanly."""
        self._acquire_lock()
        try:
            if install_signals:
                self._install_signals()
            # pynetdicom runs two threads per association that hand each message to
            # each other; a shorter GIL switch interval cuts the wait at every hand-over
            sys.setswitchinterval(_SWITCH_INTERVAL)
            log.info(
                "studyvault serve (pid %d) with %s, data in %s",
                os.getpid(),
                self.vault.config.path,
                self.vault.config.data_dir,
            )
            recover_received(self.vault, self.store.log_path)
            self._housekeeping(replay=True)
            self.store.start()
            try:
                self.receiver.start()
            except ServiceError as exc:
                self._alert_now(receiver_failed(str(exc)))
                raise
            self._start_metrics()
            self.alerts.start()
            self._schedule_jobs()
            self._safe(self._every_minute)()
            self._write_status()
            while not self._stop.is_set():
                self.jobs.run_pending()
                idle = self.jobs.idle_seconds
                self._stop.wait(1.0 if idle is None else min(max(idle, 0.05), 1.0))
        finally:
            self._shutdown()

    def request_stop(self, reason: str = "") -> None:
        """Make :meth:`run` stop cleanly (safe from a signal handler or another thread)."""
        self._stop_reason = reason
        self._stop.set()

    def _shutdown(self) -> None:
        if self._lock_fd is None:
            return  # the lock was never ours: nothing was started
        log.info("stopping%s", f" ({self._stop_reason})" if self._stop_reason else "")
        try:
            self._write_status(stopping=True)
            self.receiver.stop_listening()
            task_stopper = threading.Thread(target=self.scheduler.stop, name="task-stop")
            task_stopper.start()
            self.receiver.stop(self.grace)
            if task_stopper.is_alive():
                log.info("waiting for task %s to finish its current study", self.scheduler.current)
            task_stopper.join()
        finally:
            self.alerts.stop()
            if self.metrics is not None:
                self.metrics.stop()
            try:
                self.store.close()  # commits what was received
            finally:
                (self.vault.config.data_dir / STATUS_NAME).unlink(missing_ok=True)
                self._release_lock()
                log.info("stopped")

    def _install_signals(self) -> None:
        def handler(signum: int, frame: FrameType | None) -> None:
            name = signal.Signals(signum).name
            if self._stop.is_set():
                log.warning("%s: already stopping (SIGKILL stops at once; nothing is lost)", name)
            self.request_stop(name)

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    # -- the lock ---------------------------------------------------------------------
    def _acquire_lock(self) -> None:
        data_dir = self.vault.config.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        path = data_dir / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        # `studyvault status` probes with a shared lock for an instant: try a few times
        for attempt in range(20):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt == 19:
                    pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                    os.close(fd)
                    raise ServiceError(
                        f"another studyvault serve (pid {pid}) is running on {data_dir}; "
                        "stop it first (only one may use a data folder)"
                    ) from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = None

    # -- jobs -------------------------------------------------------------------------
    def _schedule_jobs(self) -> None:
        self.jobs.every(1).minutes.do(self._safe(self._every_minute))
        self.jobs.every(5).minutes.do(self._safe(self._watch_space))
        self.jobs.every(1).hours.do(self._housekeeping_due.set)
        self.jobs.every(2).seconds.do(self._safe(self._write_status))
        self.jobs.every(2).seconds.do(self._safe(self.receiver.relax_idle))
        self.jobs.every(2).seconds.do(self._safe(self._reload_if_changed))

    def _safe(self, job: Callable[[], Any]) -> Callable[[], None]:
        """A job whose failure is logged, never fatal to the service."""

        def run() -> None:
            try:
                job()
            except StudyvaultError as exc:
                log.error("%s", exc)
            except Exception:
                log.exception("a scheduled job failed")

        return run

    def _every_minute(self) -> None:
        # Housekeeping's transfers (returns of fetched studies) and a task's never run
        # at once: a task starting replays the journal, and would take a transfer of its
        # own process in flight for an interrupted one. So housekeeping waits for the
        # running task to end, and no task starts while it works (same thread).
        if self._housekeeping_due.is_set() and self.scheduler.current is None:
            self._housekeeping_due.clear()
            self._safe(lambda: self._housekeeping(replay=False))()
        self.scheduler.check()

    def _housekeeping(self, *, replay: bool) -> None:
        report = housekeeping(self.vault, replay=replay)
        if report.journal_replayed:
            log.info("resumed %d interrupted study operations", report.journal_replayed)
        for line in report.low_space:
            log.warning("%s", line)
        for line in report.returned:
            log.info("%s", line)

    def _watch_space(self) -> None:
        for line in free_space_warnings(self.vault):
            log.warning("%s", line)

    def _write_status(self, *, stopping: bool = False) -> None:
        self._loop_beat = time.monotonic()
        state = ServiceState(
            pid=os.getpid(),
            host=socket.gethostname(),
            started=self._started,
            heartbeat=time.time(),
            config=str(self.vault.config.path),
            incoming=self.store.incoming,
            task=self.scheduler.current,
            stopping=stopping,
            receiver=self.receiver.stats(),
        )
        path = self.vault.config.data_dir / STATUS_NAME
        tmp = path.with_name(f".{path.name}.tmp")
        # not fsynced: the file describes this moment only, and is rewritten in 2 s
        tmp.write_bytes(msgspec.json.encode(state))
        os.replace(tmp, path)

    # -- alerts, metrics, health ------------------------------------------------------
    def _alert_now(self, condition: Any) -> None:
        try:
            self.alerts.report(condition)
        except Exception:  # noqa: BLE001 -- an alert never makes things worse
            log.exception("alerts: cannot report %s", condition.key)

    def _up(self) -> tuple[bool, bool]:
        """(receiver listening, scheduler loop alive)."""
        alive = time.monotonic() - self._loop_beat < STALE_AFTER and not self._stop.is_set()
        return self.receiver.stats().listening, alive

    def health(self) -> Health:
        receiver_up, scheduler_alive = self._up()
        return check_health(self.vault, receiver_up=receiver_up, scheduler_alive=scheduler_alive)

    def _start_metrics(self) -> None:
        settings = self.vault.config.metrics
        if not settings.port:
            return
        from prometheus_client import CollectorRegistry

        from .metrics import MetricsServer, VaultCollector, make_app

        registry = CollectorRegistry(auto_describe=False)
        registry.register(
            VaultCollector(self.vault, receiver=self.receiver.stats, service_up=self._up)
        )
        self.metrics = MetricsServer(settings.host, settings.port, make_app(registry, self.health))
        self.metrics.start()

    # -- config reload ------------------------------------------------------------------
    def _mtime(self) -> float:
        try:
            return self.vault.config.path.stat().st_mtime
        except OSError:
            return 0.0

    def _reload_if_changed(self) -> None:
        mtime = self._mtime()
        if mtime == self._config_mtime:
            return
        self._config_mtime = mtime
        try:
            config = load_config(self.vault.config.path, self.vault.plugins.storage_kinds.get)
        except StudyvaultError as exc:
            log.error("the edited config is not valid; keeping the previous one: %s", exc)
            return
        old = self.vault.config
        fresh = Vault(config, self.vault.plugins)
        self.vault.config, self.vault.storages = fresh.config, fresh.storages
        self.store.reconfigure()
        self.receiver.reconfigure(config.receiver)
        for task in config.tasks:
            try:
                plan_task(self.vault, task)
            except StudyvaultError as exc:
                log.error("%s", exc)
        if _restart_fields(old.receiver) != _restart_fields(config.receiver):
            log.warning("the [receiver] address or AE title changed: restart to apply it")
        if old.metrics != config.metrics:
            log.warning("[metrics] changed: restart to apply it")
        log.info("reloaded %s", config.path)


def _restart_fields(receiver: Any) -> tuple[Any, ...]:
    return (receiver.ae_title, receiver.host, receiver.port, receiver.max_associations)
