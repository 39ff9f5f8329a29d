"""Prometheus metrics and ``/healthz`` of ``studyvault serve`` (``[metrics] port``).

A custom collector reads the index, the storages and the receiver when Prometheus
scrapes; nothing is counted twice, and counts of task runs come from the index so that
runs started by hand in another process are included. Tallying studies reads every
study record, so the tally is kept and redone only when the index has changed, at most
every :data:`TALLY_MIN_SECONDS`.

The endpoint serves ``/metrics`` (text format) and ``/healthz`` (JSON, status 200 when
healthy, 503 when not) on ``[metrics] host`` (loopback by default).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import msgspec
from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .errors import ServiceError
from .health import Health
from .integrity import last_verify
from .receiver import ReceiverStats
from .storage import Role
from .vault import Vault

log = logging.getLogger(__name__)

TALLY_MIN_SECONDS = 5.0


class _Tallied(msgspec.Struct):
    """The fields of a study record the tally needs (decoding only them is quicker)."""

    size: int = 0
    copies: dict[str, str] = {}
    fetched_from: str | None = None


_tallied = msgspec.msgpack.Decoder(_Tallied)


class VaultCollector(Collector):
    """Metrics read on each scrape.

    :param receiver: the receiver's statistics (None outside the service).
    :param service_up: (receiver listening, scheduler alive), or None.
    """

    def __init__(
        self,
        vault: Vault,
        *,
        receiver: Callable[[], ReceiverStats] | None = None,
        service_up: Callable[[], tuple[bool, bool]] | None = None,
    ) -> None:
        self.vault = vault
        self.receiver = receiver
        self.service_up = service_up
        self._lock = threading.Lock()
        self._tally: dict[tuple[str, str, str], list[int]] = {}
        self._tally_key: object = None
        self._tally_time = 0.0

    def _study_tally(self) -> dict[tuple[str, str, str], list[int]]:
        """(storage, role, state) -> [studies, bytes]."""
        vault = self.vault
        key = (vault.index.env.info()["last_txnid"], id(vault.config))
        with self._lock:
            fresh = time.monotonic() - self._tally_time < TALLY_MIN_SECONDS
            if key == self._tally_key or (fresh and self._tally_key is not None):
                return self._tally
            tally: dict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0, 0])
            for storage in vault.storages.values():  # every storage appears, even empty
                tally[(storage.name, storage.role.value, "online")] = [0, 0]
            roles = {s.id: s.role for s in vault.storages.values()}
            for study in vault.index.scan_studies(_tallied):
                online = any(roles.get(sid) is Role.IMAGE_DIRECTORY for sid in study.copies)
                state = ("fetched" if study.fetched_from else "online") if online else "archived"
                for sid in study.copies:
                    holder = vault.storage_by_id(sid)
                    if holder is None:
                        continue
                    counts = tally[(holder.name, holder.role.value, state)]
                    counts[0] += 1
                    counts[1] += study.size
            self._tally, self._tally_key, self._tally_time = dict(tally), key, time.monotonic()
            return self._tally

    def collect(self) -> Iterator[Metric]:
        vault = self.vault
        studies = GaugeMetricFamily(
            "studyvault_studies",
            "Studies with a copy in the storage, by the study's state (online, archived, fetched).",
            labels=["storage", "role", "state"],
        )
        size = GaugeMetricFamily(
            "studyvault_study_bytes",
            "Bytes of the studies with a copy in the storage, by the study's state.",
            labels=["storage", "role", "state"],
        )
        for (storage, role, state), (count, nbytes) in sorted(self._study_tally().items()):
            studies.add_metric([storage, role, state], count)
            size.add_metric([storage, role, state], nbytes)
        yield studies
        yield size

        free = GaugeMetricFamily(
            "studyvault_storage_free_bytes",
            "Bytes free for new studies in the storage (0 when unreachable).",
            labels=["storage", "role"],
        )
        online = GaugeMetricFamily(
            "studyvault_storage_online",
            "1 when the storage is Online, 0 when Offline or Unmounted.",
            labels=["storage", "role", "status"],
        )
        for s in vault.storages.values():
            status = s.status()
            free.add_metric([s.name, s.role.value], s.free_bytes())
            online.add_metric([s.name, s.role.value, status.value], status.value == "Online")
        yield free
        yield online

        runs = CounterMetricFamily(
            "studyvault_task_runs",
            "Storage task runs ended, by result: completed, errors (completed with errors), "
            "paused, stopped (by request), aborted (a storage full or offline).",
            labels=["task", "result"],
        )
        last_success = GaugeMetricFamily(
            "studyvault_task_last_success_timestamp_seconds",
            "When the task last completed without errors (unix time; 0: never).",
            labels=["task"],
        )
        running = GaugeMetricFamily(
            "studyvault_task_running", "1 while the task runs.", labels=["task"]
        )
        for task in vault.config.tasks:
            st = vault.index.task_state(task.name)
            for result, count in sorted(st.runs.items()):
                runs.add_metric([task.name, result], count)
            last_success.add_metric([task.name], st.last_success)
            running.add_metric([task.name], st.running)
        yield runs
        yield last_success
        yield running

        verify_problems = GaugeMetricFamily(
            "studyvault_verify_problem_studies",
            "Studies with missing, changed, unreadable or unknown files at the storage's "
            "last verify.",
            labels=["storage"],
        )
        verify_time = GaugeMetricFamily(
            "studyvault_verify_last_timestamp_seconds",
            "When the storage was last verified (unix time).",
            labels=["storage"],
        )
        for name, summary in sorted(last_verify(vault).items()):
            if name in vault.storages:
                verify_problems.add_metric([name], summary.studies_with_problems)
                verify_time.add_metric([name], summary.time)
        yield verify_problems
        yield verify_time

        yield GaugeMetricFamily(
            "studyvault_journal_entries",
            "Study operations in flight (journal entries not yet finished).",
            value=sum(1 for _ in vault.index.iter_journal()),
        )
        yield from self._service_metrics()

    def _service_metrics(self) -> Iterator[Metric]:
        if self.service_up is not None:
            receiver_up, scheduler_alive = self.service_up()
            yield GaugeMetricFamily(
                "studyvault_receiver_up",
                "1 while the DICOM receiver listens.",
                value=receiver_up,
            )
            yield GaugeMetricFamily(
                "studyvault_scheduler_up",
                "1 while the service's scheduler loop is alive.",
                value=scheduler_alive,
            )
        if self.receiver is None:
            return
        rx = self.receiver()
        yield CounterMetricFamily(
            "studyvault_instances_received",
            "Instances received and stored since the service started.",
            value=rx.instances,
        )
        yield CounterMetricFamily(
            "studyvault_received_bytes",
            "Bytes of the instances received and stored since the service started.",
            value=rx.bytes,
        )
        yield CounterMetricFamily(
            "studyvault_instances_refused",
            "Instances refused (not DICOM, no room, conflicts) since the service started.",
            value=rx.refused + rx.conflicts,
        )
        yield GaugeMetricFamily(
            "studyvault_associations_active",
            "DICOM associations open now.",
            value=len(rx.associations),
        )
        yield CounterMetricFamily(
            "studyvault_associations_rejected",
            "DICOM associations refused since the service started.",
            value=rx.rejected_associations,
        )


# -- the endpoint -----------------------------------------------------------------------


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        log.debug("metrics: " + format, *args)


App = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def make_app(registry: CollectorRegistry, health: Callable[[], Health]) -> App:
    """A WSGI app: ``/healthz`` answers ``health()``, ``/metrics`` the registry."""
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/healthz":
            try:
                report = health()
                body = msgspec.json.encode(report)
                status = "200 OK" if report.ok else "503 Service Unavailable"
            except Exception as exc:  # noqa: BLE001 -- a failed check is unhealthy
                log.exception("healthz failed")
                body = msgspec.json.encode({"ok": False, "problems": [f"check failed: {exc}"]})
                status = "503 Service Unavailable"
            start_response(
                status,
                [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
            )
            return [body]
        if path in ("/metrics", "/"):
            return metrics_app(environ, start_response)
        body = b"not found: try /metrics or /healthz\n"
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [body]

    return app


class MetricsServer:
    """``/metrics`` and ``/healthz`` on ``host:port``, in a daemon thread."""

    def __init__(self, host: str, port: int, app: App) -> None:
        self.host, self.port, self.app = host, port, app
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        try:
            server = make_server(
                self.host, self.port, self.app, server_class=_Server, handler_class=_QuietHandler
            )
        except OSError as exc:
            raise ServiceError(
                f"metrics: cannot listen on {self.host}:{self.port} ({exc.strerror or exc}); "
                "change [metrics] port or set it to 0"
            ) from None
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
        self._thread.start()
        log.info("metrics on http://%s:%d/metrics and /healthz", self.host, self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
