"""Tests of the ``copy`` action: one with a stand-in context, one through studyvault's
own command line on real DICOM files (the plugin must be installed: ``pip install -e .``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from studyvault import Role, StudyRecord
from studyvault.cli import main
from studyvault.testing.dicomgen import make_study

from studyvault_second_copy.plugin import SecondCopyAction


class FakeArchive:
    role = Role.ARCHIVE

    def __init__(self, storage_id: str) -> None:
        self.id = storage_id
        self.name = storage_id


class FakeContext:
    """Records what the action asks of studyvault (an action sees nothing else)."""

    def __init__(self) -> None:
        self.task = "Second Copy"
        self.source = FakeArchive("first")
        self.destination = FakeArchive("second")
        self.calls: list[tuple[str, str]] = []

    def copy(self, study: StudyRecord, destination: FakeArchive) -> None:
        self.calls.append(("copy", destination.id))

    def transfer(self, study: StudyRecord, **kwargs: object) -> StudyRecord:
        self.calls.append(("transfer", study.study_uid))
        return study

    def delete(self, study: StudyRecord) -> None:
        self.calls.append(("delete", study.study_uid))


def test_copies_a_study_once_and_never_moves_or_deletes():
    ctx = FakeContext()
    study = StudyRecord(study_uid="1.2.3", copies={"first": "studies/a"})
    SecondCopyAction().run(ctx, study)  # type: ignore[arg-type]
    assert ctx.calls == [("copy", "second")]

    copied = StudyRecord(study_uid="1.2.3", copies={"first": "studies/a", "second": "s/a"})
    SecondCopyAction().run(ctx, copied)  # type: ignore[arg-type]
    assert ctx.calls == [("copy", "second")]  # already there: nothing more


def test_action_is_registered_for_archives_only():
    assert SecondCopyAction.name == "copy"
    assert SecondCopyAction.source_roles == (Role.ARCHIVE,)
    assert SecondCopyAction.destination_roles == (Role.ARCHIVE,)
    assert SecondCopyAction.confirm_word is None


@pytest.fixture
def sv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    """Run ``studyvault ARGS`` in this process against a fresh vault in tmp_path;
    returns what it printed on stdout (and fails on a non-zero exit)."""
    monkeypatch.setenv("STUDYVAULT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("STUDYVAULT_CONFIG", str(tmp_path / "vault" / "studyvault.toml"))
    monkeypatch.delenv("STUDYVAULT_BLOCK_PLUGINS", raising=False)

    def run(*args: object) -> str:
        capsys.readouterr()
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            captured = capsys.readouterr()
            assert not exc.code, f"studyvault {args} failed: {captured.err}"
            return captured.out
        return capsys.readouterr().out

    run("init", tmp_path / "vault")
    config = tmp_path / "vault" / "studyvault.toml"
    # studies imported a moment ago count as still receiving; this test does not wait
    config.write_text(
        config.read_text().replace("stable_age_minutes = 10.0", "stable_age_minutes = 0.0")
    )
    return run


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_second_copy_task_copies_archived_studies_and_keeps_the_first(sv, tmp_path):
    files = make_study(tmp_path / "cd", n_instances=3, patient_name="DOE^JANE")
    sv("import", tmp_path / "cd")
    sv("archives", "add", "My Study Archive", tmp_path / "first")
    sv("archives", "add", "Offsite Archive", tmp_path / "second")
    sv("tasks", "add", "Archive", "--action", "archive", "--from", "Image Center Storage",
       "--to", "My Study Archive", "--all", "--throttle-ms", "0")  # fmt: skip
    sv("tasks", "run", "Archive")

    out = sv("tasks", "add", "Second Copy", "--action", "copy", "--from", "My Study Archive",
             "--to", "Offsite Archive", "--all", "--throttle-ms", "0")  # fmt: skip
    assert "Copy all studies from My Study Archive to Offsite Archive" in out
    assert "Completed 1/1 studies [0 errors]" in sv("tasks", "run", "Second Copy")

    originals = sorted(sha256(f) for f in files)
    for archive in ("first", "second"):
        [study_dir] = (tmp_path / archive / "studies").glob("*/*")
        assert (study_dir / "DICOMDIR").is_file()
        copied = [p for p in (study_dir / "DICOM").rglob("*") if p.is_file()]
        assert sorted(sha256(p) for p in copied) == originals
    [study] = json.loads(sv("studies", "--json"))
    assert sorted(c["storage"] for c in study["copies"]) == ["My Study Archive", "Offsite Archive"]

    # a second run finds the copy there and copies nothing again
    assert "Completed 1/1 studies [0 errors]" in sv("tasks", "run", "Second Copy")
    ops = [json.loads(line)["op"] for line in (tmp_path / "vault" / "audit.log").open()]
    assert ops.count("copy") == 1
