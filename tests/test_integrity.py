"""verify, check (--repair), audit and a corrupt index, end to end on real files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from studyvault.testing.dicomgen import make_study

SV = [sys.executable, "-m", "studyvault"]


def flip_byte(path: Path, offset: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def flip_zip_member(zip_path: Path, member: str) -> None:
    """Flip one byte in the middle of a stored member's data, in place."""
    with zipfile.ZipFile(zip_path) as zf:
        info = zf.getinfo(member)
    with open(zip_path, "rb") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = (
            int.from_bytes(f.read(2), "little"),
            int.from_bytes(f.read(2), "little"),
        )
    start = info.header_offset + 30 + name_len + extra_len
    flip_byte(zip_path, start + info.compress_size // 2)


def archive_instances(root: Path) -> list[Path]:
    """Instance files of a folder archive (not DICOMDIR, manifest or markers)."""
    return sorted(p for p in (root / "studies").rglob("*") if p.is_file() and "DICOM" in p.parts)


@pytest.fixture
def store(home, run, add_task, tmp_path):
    """Three stable studies: two online in the image directory, one archived in the
    folder archive ``Archive`` (readable naming)."""
    cfg = home / "studyvault.toml"
    cfg.write_text(cfg.read_text().replace("stable_age_minutes = 10.0", "stable_age_minutes = 0.0"))
    for i, date in enumerate(("20050101", "20150101", "20200101")):
        make_study(
            tmp_path / "src" / str(i), n_instances=3, patient_name=f"STORE^{i}", study_date=date
        )
    assert run("import", tmp_path / "src").code == 0
    assert run("archives", "add", "Archive", tmp_path / "arch").code == 0
    add_task("Old", "archive", "--dates", "2000-01-01..2009-12-31", to="Archive")
    assert run("tasks", "run", "Old").code == 0
    return tmp_path


def online_files(home: Path) -> list[Path]:
    return sorted((home / "images" / "studies").rglob("*.dcm"))


def test_verify_and_check_on_a_consistent_store_report_nothing(home, run, store):
    result = run("verify")
    assert result.code == 0, result.out + result.err
    assert "Verified 9 files" in result.out and "no problems" in result.out
    report = run("verify", "--json").json()
    assert report["ok"] is True and report["problems"] == []
    assert {s["name"]: s["studies"] for s in report["storages"]} == {
        "Image Center Storage": 2,
        "Archive": 1,
    }
    checked = run("check")
    assert checked.code == 0, checked.out
    assert "The index and the storages agree (3 studies)" in checked.out
    assert run("check", "--json").json()["problems"] == []


def test_a_flipped_byte_in_an_archived_instance_is_reported_as_changed(home, run, store):
    victim = archive_instances(store / "arch")[1]
    flip_byte(victim, 200)
    result = run("verify", "Archive")
    assert result.code == 1
    rel = victim.relative_to(next(p for p in victim.parents if p.name == "DICOM").parent)
    assert f"changed: {rel.as_posix()} (instance" in result.out
    [found] = run("verify", "--json").json()["problems"]
    assert found["storage"] == "Archive" and found["patient_name"] == "STORE^0"
    assert [c["path"] for c in found["changed"]] == [rel.as_posix()]
    assert found["missing"] == found["unknown"] == found["unreadable"] == []
    assert run("verify", "Image Center Storage").code == 0  # the other storage is fine


def test_a_flipped_byte_in_a_zipped_study_is_reported(home, run, add_task, store, tmp_path):
    run("archives", "add", "Zipped", tmp_path / "zarch", "--naming", "uid", "--zip")
    add_task("Z", "archive", "--dates", "2010-01-01..2016-12-31", to="Zipped")
    assert run("tasks", "run", "Z").code == 0
    [zipped] = (tmp_path / "zarch" / "studies").glob("*.zip")
    member = "DICOM/S0000001/I0000002"
    flip_zip_member(zipped, member)
    result = run("verify", "Zipped", "--json")
    assert result.code == 1
    [found] = result.json()["problems"]
    # the zip's own CRC-32 catches the change before the SHA-256 does
    assert [f["path"] for f in found["changed"] + found["unreadable"]] == [member]
    assert found["missing"] == found["unknown"] == []


def test_a_deleted_file_is_missing_and_a_stray_file_is_unknown(home, run, store):
    files = online_files(home)
    files[0].unlink()
    stray = files[-1].parent / "notes.txt"
    stray.write_text("not an image")
    result = run("verify", "--json")
    assert result.code == 1
    problems = {p["study_uid"]: p for p in result.json()["problems"]}
    assert files[0].parent != stray.parent and len(problems) == 2
    missing = [f for p in problems.values() for f in p["missing"]]
    unknown = [f for p in problems.values() for f in p["unknown"]]
    assert [m["path"] for m in missing] == [files[0].name]
    assert [u["path"] for u in unknown] == ["notes.txt"]
    assert all(not p["changed"] for p in problems.values())
    text = run("verify").out
    assert f"missing: {files[0].name}" in text and "unknown: notes.txt: not in the index" in text


def test_worker_processes_find_what_one_process_finds(home, run, store, monkeypatch):
    """The command line verifies local storages on forked workers, each a share of the
    studies with its own handle on the index: the same report as one process gives,
    for every kind of finding."""
    from studyvault import integrity
    from studyvault.vault import Vault

    files = online_files(home)
    files[0].unlink()  # missing
    flip_byte(files[-1], 300)  # changed
    (files[-1].parent / "stray.dcm").write_bytes(b"x")  # unknown
    shutil.rmtree(archive_instances(store / "arch")[0].parent.parent.parent)  # folder gone
    vault = Vault.open()
    try:
        alone = integrity.verify(vault, processes=1)
        seen: list[tuple[int, int]] = []
        forked = integrity.verify(vault, processes=2, progress=lambda *p: seen.append(p))
    finally:
        vault.close()
    assert not alone.ok and len(alone.problems) == 3
    for report in (alone, forked):
        report.seconds = 0.0
    assert forked == alone
    kinds = {k for p in forked.problems for k in ("missing", "changed", "unknown") if getattr(p, k)}
    assert kinds == {"missing", "changed", "unknown"}
    assert seen and seen[-1] == (3, 3)  # progress reaches every study
    assert integrity._forked == {}  # the workers are gone with their storages


def test_verify_a_sample(home, run, store):
    result = run("verify", "--sample", "50%", "--seed", "3", "--json")
    assert result.code == 0
    report = result.json()
    hashed = sum(s["files"] for s in report["storages"])
    assert report["sample_percent"] == 50 and 0 <= hashed < 9
    again = run("verify", "--sample", "50%", "--seed", "3", "--json").json()
    assert sum(s["files"] for s in again["storages"]) == hashed  # same seed, same sample
    for bad in ("0", "150%", "half"):
        refused = run("verify", "--sample", bad)
        assert refused.code == 2 and "--sample" in refused.err
        assert len(refused.err.strip().splitlines()) == 1


def test_verify_refuses_an_unknown_storage(home, run, store):
    result = run("verify", "Nowhere")
    assert result.code == 2 and "no image directory or archive named 'Nowhere'" in result.err


def test_unmounted_and_offline_archives_are_reported_not_crashed_on(home, run, store):
    assert run("archives", "unmount", "Archive", "--confirm", "UNMOUNT").code == 0
    result = run("verify")
    assert result.code == 0, result.out + result.err
    assert "Archive: unmounted" in result.out
    assert run("check").code == 0
    run("archives", "mount", store / "arch")
    (store / "arch").rename(store / "arch-gone")  # a network share that went away
    result = run("verify", "--json")
    assert result.code == 1
    archive = next(s for s in result.json()["storages"] if s["name"] == "Archive")
    assert archive["verified"] is False and archive["status"] == "Offline"
    checked = run("check")
    assert checked.code == 1 and "storage-offline: Archive" in checked.out


def test_verify_runs_as_a_storage_task(home, run, add_task, store):
    result = add_task("V", "verify", "--all", source="Archive")
    assert result.code == 0, result.err
    assert "Verify all studies from Archive" in result.out
    ran = run("tasks", "run", "V")
    assert ran.code == 0, ran.out + ran.err
    assert "Completed 1/1 studies [0 errors]" in ran.out
    victim = archive_instances(store / "arch")[0]
    flip_byte(victim)
    ran = run("tasks", "run", "V")
    assert ran.code == 1
    assert "Completed 1/1 studies [1 errors]" in ran.out
    assert "Archive: 1 problem(s): changed: DICOM/S0000001/I0000001" in ran.out
    assert victim.exists()  # verify changes nothing
    online = add_task("V2", "verify", "--all")
    assert online.code == 0 and run("tasks", "run", "V2").code == 0


def test_orphan_staging_is_reported_and_removed_by_repair(home, run, store):
    orphan = home / "images" / "staging" / "0123456789abcdef"
    orphan.mkdir(parents=True)
    (orphan / "x.dcm").write_bytes(b"half a copy")
    result = run("check")
    assert result.code == 1
    assert "orphan-staging: Image Center Storage: staging/0123456789abcdef" in result.out
    assert "1 can be fixed with `studyvault check --repair`" in result.out
    repaired = run("check", "--repair")
    assert repaired.code == 0, repaired.out
    assert "repaired: removed orphan staging staging/0123456789abcdef" in repaired.out
    assert not orphan.exists()
    [line] = [a for a in run("audit", "--json").json() if a["op"] == "repair"]
    assert line["source"] == "Image Center Storage" and "staging/0123456789abcdef" in line["detail"]
    assert run("check").code == 0


def test_an_unindexed_study_folder_is_indexed_by_repair(home, run, store, tmp_path):
    files = make_study(tmp_path / "lost", n_instances=2, patient_name="LOST^ONE")
    folder = home / "images" / "studies" / "ff" / "1.2.3.999"
    folder.mkdir(parents=True)
    for f in files:
        shutil.copy(f, folder / f.name)
    result = run("check", "--json")
    assert result.code == 1
    [problem] = result.json()["problems"]
    assert problem["kind"] == "unindexed-study" and problem["location"] == "studies/ff/1.2.3.999"
    repaired = run("check", "--repair")
    assert repaired.code == 0, repaired.out
    assert "repaired: indexed study" in repaired.out and "(2 instances)" in repaired.out
    lost = [s for s in run("studies", "--json").json() if s["patient_name"] == "LOST^ONE"]
    assert lost and lost[0]["instances"] == 2 and lost[0]["status"] == "online"
    assert any(
        a["op"] == "repair" and a["patient_name"] == "LOST^ONE"
        for a in run("audit", "--json").json()
    )
    assert run("check").code == 0 and run("verify").code == 0


def test_unindexed_instances_in_an_indexed_study_are_indexed_by_repair(home, run, store):
    study_dir = online_files(home)[0].parent
    uid = study_dir.name
    extra = make_study(store / "extra", n_instances=1, study_uid=uid)[0]
    shutil.copy(extra, study_dir / "extra.dcm")
    (study_dir / "readme.txt").write_text("left by someone")
    result = run("check", "--json")
    [problem] = result.json()["problems"]
    assert problem["kind"] == "unindexed-files"
    assert problem["paths"] == ["extra.dcm", "readme.txt"]
    repaired = run("check", "--repair")
    assert repaired.code == 1  # readme.txt is no DICOM: it stays reported
    assert "indexed 1 of 2 file(s); 1 left" in repaired.out and "readme.txt" in repaired.out
    shown = run("study", "show", uid, "--json").json()
    assert shown["instances"] == 4


def test_a_missing_study_folder_is_reported_not_repaired(home, run, store):
    folder = online_files(home)[0].parent
    shutil.rmtree(folder)
    result = run("check", "--repair")
    assert result.code == 1
    assert f"missing-study: Image Center Storage: study {folder.name}" in result.out
    assert "no other copy" in result.out
    assert run("verify").code == 1


def lose_every_online_study(home: Path) -> None:
    """The image directory's disk lost its studies (its key file survived)."""
    shutil.rmtree(home / "images" / "studies")
    (home / "images" / "studies").mkdir()


def test_forget_drops_missing_copies_and_keeps_archived_ones(home, run, store):
    archived = next(s for s in run("studies", "--json").json() if s["status"] == "archived")
    assert run("study", "fetch", archived["study_uid"]).code == 0  # online and archived
    lose_every_online_study(home)

    refused = run("study", "forget", "--storage", "Image Center Storage")
    assert refused.code == 2 and len(refused.err.strip().splitlines()) == 1
    assert "pass --confirm FORGET" in refused.err
    wrong = run("study", "forget", "--storage", "Image Center Storage", "--confirm", "yes")
    assert wrong.code == 2 and "type exactly FORGET" in wrong.err
    assert len(run("studies", "--json").json()) == 3  # nothing forgotten yet

    result = run("study", "forget", "--storage", "Image Center Storage", "--confirm", "FORGET")
    assert result.code == 0, result.err
    assert result.out.count("no copy is left, it left the index") == 2
    assert f"Forgot the copy of study {archived['study_uid']} (STORE 0" in result.out
    assert "the study stays in Archive" in result.out
    assert "Forgot 3 missing copies of 3 checked: 2 studies left the index, 1 stay" in result.out
    [left] = run("studies", "--json").json()
    assert left["study_uid"] == archived["study_uid"] and left["status"] == "archived"
    assert [c["storage"] for c in left["copies"]] == ["Archive"]
    assert run("check").code == 0 and run("verify").code == 0
    forgotten = [e for e in run("audit", "--json").json() if e["op"] == "forget"]
    assert len(forgotten) == 3
    assert {e["source"] for e in forgotten} == {"Image Center Storage"}
    assert all(e["user"] and e["instances"] == 3 and e["patient_name"] for e in forgotten)
    assert sum("no copy left" in e["detail"] for e in forgotten) == 2
    # the archived study can be fetched again
    assert run("study", "fetch", archived["study_uid"]).code == 0
    again = run("study", "forget", "--storage", "Image Center Storage", "--confirm", "FORGET")
    assert again.code == 0 and "Nothing to forget: all 1 copies checked are there" in again.out


def test_forget_by_uid_touches_only_missing_copies(home, run, store):
    online = [s for s in run("studies", "--json").json() if s["status"] == "online"]
    files_before = online_files(home)
    gone = next(p.parent for p in files_before if online[0]["study_uid"] in str(p))
    shutil.rmtree(gone)
    present = run("study", "forget", online[1]["study_uid"], "--confirm", "FORGET")
    assert present.code == 2 and "no copy of it is missing" in present.err
    unknown = run("study", "forget", "1.2.3.4.5", "--confirm", "FORGET")
    assert unknown.code == 2 and "no study with StudyInstanceUID 1.2.3.4.5" in unknown.err
    result = run("study", "forget", online[0]["study_uid"], "--confirm", "FORGET", "--json")
    assert result.code == 0, result.err
    report = result.json()
    assert report["forgotten"] == 1 and report["studies_forgotten"] == 1
    [item] = report["items"]
    assert item["outcome"] == "study-forgotten" and item["storage"] == "Image Center Storage"
    assert len(run("studies", "--json").json()) == 2
    assert len(online_files(home)) == len(files_before) - 3  # nothing else was removed
    assert run("check").code == 0


def test_forget_keeps_the_archive_copy_of_a_fetched_study_that_grew(home, run, store, tmp_path):
    archived = next(s for s in run("studies", "--json").json() if s["status"] == "archived")
    uid = archived["study_uid"]
    assert run("study", "fetch", uid).code == 0
    # a key image added while the study was online exists in the online copy only
    make_study(tmp_path / "extra", n_instances=1, study_uid=uid, patient_name="STORE^0",
               study_date="20050101", modality="KO")  # fmt: skip
    assert run("import", tmp_path / "extra").code == 0
    assert run("study", "show", uid, "--json").json()["instances"] == 4
    lose_every_online_study(home)
    result = run("study", "forget", uid, "--confirm", "FORGET", "--json")
    assert result.code == 0, result.err
    [item] = result.json()["items"]
    assert item["outcome"] == "forgotten" and item["lost_instances"] == 1
    assert item["remaining"] == ["Archive"]
    shown = run("study", "show", uid, "--json").json()
    assert shown["instances"] == 3 and shown["status"] == "archived"
    assert "KO" not in shown["modalities"]
    assert run("verify", "Archive").code == 0


def test_forget_refuses_an_offline_storage(home, run, store, tmp_path):
    (home / "images").rename(tmp_path / "unplugged")  # its disk is not mounted
    result = run("study", "forget", "--storage", "Image Center Storage", "--confirm", "FORGET")
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1
    assert "Image Center Storage is offline" in result.err
    assert "may just be unmounted" in result.err
    assert len(run("studies", "--json").json()) == 3
    assert not [e for e in run("audit", "--json").json() if e["op"] == "forget"]


def test_a_stuck_journal_entry_is_replayed_by_repair(home, run, add_task, store):
    env = {**os.environ, "STUDYVAULT_CONFIG": str(home / "studyvault.toml")}
    add_task("All", "archive", "--all", to="Archive")
    killed = subprocess.run(
        [*SV, "tasks", "run", "All"],
        env={**env, "STUDYVAULT_FAILPOINT": "verified"},
        capture_output=True,
    )
    assert killed.returncode < 0  # SIGKILL at the failpoint
    result = run("check", "--json")
    assert result.code == 1
    kinds = [p["kind"] for p in result.json()["problems"]]
    assert kinds == ["stuck-journal"]
    repaired = run("check", "--repair")
    assert repaired.code == 0, repaired.out
    assert "repaired: resumed the archive: finished archive" in repaired.out
    assert {s["status"] for s in run("studies", "--json").json()} == {"archived", "online"}
    assert run("check").code == 0 and run("verify").code == 0
    ops = [a["op"] for a in run("audit", "--json").json()]
    assert ops.count("repair") == 1


def test_every_destructive_path_leaves_an_audit_line(home, run, add_task, store, tmp_path):
    run("image-dirs", "add", "Disk 2", tmp_path / "d2")
    add_task("Move", "move", "--dates", "2015-01-01..2015-12-31", to="Disk 2")
    assert run("tasks", "run", "Move").code == 0
    add_task("Purge", "delete", "--all")
    assert run("tasks", "run", "Purge", "--confirm", "DELETE").code == 0
    (tmp_path / "d2" / "staging" / "feed").mkdir(parents=True)
    assert run("check", "--repair").code == 0
    entries = run("audit", "--json").json()
    assert [(e["op"], e["patient_name"]) for e in entries] == [
        ("archive", "STORE^0"),
        ("move", "STORE^1"),
        ("delete", "STORE^2"),
        ("repair", ""),
    ]
    assert entries[0]["source"] == "Image Center Storage" and entries[0]["destination"] == "Archive"
    assert entries[2]["task"] == "Purge" and entries[2]["instances"] == 3
    assert all(e["user"] and e["time"] and e["host"] for e in entries)
    table = run("audit").out
    for column in ("Time", "User", "Op", "Task", "Patient", "Study UID", "Instances", "From", "To"):
        assert column in table
    assert "STORE 2 (PID1)" in table and "4 entries" in table
    assert run("audit", "--since", "2999-01-01", "--json").json() == []
    assert len(run("audit", "--since", entries[0]["time"][:10], "--json").json()) == 4
    bad = run("audit", "--since", "yesterday")
    assert bad.code == 2 and "--since: 'yesterday'" in bad.err


def test_a_truncated_index_is_detected_and_rebuild_fixes_it(home, run, store):
    before = sorted(run("studies", "--json").json(), key=lambda s: s["study_uid"])
    data = home / "index" / "data.mdb"
    with open(data, "r+b") as f:
        f.truncate(5000)
    result = run("studies")
    assert result.code == 2
    assert "is truncated" in result.err and "studyvault index rebuild" in result.err
    assert len(result.err.strip().splitlines()) == 1
    rebuilt = run("index", "rebuild")
    assert rebuilt.code == 0, rebuilt.out + rebuilt.err
    after = sorted(run("studies", "--json").json(), key=lambda s: s["study_uid"])
    assert after == before
    assert json.dumps(after)  # plain JSON


def test_a_deleted_index_is_refused_not_taken_for_an_empty_vault(home, run, store):
    before = sorted(run("studies", "--json").json(), key=lambda s: s["study_uid"])
    shutil.rmtree(home / "index")
    for command in (["studies"], ["tasks", "list"], ["image-dirs", "list"], ["check"]):
        result = run(*command)
        assert result.code == 2, (command, result.out)
        [line] = result.err.strip().splitlines()
        assert f"the study index at {home / 'index'} is missing" in line
        assert "holds studies: run `studyvault index rebuild`" in line
    assert not (home / "index").exists()  # nothing was started afresh
    assert run("plugins").code == 0
    rebuilt = run("index", "rebuild")
    assert rebuilt.code == 0, rebuilt.out + rebuilt.err
    after = sorted(run("studies", "--json").json(), key=lambda s: s["study_uid"])
    assert after == before


def test_a_new_empty_index_beside_stored_studies_is_refused(home, run, store):
    shutil.rmtree(home / "index")
    from studyvault.index import StudyIndex

    StudyIndex(home / "index").close()  # as an older studyvault would have left it
    result = run("studies")
    assert result.code == 2 and "is empty while Image Center Storage holds studies" in result.err


def test_an_empty_vault_and_an_empty_index_are_fine(home, run, tmp_path):
    assert run("studies").code == 0
    shutil.rmtree(home / "index")
    assert run("studies").code == 0 and "0 studies" in run("studies").out
