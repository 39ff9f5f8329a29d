"""Prometheus metrics, ``/healthz`` and ``status --json`` health of a real ``studyvault
serve``, and the alerts only the running service can give (refused associations, a
receiver that cannot start)."""

from __future__ import annotations

import json
import shutil
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import tomlkit
from prometheus_client.parser import text_string_to_metric_families
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from test_alerts import HttpSink, configure
from test_receiver import SUCCESS, free_port, make_vault, send, serve

from studyvault.studies import status_of
from studyvault.testing.dicomgen import make_study
from studyvault.vault import Vault

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    """Every sample of /metrics, parsed by prometheus_client's own parser."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def healthz(port: int) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def family(samples: Samples, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {labels: value for (n, labels), value in samples.items() if n == name}


def wait_for(condition: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


def index_tally(config: Path) -> dict[tuple[tuple[str, str], ...], tuple[float, float]]:
    """(storage, role, state) labels -> (studies, bytes), counted from the index."""
    tally: dict[tuple[tuple[str, str], ...], list[float]] = {}
    with Vault.open(config) as vault:
        for storage in vault.storages.values():
            labels = (("role", storage.role.value), ("state", "online"), ("storage", storage.name))
            tally[labels] = [0, 0]
        for study in vault.index.iter_studies():
            state = status_of(vault, study)
            for sid in study.copies:
                storage = vault.storage_by_id(sid)
                assert storage is not None
                labels = (("role", storage.role.value), ("state", state), ("storage", storage.name))
                counts = tally.setdefault(labels, [0, 0])
                counts[0] += 1
                counts[1] += study.size
    return {k: (v[0], v[1]) for k, v in tally.items()}


def metrics_tally(samples: Samples) -> dict[tuple[tuple[str, str], ...], tuple[float, float]]:
    studies = family(samples, "studyvault_studies")
    size = family(samples, "studyvault_study_bytes")
    return {labels: (count, size[labels]) for labels, count in studies.items()}


def test_metrics_match_the_index_after_an_import_and_an_archive_run(tmp_path):
    port = free_port()
    config = make_vault(tmp_path / "vault", metrics__port=port, studyvault__stable_age_minutes=0.0)
    served = serve(config)
    try:
        # an old and a new study imported, one study sent over the network
        old = make_study(tmp_path / "old", n_instances=3, study_date="20100101",
                         patient_name="OLD^ONE")  # fmt: skip
        make_study(tmp_path / "new", n_instances=2, study_date="20240101", patient_name="NEW^ONE")
        sent = make_study(tmp_path / "sent", n_instances=2, patient_name="SENT^ONE",
                          study_date="20230101")  # fmt: skip
        for folder in ("old", "new"):
            assert served.cli("import", str(tmp_path / folder)).returncode == 0
        assert send(served.port, sent) == [SUCCESS, SUCCESS]
        ae = AE(ae_title="INTRUDER")
        ae.add_requested_context(Verification)
        assert ae.associate("127.0.0.1", served.port, ae_title="STUDYVAULT").is_rejected

        # an archive run moves the 2010 study to the archive
        archive = tmp_path / "arch"
        for args in (
            ["archives", "add", "My Study Archive", str(archive)],
            ["tasks", "add", "Archive Old Studies", "--action", "archive",
             "--from", "Image Center Storage", "--to", "My Study Archive",
             "--older-than-years", "10", "--throttle-ms", "0"],
            ["tasks", "run", "Archive Old Studies"],
        ):  # fmt: skip
            result = served.cli(*args)
            assert result.returncode == 0, f"{args}: {result.stderr}"

        expected = index_tally(config)
        archived = (("role", "archive"), ("state", "archived"), ("storage", "My Study Archive"))
        assert expected[archived] == (1, sum(p.stat().st_size for p in old))
        # the study tally is redone when the index changed (at most every 5 s)
        samples = wait_for(lambda: (s := scrape(port)) and metrics_tally(s) == expected and s)
        assert samples, f"{metrics_tally(scrape(port))} != {expected}"

        with Vault.open(config) as vault:
            state = vault.index.task_state("Archive Old Studies")
        runs = family(samples, "studyvault_task_runs_total")
        assert runs == {(("result", "completed"), ("task", "Archive Old Studies")): 1.0}
        last = family(samples, "studyvault_task_last_success_timestamp_seconds")
        assert last == {(("task", "Archive Old Studies"),): pytest.approx(state.last_success)}
        assert samples[("studyvault_instances_received_total", ())] == 2
        assert samples[("studyvault_associations_rejected_total", ())] == 1
        assert samples[("studyvault_associations_active", ())] == 0
        assert samples[("studyvault_journal_entries", ())] == 0
        assert samples[("studyvault_receiver_up", ())] == 1
        assert samples[("studyvault_scheduler_up", ())] == 1
        online = family(samples, "studyvault_storage_online")
        assert online == {
            (("role", "image_directory"), ("status", "Online"),
             ("storage", "Image Center Storage")): 1.0,
            (("role", "archive"), ("status", "Online"), ("storage", "My Study Archive")): 1.0,
        }  # fmt: skip
        free = family(samples, "studyvault_storage_free_bytes")
        disk = shutil.disk_usage(archive).free
        assert free[(("role", "archive"), ("storage", "My Study Archive"))] == pytest.approx(
            disk, rel=0.02
        )

        # health: all well, then the archive's share goes away
        code, health = healthz(port)
        assert code == 200 and health["ok"] is True, health
        assert health["receiver_up"] and health["scheduler_alive"]
        assert {s["name"]: s["status"] for s in health["storages"]} == {
            "Image Center Storage": "Online",
            "My Study Archive": "Online",
        }

        # a fetched study shows as the oldest un-returned fetch
        with Vault.open(config) as vault:
            [study] = [s for s in vault.index.iter_studies() if s.patient_name == "OLD^ONE"]
        assert served.cli("study", "fetch", study.study_uid).returncode == 0
        status = json.loads(served.cli("status", "--json").stdout)
        assert status["health"]["ok"] is True
        assert status["health"]["oldest_fetch"]["study_uid"] == study.study_uid
        assert status["health"]["oldest_fetch"]["overdue"] is False

        archive.rename(tmp_path / "arch-gone")
        code, health = healthz(port)
        assert code == 503 and health["ok"] is False
        assert "My Study Archive is offline" in health["problems"]
        online = family(scrape(port), "studyvault_storage_online")
        assert (
            online[(("role", "archive"), ("status", "Offline"), ("storage", "My Study Archive"))]
            == 0
        )
        status = json.loads(served.cli("status", "--json").stdout)
        assert status["health"]["problems"] == ["My Study Archive is offline"]
        text = served.cli("status").stdout
        assert "Health:    NOT OK: My Study Archive is offline" in text
        assert f"Oldest fetch: {study.study_uid} (OLD ONE) due back" in text
    finally:
        assert served.stop() == 0, served.log


def test_metrics_are_off_by_default(tmp_path):
    config = make_vault(tmp_path / "vault")
    served = serve(config)
    try:
        assert "metrics on" not in served.log
    finally:
        assert served.stop() == 0


# -- alerts that need the running service ---------------------------------------------------


@pytest.fixture
def hook():
    sink = HttpSink()
    yield sink
    sink.close()


def alerting_vault(folder: Path, hook: HttpSink, **changes: Any) -> Path:
    config = make_vault(
        folder,
        alerts__check_seconds=0.5,
        alerts__free_warning_gb=0.0,
        alerts__free_critical_gb=0.0,
        **changes,
    )
    configure(config, webhook=[{"name": "pager", "url": hook.url}])
    return config


def test_associations_refused_again_and_again_are_reported_once(tmp_path, hook):
    config = alerting_vault(tmp_path / "vault", hook, alerts__rejected_associations=3)
    served = serve(config)
    try:
        for _ in range(3):
            ae = AE(ae_title="INTRUDER")
            ae.add_requested_context(Verification)
            assert ae.associate("127.0.0.1", served.port, ae_title="STUDYVAULT").is_rejected
        assert wait_for(lambda: hook.posts, timeout=15), served.log
        time.sleep(2)  # four more checks: nothing new
        [post] = hook.posts
        assert (post["event"], post["key"], post["severity"]) == (
            "problem",
            "rejected:associations",
            "warning",
        )
        assert post["title"] == "3 DICOM associations were refused in the last 60 minutes"
        assert post["details"] == [
            "3 from INTRUDER at 127.0.0.1: calling AE title 'INTRUDER' is not in "
            "allowed_calling_ae_titles"
        ]
        assert "allowed_calling_ae_titles" in post["action"]
    finally:
        assert served.stop() == 0, served.log


def test_a_receiver_that_cannot_start_is_reported_then_resolved(tmp_path, hook):
    config = alerting_vault(tmp_path / "vault", hook)
    port = int(tomlkit.parse(config.read_text())["receiver"]["port"])  # type: ignore[index,arg-type]
    with socket.socket() as blocker:  # another DICOM service holds the port
        blocker.bind(("127.0.0.1", port))
        blocker.listen()
        failed = serve(config, wait=False)
        assert failed.process.wait(60) == 2
    [post] = hook.posts
    assert (post["event"], post["key"], post["severity"]) == (
        "problem",
        "receiver:start",
        "critical",
    )
    assert post["title"] == "The DICOM receiver could not start: studies cannot be received"
    assert f"cannot listen on 127.0.0.1:{port}" in post["details"][0]
    assert "free the port or change [receiver] host/port" in post["action"]

    served = serve(config)
    try:
        assert wait_for(lambda: len(hook.posts) == 2, timeout=15), served.log
        assert (hook.posts[1]["event"], hook.posts[1]["key"]) == ("resolved", "receiver:start")
    finally:
        assert served.stop() == 0, served.log


def test_a_failing_channel_is_logged_and_the_service_goes_on(tmp_path):
    dead = free_port()  # nothing listens there
    config = make_vault(
        tmp_path / "vault",
        alerts__check_seconds=0.5,
        alerts__free_warning_gb=1e9,  # a problem to report at once
    )
    configure(config, webhook=[{"name": "pager", "url": f"http://127.0.0.1:{dead}/x"}])
    served = serve(config)
    try:
        assert wait_for(lambda: "pager could not deliver" in served.log, timeout=15), served.log
        time.sleep(1)
        assert served.process.poll() is None
        assert send(served.port, make_study(tmp_path / "s", n_instances=1)) == [SUCCESS]
        state = json.loads((served.folder / "alerts-state.json").read_text())
        [pending] = state["outbox"]
        assert pending["channel"] == "pager" and pending["attempts"] == 1
        assert "Connection refused" in pending["error"]
    finally:
        assert served.stop() == 0, served.log
