"""Storage tasks: add, list, run, stop, refusals; archive, move and delete."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from studyvault.testing.dicomgen import make_study


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def years_back(n: int) -> str:
    today = dt.date.today()
    return today.replace(year=today.year - n, day=1).strftime("%Y%m%d")


@pytest.fixture
def old_and_new(home, run, tmp_path, monkeypatch):
    """Two studies from 9 and 8 years ago and one from last year, imported and stable."""
    monkeypatch.setenv("STUDYVAULT_CONFIG", str(home / "studyvault.toml"))
    cfg = home / "studyvault.toml"
    cfg.write_text(cfg.read_text().replace("stable_age_minutes = 10.0", "stable_age_minutes = 0.0"))
    paths = {}
    for name, years in (("OLD^ONE", 9), ("OLD^TWO", 8), ("NEW^ONE", 1)):
        paths[name] = make_study(
            tmp_path / "src" / name, n_instances=3, patient_name=name, study_date=years_back(years)
        )
    assert run("import", tmp_path / "src").code == 0
    return paths


def studies_by_patient(run) -> dict[str, dict]:
    return {s["patient_name"]: s for s in run("studies", "--json").json()}


def test_move_old_studies_to_another_image_directory(home, run, add_task, tmp_path, old_and_new):
    run("image-dirs", "add", "Disk 2", tmp_path / "d2")
    result = add_task("Move Old", "move", "--older-than-years", "7", to="Disk 2")
    assert result.code == 0, result.err
    assert "Move studies older than 7 years from S:Image Center Storage to S:Disk 2" in result.out

    ran = run("tasks", "run", "Move Old")
    assert ran.code == 0, ran.out + ran.err
    assert "Completed 2/2 studies [0 errors]" in ran.out
    studies = studies_by_patient(run)
    assert studies["OLD^ONE"]["copies"][0]["storage"] == "Disk 2"
    assert studies["OLD^TWO"]["status"] == "online"
    assert studies["NEW^ONE"]["copies"][0]["storage"] == "Image Center Storage"
    moved = sorted(sha(p) for p in (tmp_path / "d2" / "studies").rglob("*.dcm"))
    assert moved == sorted(sha(p) for p in old_and_new["OLD^ONE"] + old_and_new["OLD^TWO"])
    assert not list((tmp_path / "d2").glob("staging/*"))

    [row] = run("tasks", "list", "--json").json()
    assert row["status"] == "Completed 2/2 studies [0 errors]"
    assert row["schedule"] == "<unscheduled>"
    audit = [json.loads(line) for line in (home / "audit.log").read_text().splitlines()]
    assert [a["op"] for a in audit] == ["move", "move"]
    assert audit[0]["source"] == "Image Center Storage" and audit[0]["destination"] == "Disk 2"


def test_move_everything_then_remove_the_empty_image_directory(
    home, run, add_task, tmp_path, old_and_new
):
    run("image-dirs", "add", "Disk 2", tmp_path / "d2")
    add_task("Empty it", "move", "--all", to="Disk 2")
    assert run("tasks", "run", "Empty it").code == 0
    rows = {r["name"]: r for r in run("image-dirs", "list", "--json").json()}
    assert rows["Image Center Storage"]["studies"] == 0 and rows["Disk 2"]["studies"] == 3
    assert not list((home / "images" / "studies").rglob("*.dcm"))
    run("image-dirs", "incoming", "Disk 2")
    assert run("tasks", "remove", "Empty it").code == 0  # the task names it: first
    assert run("image-dirs", "remove", "Image Center Storage").code == 0


def test_delete_asks_for_confirmation_and_audits_every_study(
    home, run, add_task, tmp_path, old_and_new
):
    add_task("Purge", "delete", "--dates", f"{years_back(10)[:4]}-01-01..{years_back(8)[:4]}-12-31")
    refused = run("tasks", "run", "Purge")
    assert refused.code == 2 and "--confirm DELETE" in refused.err
    wrong = run("tasks", "run", "Purge", "--confirm", "delete")
    assert wrong.code == 2
    assert len(run("studies", "--json").json()) == 3

    assert run("tasks", "run", "Purge", "--confirm", "DELETE").code == 0
    assert list(studies_by_patient(run)) == ["NEW^ONE"]
    remaining = {sha(p) for p in (home / "images" / "studies").rglob("*.dcm")}
    assert remaining == {sha(p) for p in old_and_new["NEW^ONE"]}
    audit = [json.loads(line) for line in (home / "audit.log").read_text().splitlines()]
    assert [(a["op"], a["patient_name"], a["instances"]) for a in audit] == [
        ("delete", "OLD^ONE", 3),
        ("delete", "OLD^TWO", 3),
    ]
    assert all(a["user"] and a["time"] and a["task"] == "Purge" for a in audit)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--action", "delete", "--to", "Disk 2", "--all"], "delete takes no destination"),
        (
            ["--action", "archive", "--to", "Disk 2", "--all"],
            "archive stores into an archive, and 'Disk 2' is an image directory",
        ),
        (
            ["--action", "move", "--to", "Nowhere", "--all"],
            "no image directory or archive named 'Nowhere'",
        ),
        (["--action", "move", "--to", "Disk 2", "--all", "--hours", "25:00-04:00"], "25:00"),
        (["--action", "move", "--to", "Disk 2", "--all", "--days", "Sa,Xx"], "Xx"),
        (["--action", "move", "--to", "Disk 2"], "give exactly one limit"),
        (
            ["--action", "move", "--to", "Disk 2", "--all", "--older-than-years", "3"],
            "give exactly one limit",
        ),
        (["--action", "move", "--to", "Disk 2", "--dates", "2012-01-01..2010-01-01"], "end before"),
        (["--action", "move", "--to", "Disk 2", "--dates", "2012-13-01..2013-01-01"], "not a date"),
        (["--action", "shred", "--all"], "unknown action 'shred'"),
        (["--action", "move", "--all"], "move needs a destination"),
    ],
)
def test_invalid_tasks_are_refused_with_one_line(home, run, tmp_path, args, message):
    run("image-dirs", "add", "Disk 2", tmp_path / "d2")
    result = run("tasks", "add", "Bad", "--from", "Image Center Storage", *args)
    assert result.code == 2, result.out
    assert message in result.err
    assert len(result.err.strip().splitlines()) == 1
    assert "Bad" not in (home / "studyvault.toml").read_text()


def test_scheduled_task_is_listed_like_the_seed_product(home, run, add_task, tmp_path):
    run("image-dirs", "add", "Disk 2", tmp_path / "d2")
    assert (
        add_task(
            "Weekend",
            "move",
            "--older-than-years",
            "7",
            "--days",
            "Sa,Su",
            "--hours",
            "22:00-04:00",
            to="Disk 2",
            throttle_ms=None,
        ).code
        == 0
    )
    [row] = run("tasks", "list", "--json").json()
    assert row["schedule"] == "SaSu:10:00pm-4:00am"
    assert row["status"] == "Ready"
    table = run("tasks", "list").out
    assert "SaSu:10:00pm-4:00am" in table and "Ready" in table
    again = add_task("Weekend", "move", "--all", to="Disk 2", throttle_ms=None)
    assert again.code == 2 and "--replace" in again.err
    assert (
        add_task("Weekend", "move", "--all", "--replace", to="Disk 2", throttle_ms=None).code == 0
    )
    assert run("tasks", "show", "Weekend", "--json").json()["config"]["all"] is True
    assert run("tasks", "remove", "Weekend").code == 0
    assert run("tasks", "list", "--json").json() == []


def test_studies_still_receiving_are_not_moved(home, run, add_task, tmp_path):
    make_study(tmp_path / "s", n_instances=2, study_date="20000101")
    run("import", tmp_path / "s")
    run("image-dirs", "add", "Disk 2", tmp_path / "d2")
    add_task("Move", "move", "--all", to="Disk 2")
    result = run("tasks", "run", "Move")
    assert "1 still receiving" in result.out
    assert run("studies", "--json").json()[0]["copies"][0]["storage"] == "Image Center Storage"


def test_an_error_on_one_study_is_counted_and_the_run_goes_on(
    home, run, add_task, tmp_path, old_and_new
):
    run("image-dirs", "add", "Disk 2", tmp_path / "d2")
    # ransomware-like damage to one stored file: its copy cannot be verified
    victim = next(
        p
        for p in (home / "images" / "studies").rglob("*.dcm")
        if sha(p) == sha(old_and_new["OLD^ONE"][0])
    )
    victim.write_bytes(b"encrypted" + victim.read_bytes()[9:])
    add_task("Move", "move", "--all", to="Disk 2")
    result = run("tasks", "run", "Move")
    assert result.code == 1
    assert "Completed 3/3 studies [1 errors]" in result.out
    assert "does not match its recorded SHA-256" in result.out
    studies = studies_by_patient(run)
    assert studies["OLD^ONE"]["copies"][0]["storage"] == "Image Center Storage"  # left in place
    assert studies["OLD^TWO"]["copies"][0]["storage"] == "Disk 2"
    assert victim.exists() and not list((tmp_path / "d2").glob("staging/*"))


@pytest.mark.parametrize("options", [[], ["--naming", "uid", "--zip"]], ids=["folder", "zip"])
def test_a_damaged_source_is_never_archived(home, run, add_task, tmp_path, old_and_new, options):
    """The read-back after the staged copy is durable catches a source file that no
    longer matches its recorded SHA-256: that study stays where it is, whole, and the
    archive neither lists it nor keeps staging."""
    run("archives", "add", "Archive", tmp_path / "arch", *options)
    victim = next(
        p
        for p in (home / "images" / "studies").rglob("*.dcm")
        if sha(p) == sha(old_and_new["OLD^TWO"][1])
    )
    damaged = b"encrypted" + victim.read_bytes()[9:]
    victim.write_bytes(damaged)
    add_task("Archive Old", "archive", "--older-than-years", "7", to="Archive")
    result = run("tasks", "run", "Archive Old")
    assert result.code == 1
    assert "Completed 2/2 studies [1 errors]" in result.out
    assert "does not match its recorded SHA-256" in result.out
    studies = studies_by_patient(run)
    assert studies["OLD^ONE"]["status"] == "archived"
    assert studies["OLD^TWO"]["status"] == "online"
    assert [c["storage"] for c in studies["OLD^TWO"]["copies"]] == ["Image Center Storage"]
    assert victim.read_bytes() == damaged  # left for verify to report, never "repaired"
    assert not list((tmp_path / "arch").glob("staging/*"))
    archived = [p.name for p in (tmp_path / "arch" / "studies").rglob("*") if p.is_dir() or
                p.suffix == ".zip"]  # fmt: skip
    assert run("verify", "Archive", "--json").json()["ok"] is True
    assert archived  # OLD^ONE is there
    assert run("verify", "Image Center Storage", "--json").json()["ok"] is False


def test_stop_from_another_process_and_refuse_a_second_run(home, tmp_path):
    make_study(tmp_path / "s", n_instances=1, study_date="20000101")
    env = {**os.environ, "STUDYVAULT_CONFIG": str(home / "studyvault.toml")}
    cfg = home / "studyvault.toml"
    cfg.write_text(cfg.read_text().replace("stable_age_minutes = 10.0", "stable_age_minutes = 0.0"))
    sv = [sys.executable, "-m", "studyvault"]
    for i in range(6):
        make_study(tmp_path / "src" / str(i), n_instances=1, study_date=f"200{i}0101")
    subprocess.run([*sv, "import", tmp_path / "src"], env=env, check=True, capture_output=True)
    subprocess.run([*sv, "image-dirs", "add", "Disk 2", tmp_path / "d2"], env=env, check=True)
    subprocess.run(
        [
            *sv,
            "tasks",
            "add",
            "Slow",
            "--action",
            "move",
            "--from",
            "Image Center Storage",
            "--to",
            "Disk 2",
            "--all",
            "--throttle-ms",
            "3000",
        ],
        env=env,
        check=True,
        capture_output=True,
    )
    runner = subprocess.Popen(
        [*sv, "tasks", "run", "Slow"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 30
    while time.time() < deadline:
        status = subprocess.run(
            [*sv, "tasks", "list", "--json"], env=env, capture_output=True, text=True
        )
        row = json.loads(status.stdout)[0]
        if row["running"] and row["done"] >= 1:
            break
        time.sleep(0.1)
    assert row["status"].startswith(f"{row['done']}/6 studies (")
    second = subprocess.run([*sv, "tasks", "run", "Slow"], env=env, capture_output=True, text=True)
    assert second.returncode == 2 and "is already running" in second.stderr
    remove = subprocess.run(
        [*sv, "tasks", "remove", "Slow"], env=env, capture_output=True, text=True
    )
    assert remove.returncode == 2 and "stop it first" in remove.stderr
    stop = subprocess.run([*sv, "tasks", "stop", "Slow"], env=env, capture_output=True, text=True)
    assert "Asked Slow to stop" in stop.stdout
    out, err = runner.communicate(timeout=60)
    assert "Stopped by request at" in out
    final = json.loads(
        subprocess.run(
            [*sv, "tasks", "list", "--json"], env=env, capture_output=True, text=True
        ).stdout
    )[0]
    assert final["status"].startswith("Stopped by request at") and 0 < final["done"] < 6


def test_an_archive_that_is_full_stops_the_run_with_that_reason(
    home, run, add_task, tmp_path, old_and_new
):
    run("archives", "add", "Tiny", tmp_path / "arch", "--min-free-mb", str(10**9))
    add_task("A", "archive", "--all", to="Tiny")
    result = run("tasks", "run", "A")
    assert result.code == 1
    assert "Stopped at 0/3 studies [1 errors]: Tiny is full" in result.out
    assert not list((tmp_path / "arch" / "studies").iterdir())
    assert {s["status"] for s in run("studies", "--json").json()} == {"online"}
    [row] = run("tasks", "list", "--json").json()
    assert row["status"].startswith("Stopped at 0/3 studies [1 errors]: Tiny is full")


def test_an_offline_archive_stops_the_run_before_any_study(
    home, run, add_task, tmp_path, old_and_new
):
    run("archives", "add", "Share", tmp_path / "share")
    add_task("A", "archive", "--all", to="Share")
    (tmp_path / "share").rename(tmp_path / "share-gone")  # the network share went away
    result = run("tasks", "run", "A")
    assert result.code == 2 and "Share is offline" in result.err
    assert {s["status"] for s in run("studies", "--json").json()} == {"online"}


def test_a_scheduled_run_pauses_at_the_end_of_its_window_and_resumes(
    home, run, add_task, tmp_path, old_and_new
):
    from studyvault.tasks import TaskRunner
    from studyvault.vault import Vault

    run("image-dirs", "add", "Disk 2", tmp_path / "d2")
    add_task("Night", "move", "--all", "--days", "Sa,Su", "--hours", "22:00-04:00", to="Disk 2")
    now = [dt.datetime(2026, 12, 6, 3, 59)]  # Sunday 03:59, inside Saturday's window

    def after_each_study(done, total, errors):
        now[0] = dt.datetime(2026, 12, 6, 4, 0)  # the window closes after the first study

    with Vault.open() as vault:
        result = TaskRunner(
            vault, "Night", scheduled=True, clock=lambda: now[0], progress=after_each_study
        ).run()
    assert result.outcome == "paused" and result.done == 1
    assert "window ended" in result.message
    [row] = run("tasks", "list", "--json").json()
    assert row["status"].startswith("Paused at 1/3 studies")

    with Vault.open() as vault:  # outside the window a scheduled run does nothing
        idle = TaskRunner(
            vault, "Night", scheduled=True, clock=lambda: dt.datetime(2026, 12, 7, 12, 0)
        ).run()
        assert idle.outcome == "paused" and idle.done == 0
        resumed = TaskRunner(
            vault, "Night", scheduled=True, clock=lambda: dt.datetime(2026, 12, 12, 23, 0)
        ).run()
    assert resumed.outcome == "completed" and resumed.done == 2
    assert {s["copies"][0]["storage"] for s in run("studies", "--json").json()} == {"Disk 2"}


def test_an_instance_received_while_its_study_moves_is_kept_and_moves_next_time(
    home, run, add_task, tmp_path, old_and_new
):
    """A device sends a late instance of a stable study while a task is moving it: the
    late file must never be deleted with the source copy."""
    from studyvault.testing.dicomgen import make_instance

    run("image-dirs", "add", "Disk 2", tmp_path / "d2")
    add_task("Move", "move", "--all", to="Disk 2")
    uid = studies_by_patient(run)["OLD^ONE"]["study_uid"]
    late = make_instance(tmp_path / "late.dcm", study_uid=uid, patient_name="OLD^ONE")

    from studyvault.plugins.image_directory import ImageDirectory

    original = ImageDirectory.write_staging

    def staging_while_a_device_sends(self, plan, study, instances):
        original(self, plan, study, instances)
        if study.study_uid == uid and self.name == "Disk 2":
            # another process stores it meanwhile, as the receiver would
            subprocess.run(
                [sys.executable, "-m", "studyvault", "import", late],
                check=True,
                capture_output=True,
            )

    ImageDirectory.write_staging = staging_while_a_device_sends
    try:
        assert run("tasks", "run", "Move").code == 0
    finally:
        ImageDirectory.write_staging = original
    study = studies_by_patient(run)["OLD^ONE"]
    assert study["instances"] == 4
    assert sorted(c["storage"] for c in study["copies"]) == ["Disk 2", "Image Center Storage"]
    assert sha(late) in {sha(p) for p in (home / "images" / "studies").rglob("*.dcm")}

    assert run("tasks", "run", "Move").code == 0  # the next run takes the late one along
    study = studies_by_patient(run)["OLD^ONE"]
    assert [c["storage"] for c in study["copies"]] == ["Disk 2"]
    moved = {sha(p) for p in (tmp_path / "d2" / "studies").rglob("*.dcm")}
    assert {sha(p) for p in [*old_and_new["OLD^ONE"], late]} <= moved
    assert not list((home / "images" / "studies").rglob("*.dcm"))


def test_a_task_naming_a_storage_gone_from_the_config_is_listed_as_invalid(
    home, run, add_task, tmp_path
):
    run("archives", "add", "A", tmp_path / "a")
    add_task("T", "archive", "--all", "--days", "Sa", to="A", throttle_ms=None)
    add_task("Fine", "delete", "--all", source="A", throttle_ms=None)
    cfg = home / "studyvault.toml"  # the admin renames the archive by hand
    cfg.write_text(
        cfg.read_text().replace('name = "A"', 'name = "B"').replace('from = "A"', 'from = "B"')
    )
    assert 'to = "A"' in cfg.read_text()
    rows = {r["name"]: r for r in run("tasks", "list", "--json").json()}
    assert rows["T"]["status"] == "Invalid: no storage named 'A'"
    assert "Image Center Storage" in rows["T"]["description"]
    assert rows["Fine"]["status"] == "Ready"
    listed = run("tasks", "list")
    assert listed.code == 0 and "Invalid: no storage named 'A'" in listed.out
    assert run("tasks", "show", "T").code == 0
    ran = run("tasks", "run", "T")
    assert ran.code == 2 and "no image directory or archive named 'A'" in ran.err


def test_the_last_task_can_be_removed_and_another_added(home, run, tmp_path):
    run("image-dirs", "add", "Disk 2", tmp_path / "d2")
    args = ["--action", "move", "--from", "Image Center Storage", "--to", "Disk 2", "--all"]
    assert run("tasks", "add", "One", *args).code == 0
    assert run("tasks", "remove", "One").code == 0
    result = run("tasks", "add", "Two", *args)
    assert result.code == 0, result.err
    assert [t["name"] for t in run("tasks", "list", "--json").json()] == ["Two"]
