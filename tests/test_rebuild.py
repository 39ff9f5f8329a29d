"""``studyvault index rebuild``: the study list comes back the same from the files alone."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from studyvault.testing.dicomgen import make_study

SV = [sys.executable, "-m", "studyvault"]


def task(run, name: str, action: str, source: str, to: str | None, dates: str) -> None:
    args = ["tasks", "add", name, "--action", action, "--from", source, "--dates", dates]
    args += ["--to", to] if to else []
    assert run(*args, "--throttle-ms", "0").code == 0
    assert run("tasks", "run", name).code == 0


def listed(run) -> list[dict]:
    return sorted(run("studies", "--json").json(), key=lambda s: s["study_uid"])


def shown(run) -> dict[str, dict]:
    return {
        s["study_uid"]: run("study", "show", s["study_uid"], "--json").json() for s in listed(run)
    }


def disk_state(*roots: Path) -> dict[str, str]:
    """Every file under ``roots`` with its SHA-256 (what a rebuild must not change)."""
    out = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_file() and path.name != "last-stored.txt":
                out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture
def setup(home, run, tmp_path):
    """Two image directories and two folder archives (readable folders, UID zips) with
    online, archived, fetched and moved-out studies."""
    cfg = home / "studyvault.toml"
    cfg.write_text(cfg.read_text().replace("stable_age_minutes = 10.0", "stable_age_minutes = 0.0"))
    studies = {
        "ARCH^FOLDER": "20010101",
        "ARCH^FETCHED": "20020101",
        "ARCH^ZIP": "20030101",
        "MOVED^OUT": "20040101",
        "ONLINE^ONE": "20100101",
        "ONLINE^TWO": "20110101",
    }
    for name, date in studies.items():
        series = 2 if name == "ONLINE^ONE" else 1
        make_study(tmp_path / "src" / name, n_instances=3, n_series=series, patient_name=name,
                   study_date=date)  # fmt: skip
    make_study(tmp_path / "src2", n_instances=2, patient_name="DISK^TWO", study_date="20120101")
    assert run("image-dirs", "add", "Disk 2", tmp_path / "d2").code == 0
    assert run("import", tmp_path / "src").code == 0
    assert run("import", tmp_path / "src2", "--to", "Disk 2").code == 0
    assert run("archives", "add", "Folder", tmp_path / "folder").code == 0
    zipped = run("archives", "add", "Zipped", tmp_path / "zipped", "--naming", "uid", "--zip")
    assert zipped.code == 0
    ics = "Image Center Storage"
    task(run, "A1", "archive", ics, "Folder", "2001-01-01..2002-12-31")
    task(run, "A2", "archive", ics, "Zipped", "2003-01-01..2003-12-31")
    task(run, "Out", "move", ics, "Zipped", "2004-01-01..2004-12-31")
    fetched = next(s for s in listed(run) if s["patient_name"] == "ARCH^FETCHED")
    assert run("study", "fetch", fetched["study_uid"]).code == 0
    before = listed(run)
    assert {s["patient_name"]: s["status"] for s in before} == {
        "ARCH^FOLDER": "archived",
        "ARCH^FETCHED": "fetched",
        "ARCH^ZIP": "archived",
        "ONLINE^ONE": "online",
        "ONLINE^TWO": "online",
        "DISK^TWO": "online",
    }
    return tmp_path


def test_rebuild_after_deleting_the_index_folder_lists_the_same_studies(home, run, setup):
    before, details = listed(run), shown(run)
    shutil.rmtree(home / "index")
    result = run("index", "rebuild")
    assert result.code == 0, result.out + result.err
    assert "Rebuilt the index" in result.out and "6 studies" in result.out
    assert "1 moved out (not listed)" in result.out
    assert listed(run) == before
    assert shown(run) == details  # series and instances too
    assert run("check").code == 0 and run("verify").code == 0


def test_rebuild_deletes_nothing_and_keeps_the_old_index(home, run, setup):
    roots = [home / "images", setup / "d2", setup / "folder", setup / "zipped"]
    files, before = disk_state(*roots), listed(run)
    result = run("index", "rebuild", "--json")
    assert result.code == 0, result.err
    summary = result.json()
    assert summary["old_index"] == "readable" and summary["studies"] == 6
    kept = Path(summary["previous"])
    assert kept.parent == home and kept.name.startswith("index.replaced-")
    assert (kept / "data.mdb").exists()
    assert disk_state(*roots) == files
    assert listed(run) == before
    by_name = {s["name"]: s for s in summary["storages"]}
    assert by_name["Zipped"]["moved_out"] == 1 and by_name["Zipped"]["studies"] == 1
    assert by_name["Folder"]["studies"] == 2 and by_name["Disk 2"]["instances"] == 2
    assert summary["task_states"] == 3  # the tasks' last results are kept
    [row] = [t for t in run("tasks", "list", "--json").json() if t["name"] == "A1"]
    assert row["status"] == "Completed 2/2 studies [0 errors]"


def test_rebuild_with_a_corrupt_index(home, run, setup):
    before = listed(run)
    data = home / "index" / "data.mdb"
    data.write_bytes(os.urandom(8 * 4096))
    broken = run("studies")
    assert broken.code == 2 and "studyvault index rebuild" in broken.err
    result = run("index", "rebuild", "--json")
    assert result.code == 0, result.err
    assert result.json()["old_index"] == "corrupt"
    assert listed(run) == before


def test_rebuild_refuses_unfinished_journal_entries_unless_forced(home, run, add_task, setup):
    env = {**os.environ, "STUDYVAULT_CONFIG": str(home / "studyvault.toml")}
    add_task("Rest", "archive", "--all", to="Folder")
    killed = subprocess.run(
        [*SV, "tasks", "run", "Rest"],
        env={**env, "STUDYVAULT_FAILPOINT": "staged"},
        capture_output=True,
    )
    assert killed.returncode < 0
    refused = run("index", "rebuild")
    assert refused.code == 2
    assert "1 unfinished operation(s)" in refused.err and "check --repair" in refused.err
    assert len(refused.err.strip().splitlines()) == 1
    forced = run("index", "rebuild", "--force")
    assert forced.code == 0, forced.err
    problems = run("check", "--json").json()["problems"]
    assert [p["kind"] for p in problems] == ["orphan-staging"]  # the dropped entry's staging
    assert run("check", "--repair").code == 0 and run("check").code == 0


def test_rebuild_refuses_while_another_process_has_the_index_open(home, run, setup):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from studyvault.index import StudyIndex; "
            "i = StudyIndex(sys.argv[1]); i.count_studies(); print('ready', flush=True); "
            "time.sleep(60)",
            str(home / "index"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        refused = run("index", "rebuild", "--json")
        assert refused.code == 2, refused.out
        assert f"in use by process {holder.pid}" in refused.err
    finally:
        holder.kill()
        holder.wait()
    assert run("index", "rebuild").code == 0


def test_rebuild_keeps_the_studies_of_an_unmounted_archive(home, run, setup):
    before = listed(run)
    assert run("archives", "unmount", "Folder", "--confirm", "UNMOUNT").code == 0
    result = run("index", "rebuild")
    assert result.code == 0, result.err
    assert "Folder: unmounted, not read; 2 studies kept from the old index" in result.out
    assert listed(run) == before


def test_leftovers_of_an_interrupted_rebuild(home, run, setup):
    before = listed(run)
    partial = home / "index.rebuild"
    partial.mkdir()
    (partial / "REBUILDING").write_text("")
    (partial / "data.mdb").write_bytes(b"\0" * 4096)
    assert run("index", "rebuild").code == 0
    assert not partial.exists()
    # an old index a crash left after the swap is never deleted
    os.rename(next(home.glob("index.replaced-*")), partial)
    time.sleep(1)  # a new name for the next folder kept aside
    result = run("index", "rebuild")
    assert result.code == 0
    assert "an older index left by an interrupted rebuild was kept" in result.out
    assert len(list(home.glob("index.replaced-*"))) == 2
    assert listed(run) == before


def test_damage_since_archiving_is_not_written_into_the_rebuilt_index(home, run, setup):
    victim = sorted(p for p in (setup / "folder" / "studies").rglob("I0000002"))[0]
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0xFF
    victim.write_bytes(bytes(data))
    shutil.rmtree(home / "index")
    result = run("index", "rebuild")
    assert result.code == 0, result.err
    assert "damaged: Folder:" in result.out and "does not match its manifest SHA-256" in result.out
    # the SHA-256 recorded is the manifest's, so verify still sees the change
    verified = run("verify", "Folder", "--json")
    assert verified.code == 1
    [found] = verified.json()["problems"]
    assert [c["path"] for c in found["changed"]] == ["DICOM/S0000001/I0000002"]
