"""The service: the task scheduler (with an injected clock), housekeeping, ``status``,
the lock against a second ``serve``, and scheduled tasks run by ``studyvault serve``."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
import tomlkit
from test_receiver import SUCCESS, make_vault, send, serve

from studyvault.index import TaskState
from studyvault.scheduler import TaskScheduler
from studyvault.tasks import RunResult
from studyvault.testing.dicomgen import make_study
from studyvault.vault import Vault

SATURDAY = dt.datetime(2024, 6, 1)  # a Saturday
assert SATURDAY.weekday() == 5


# -- the scheduler, with an injected clock and a fake runner ------------------------------


class Clock:
    def __init__(self, moment: dt.datetime) -> None:
        self.moment = moment

    def __call__(self) -> dt.datetime:
        return self.moment


class FakeRunners:
    """Stands in for TaskRunner: records each run and ends it with ``outcome``."""

    def __init__(self) -> None:
        self.runs: list[dict[str, Any]] = []
        self.outcome = "completed"
        self.gate: threading.Event | None = None

    def __call__(self, vault: Vault, name: str, **kwargs: Any) -> Any:
        runners = self

        class Runner:
            def run(self) -> RunResult:
                runners.runs.append({"name": name, **kwargs})
                if runners.gate is not None:
                    runners.gate.wait(10)
                return RunResult(
                    task=name,
                    outcome=runners.outcome,
                    done=0,
                    total=0,
                    errors=0,
                    skipped_unstable=0,
                    message=runners.outcome,
                )

        return Runner()


def add_task(run, name: str, *args: str) -> None:
    result = run("tasks", "add", name, "--from", "Image Center Storage", *args)
    assert result.code == 0, result.err


@pytest.fixture
def weekend_task(home, run, tmp_path):
    """``Weekend Move``: move every study to Disk 2, SaSu 22:00-04:00."""
    assert run("image-dirs", "add", "Disk 2", tmp_path / "d2").code == 0
    add_task(run, "Weekend Move", "--action", "move", "--to", "Disk 2", "--all",
             "--days", "Sa,Su", "--hours", "22:00-04:00")  # fmt: skip
    return "Weekend Move"


_opened: list[Vault] = []


@pytest.fixture(autouse=True)
def _close_vaults():
    yield
    while _opened:
        _opened.pop().close()


def open_vault() -> Vault:
    vault = Vault.open()
    _opened.append(vault)
    return vault


def scheduler_at(moment: dt.datetime, runners: FakeRunners) -> tuple[TaskScheduler, Clock]:
    clock = Clock(moment)
    vault = open_vault()
    return TaskScheduler(vault, clock=clock, runner=runners, yield_to_ingest=lambda: 0.0), clock


def check(scheduler: TaskScheduler) -> str | None:
    started = scheduler.check()
    scheduler.join(10)
    return started


def test_a_task_starts_inside_its_window_and_not_outside(weekend_task):
    runners = FakeRunners()
    scheduler, clock = scheduler_at(SATURDAY.replace(hour=12), runners)
    assert check(scheduler) is None

    clock.moment = SATURDAY.replace(hour=23)
    assert check(scheduler) == weekend_task

    [run] = runners.runs
    assert run["scheduled"] is True and run["clock"] is clock
    assert run["yield_to_ingest"]() == 0.0


def test_a_task_runs_once_per_window_and_again_in_the_next(weekend_task):
    runners = FakeRunners()
    scheduler, clock = scheduler_at(SATURDAY.replace(hour=23), runners)
    assert check(scheduler) == weekend_task

    clock.moment = SATURDAY.replace(hour=23, minute=30)
    assert check(scheduler) is None
    clock.moment = SATURDAY + dt.timedelta(days=1, hours=3)  # Sunday 03:00, same window
    assert check(scheduler) is None
    clock.moment = SATURDAY + dt.timedelta(days=1, hours=22, minutes=1)  # Sunday's window
    assert check(scheduler) == weekend_task
    assert len(runners.runs) == 2


def test_a_paused_run_resumes_in_the_next_window(weekend_task):
    runners = FakeRunners()
    runners.outcome = "paused"
    runners.gate = threading.Event()
    scheduler, clock = scheduler_at(SATURDAY.replace(hour=23), runners)
    scheduler.check()
    clock.moment = SATURDAY + dt.timedelta(days=1, hours=4)  # the window ended
    runners.gate.set()
    scheduler.join(10)

    clock.moment = SATURDAY + dt.timedelta(days=1, hours=12)
    assert check(scheduler) is None
    clock.moment = SATURDAY + dt.timedelta(days=1, hours=22)
    assert check(scheduler) == weekend_task


def test_a_run_stopped_by_a_full_storage_is_tried_again_later(weekend_task):
    runners = FakeRunners()
    runners.outcome = "aborted"
    scheduler, clock = scheduler_at(SATURDAY.replace(hour=22), runners)
    assert check(scheduler) == weekend_task

    clock.moment = SATURDAY.replace(hour=22, minute=10)
    assert check(scheduler) is None
    clock.moment = SATURDAY.replace(hour=22, minute=16)
    assert check(scheduler) == weekend_task


def test_one_task_runs_at_a_time(weekend_task, run):
    add_task(run, "Weekend Delete", "--action", "delete", "--all", "--days", "Sa", "--hours",
             "20:00-23:59")  # fmt: skip
    runners = FakeRunners()
    runners.gate = threading.Event()
    scheduler, _ = scheduler_at(SATURDAY.replace(hour=23), runners)

    assert scheduler.check() == weekend_task
    assert scheduler.check() is None  # the first still runs
    runners.gate.set()
    scheduler.join(10)
    assert check(scheduler) == "Weekend Delete"

    # a scheduled delete task runs unattended: its schedule was the confirmation
    assert runners.runs[1]["confirmed"] == "DELETE"


def test_a_task_run_by_hand_elsewhere_is_left_alone(weekend_task):
    runners = FakeRunners()
    scheduler, _ = scheduler_at(SATURDAY.replace(hour=23), runners)

    def by_hand(state: TaskState) -> None:
        state.running, state.pid = True, os.getppid()

    scheduler.vault.index.update_task_state(weekend_task, by_hand)

    assert check(scheduler) is None
    assert runners.runs == []


def test_stopping_asks_the_running_task_to_stop_after_its_study(weekend_task):
    stopped = threading.Event()

    def runner(vault: Vault, name: str, **kwargs: Any) -> Any:
        class Runner:
            def run(self) -> RunResult:
                while not vault.index.task_state(name).stop_requested:
                    time.sleep(0.01)
                stopped.set()
                return RunResult(
                    task=name, outcome="stopped", done=1, total=5, errors=0,
                    skipped_unstable=0, message="stopped",
                )  # fmt: skip

        return Runner()

    clock = Clock(SATURDAY.replace(hour=23))
    scheduler = TaskScheduler(open_vault(), clock=clock, runner=runner)
    assert scheduler.check() == weekend_task

    scheduler.stop(timeout=10)

    assert stopped.is_set()
    assert scheduler.current is None


def test_a_task_that_cannot_run_is_reported_once(weekend_task, home, caplog):
    cfg = home / "studyvault.toml"
    cfg.write_text(cfg.read_text().replace('to = "Disk 2"', 'to = "Gone"'))
    scheduler, _ = scheduler_at(SATURDAY.replace(hour=23), FakeRunners())

    with caplog.at_level("ERROR", logger="studyvault.scheduler"):
        assert check(scheduler) is None
        assert check(scheduler) is None

    assert len([r for r in caplog.records if "Weekend Move" in r.getMessage()]) == 1


# -- housekeeping and status without the service -------------------------------------------


def test_housekeeping_reports_its_chores(home, run):
    cfg = home / "studyvault.toml"
    cfg.write_text(cfg.read_text().replace("min_free_mb = 1024", f"min_free_mb = {1 << 40}"))

    result = run("housekeeping", "--json")

    assert result.code == 0, result.err
    report = result.json()
    assert report["journal_replayed"] == 0
    assert report["returned"] == []
    [line] = report["low_space"]
    assert line.startswith("Image Center Storage:") and "below its reserve" in line
    assert "Resumed 0 interrupted study operations" in run("housekeeping").out


def test_status_works_without_the_service(home, run):
    result = run("status", "--json")

    assert result.code == 0, result.err
    report = result.json()
    assert report["running"] is False and report["service"] is None
    [storage] = report["storages"]
    assert storage["name"] == "Image Center Storage"
    assert storage["status"] == "Online" and storage["incoming"] is True
    assert "Service:   not running" in run("status").out


# -- the service process --------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    """One service, also logging to a file, shared by the tests that leave it as it is."""
    config = make_vault(tmp_path_factory.mktemp("service"), studyvault__log_file="logs/serve.log")
    service = serve(config)
    yield service
    assert service.stop() == 0, service.log


def test_status_shows_the_receiver_and_storages_while_serving(served):
    deadline = time.monotonic() + 10
    while True:
        result = served.cli("status", "--json")
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        if report["service"] is not None or time.monotonic() > deadline:
            break
        time.sleep(0.2)

    assert report["running"] is True and report["responding"] is True
    receiver = report["service"]["receiver"]
    assert receiver["listening"] is True
    assert (receiver["ae_title"], receiver["port"]) == ("STUDYVAULT", served.port)
    assert report["service"]["pid"] == served.process.pid
    assert [(s["name"], s["status"]) for s in report["storages"]] == [
        ("Image Center Storage", "Online")
    ]
    text = served.cli("status").stdout
    assert f"STUDYVAULT on 127.0.0.1:{served.port}" in text


def test_a_second_serve_on_the_same_data_is_refused(served):
    second = served.cli("serve")

    assert second.returncode == 2
    assert f"another studyvault serve (pid {served.process.pid}) is running" in second.stderr
    assert served.process.poll() is None


def test_cli_commands_work_while_the_service_runs(served, tmp_path):
    imported = make_study(tmp_path / "imported", n_instances=2, patient_name="IMPORTED^ONE")
    sent = make_study(tmp_path / "sent", n_instances=2, patient_name="SENT^ONE")

    for args in (["import", str(tmp_path / "imported")], ["housekeeping", "--json"]):
        result = served.cli(*args)
        assert result.returncode == 0, f"{args}: {result.stderr}"
    assert send(served.port, sent) == [SUCCESS, SUCCESS]

    names = {s["patient_name"]: s["instances"] for s in served.studies()}
    assert names["IMPORTED^ONE"] == len(imported) and names["SENT^ONE"] == len(sent)


def test_serve_also_logs_to_a_file(served):
    text = (served.folder / "logs" / "serve.log").read_text()
    assert "receiving as STUDYVAULT" in text


def test_a_scheduled_task_runs_under_serve(tmp_path, run):
    config = make_vault(tmp_path / "vault", studyvault__stable_age_minutes=0.0)
    assert run("--config", config, "image-dirs", "add", "Disk 2", tmp_path / "d2").code == 0
    make_study(tmp_path / "src", n_instances=2)
    assert run("--config", config, "import", tmp_path / "src").code == 0
    added = run(
        "--config", config, "tasks", "add", "Always Move", "--action", "move",
        "--from", "Image Center Storage", "--to", "Disk 2", "--all",
        "--hours", "00:00-00:00", "--throttle-ms", "0",
    )  # fmt: skip
    assert added.code == 0, added.err

    served = serve(config)
    try:
        deadline = time.monotonic() + 30
        while True:
            [task] = json.loads(served.cli("tasks", "list", "--json").stdout)
            if task["status"].startswith("Completed") or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert task["status"] == "Completed 1/1 studies [0 errors]", served.log
        [study] = served.studies()
        assert [c["storage"] for c in study["copies"]] == ["Disk 2"]
        assert "task Always Move: starting" in served.log
    finally:
        assert served.stop() == 0


def test_an_edited_config_is_picked_up_without_a_restart(tmp_path):
    served = serve(make_vault(tmp_path / "vault"))
    doc = tomlkit.parse(served.config.read_text())
    doc["receiver"]["allowed_calling_ae_titles"] = ["NEWDEVICE"]
    served.config.write_text(tomlkit.dumps(doc))

    deadline = time.monotonic() + 15
    while "reloaded" not in served.log and time.monotonic() < deadline:
        time.sleep(0.2)

    assert "reloaded" in served.log
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    try:
        assert ae.associate("127.0.0.1", served.port, ae_title="STUDYVAULT").is_rejected
    finally:
        assert served.stop() == 0


def test_serve_refuses_a_port_in_use(tmp_path, served):
    other = make_vault(tmp_path / "other")
    doc = tomlkit.parse(other.read_text())
    doc["receiver"]["port"] = served.port
    other.write_text(tomlkit.dumps(doc))

    result = subprocess.run(
        [sys.executable, "-m", "studyvault", "serve"],
        env={**os.environ, "STUDYVAULT_CONFIG": str(other)},
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{served.port}" in result.stderr
    assert not (other.parent / "serve-status.json").exists()
