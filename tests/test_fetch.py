"""Archive studies, fetch them back, return them (unchanged or grown), crash during both."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from studyvault.fetch import return_due
from studyvault.testing.dicomgen import make_instance, make_study
from studyvault.vault import Vault

VARIANTS = [("readable", False), ("readable", True), ("uid", False), ("uid", True)]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def online_hashes(home: Path) -> list[str]:
    return sorted(sha(p) for p in (home / "images" / "studies").rglob("*.dcm"))


@pytest.fixture
def archived(home, run, add_task, tmp_path, request):
    """One 3-instance study archived to an archive of the given variant."""
    naming, zipped = getattr(request, "param", ("readable", False))
    cfg = home / "studyvault.toml"
    cfg.write_text(cfg.read_text().replace("stable_age_minutes = 10.0", "stable_age_minutes = 0.0"))
    files = make_study(
        tmp_path / "src", n_instances=3, patient_name="FETCH^ME", study_date="20100101"
    )
    assert run("import", tmp_path / "src").code == 0
    args = ["archives", "add", "Archive", tmp_path / "arch", "--naming", naming]
    assert run(*args, *(["--zip"] if zipped else [])).code == 0
    add_task("A", "archive", "--all", to="Archive")
    assert run("tasks", "run", "A").code == 0
    [study] = run("studies", "--json").json()
    assert study["status"] == "archived"
    return study["study_uid"], files


@pytest.mark.parametrize("archived", VARIANTS, indirect=True, ids=lambda v: f"{v[0]}-zip{v[1]}")
def test_fetch_from_each_archive_variant_is_byte_identical(home, run, archived):
    uid, files = archived
    assert online_hashes(home) == []
    result = run("study", "fetch", uid)
    assert result.code == 0, result.err
    until = (dt.date.today() + dt.timedelta(days=14)).isoformat()
    assert f"into Image Center Storage until {until}" in result.out
    assert online_hashes(home) == sorted(sha(p) for p in files)
    [study] = run("studies", "--status", "fetched", "--json").json()
    assert study["fetched_until"] == until
    assert sorted(c["storage"] for c in study["copies"]) == ["Archive", "Image Center Storage"]
    assert "fetched until" in run("studies").out
    again = run("study", "fetch", uid)
    assert again.code == 0 and "already online" in again.out


def test_return_of_an_unchanged_study_removes_only_the_online_copy(home, run, archived):
    uid, files = archived
    run("study", "fetch", uid)
    with Vault.open() as vault:
        assert return_due(vault) == []  # not due yet
        results = return_due(vault, today=dt.date.today() + dt.timedelta(days=15))
    assert [r.outcome for r in results] == ["returned"]
    assert online_hashes(home) == []
    [study] = run("studies", "--json").json()
    assert study["status"] == "archived" and study["fetched_until"] is None
    assert run("study", "fetch", uid).code == 0  # the archive copy is still whole
    assert online_hashes(home) == sorted(sha(p) for p in files)
    ops = [json.loads(line)["op"] for line in (home / "audit.log").read_text().splitlines()]
    assert ops == ["archive", "fetch", "return", "fetch"]


def test_return_with_a_new_instance_merges_into_the_archive(home, run, archived, tmp_path):
    uid, files = archived
    run("study", "fetch", uid)
    report = make_instance(
        tmp_path / "report.dcm",
        study_uid=uid,
        modality="SR",
        patient_name="FETCH^ME",
        study_date="20100101",
    )
    assert run("import", report).code == 0
    with Vault.open() as vault:
        [result] = return_due(vault, today=dt.date.today() + dt.timedelta(days=15))
    assert result.outcome == "merged"
    assert online_hashes(home) == []
    [study] = run("studies", "--json").json()
    assert study["status"] == "archived" and study["instances"] == 4
    [folder] = [p.parent for p in (tmp_path / "arch" / "studies").rglob("DICOMDIR")]
    dicomdir = pydicom.dcmread(folder / "DICOMDIR")
    from pydicom.fileset import FileSet

    assert len(FileSet(dicomdir)) == 4
    assert run("study", "fetch", uid).code == 0
    assert online_hashes(home) == sorted(sha(p) for p in [*files, report])


def test_fetch_from_an_unmounted_archive_says_what_to_do(home, run, archived):
    uid, _ = archived
    assert run("archives", "unmount", "Archive", "--confirm", "UNMOUNT").code == 0
    result = run("study", "fetch", uid)
    assert result.code == 2
    assert "Archive is unmounted" in result.err and "archives mount" in result.err
    assert online_hashes(home) == []


@pytest.mark.parametrize("failpoint", ["journaled", "staged", "verified", "published", "committed"])
def test_killed_fetch_then_fetch_again_loses_and_duplicates_nothing(home, run, archived, failpoint):
    uid, files = archived
    env = {**os.environ, "STUDYVAULT_FAILPOINT": failpoint}
    crashed = subprocess.run(
        [sys.executable, "-m", "studyvault", "study", "fetch", uid], env=env, capture_output=True
    )
    assert crashed.returncode == -signal.SIGKILL
    result = run("study", "fetch", uid)
    assert result.code == 0, result.err
    assert online_hashes(home) == sorted(sha(p) for p in files)
    [study] = run("studies", "--json").json()
    assert study["status"] == "fetched"
    assert not list((home / "images").glob("staging/*"))


@pytest.mark.parametrize("failpoint", ["return-committed", "removed"])
def test_killed_return_then_housekeeping_again_finishes(home, run, archived, failpoint):
    uid, files = archived
    run("study", "fetch", uid)
    code = (
        "import datetime as dt, sys\n"
        "from studyvault.vault import Vault\n"
        "from studyvault.fetch import return_due\n"
        "with Vault.open() as v:\n"
        "    return_due(v, today=dt.date.today() + dt.timedelta(days=15))\n"
    )
    env = {**os.environ, "STUDYVAULT_FAILPOINT": failpoint}
    crashed = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True)
    assert crashed.returncode == -signal.SIGKILL
    with Vault.open() as vault:
        from studyvault.transfer import replay_journal

        replay_journal(vault)
        return_due(vault, today=dt.date.today() + dt.timedelta(days=15))
    assert online_hashes(home) == []
    [study] = run("studies", "--json").json()
    assert study["status"] == "archived"
    assert run("study", "fetch", uid).code == 0
    assert online_hashes(home) == sorted(sha(p) for p in files)


def test_housekeeping_returns_studies_whose_time_is_up(home, run, archived):
    uid, files = archived
    cfg = home / "studyvault.toml"
    cfg.write_text(cfg.read_text().replace("keep_days = 14", "keep_days = 0"))
    assert run("study", "fetch", uid).code == 0
    assert online_hashes(home) == sorted(sha(p) for p in files)
    result = run("housekeeping")
    assert result.code == 0, result.err
    assert "returned 1 fetched studies" in result.out
    assert online_hashes(home) == []
    assert run("studies", "--json").json()[0]["status"] == "archived"
