"""Crash safety: SIGKILL a task run at many moments, run it again, lose nothing.

After every kill and the final complete run, every original instance's bytes are
found exactly once where they belong, no staging is left, the journal is empty and
the index agrees with the disk.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from studyvault.config import load_config
from studyvault.index import StudyIndex
from studyvault.testing.dicomgen import make_study

SV = [sys.executable, "-m", "studyvault"]
N_STUDIES = 50


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sv(env: dict[str, str], *args: object, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([*SV, *map(str, args)], env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"studyvault {args} failed: {result.stdout}{result.stderr}")
    return result


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, list[str]]]:
    """50 small studies on disk, made once; returns the folder and study -> SHA-256s."""
    src = tmp_path_factory.mktemp("corpus")
    studies = {}
    for i in range(N_STUDIES):
        paths = make_study(
            src / f"s{i:02d}",
            n_instances=1 + i % 3,
            study_date=f"20{i % 10:02d}0101",
            patient_name=f"CRASH^{i:02d}",
            pixel_bytes=4096,
        )
        studies[f"s{i:02d}"] = sorted(sha(p) for p in paths)
    return src, studies


def setup(tmp_path: Path, corpus_dir: Path, destination: str) -> dict[str, str]:
    folder = tmp_path / "vault"
    env = {**os.environ, "STUDYVAULT_CONFIG": str(folder / "studyvault.toml")}
    env.pop("STUDYVAULT_FAILPOINT", None)
    sv(env, "init", folder)
    cfg = folder / "studyvault.toml"
    cfg.write_text(cfg.read_text().replace("stable_age_minutes = 10.0", "stable_age_minutes = 0.0"))
    sv(env, "import", corpus_dir)
    if destination == "image-dir":
        sv(env, "image-dirs", "add", "Disk 2", tmp_path / "d2")
    else:
        naming, _, zipped = destination.partition("+")
        sv(
            env,
            "archives",
            "add",
            "Archive",
            tmp_path / "arch",
            "--naming",
            naming,
            *(["--zip"] if zipped else []),
        )
    return env


def instance_files(root: Path) -> list[Path]:
    """Instance files of a storage (not key files, DICOMDIRs or manifests)."""
    skip = {"DICOMDIR", "manifest-sha256.txt", "image_directory.key", "folder_archive.key"}
    out = []
    for path in root.rglob("*"):
        if path.is_file() and path.name not in skip and not path.name.startswith("."):
            out.append(path)
    return out


def stored_hashes(root: Path) -> list[str]:
    import zipfile

    hashes = []
    for path in instance_files(root):
        if path.suffix == ".zip":
            with zipfile.ZipFile(path) as z:
                for name in z.namelist():
                    base = name.rsplit("/", 1)[-1]
                    if not name.endswith("/") and base not in ("DICOMDIR", "manifest-sha256.txt"):
                        hashes.append(hashlib.sha256(z.read(name)).hexdigest())
        else:
            hashes.append(sha(path))
    return hashes


def storage_roots(env: dict[str, str]) -> dict[str, Path]:
    config = load_config(Path(env["STUDYVAULT_CONFIG"]))
    roots = {}
    for entry in [*config.image_directories, *config.archives]:
        root = Path(entry.path)
        roots[entry.id] = root if root.is_absolute() else config.base / root
    return roots


def published_hashes(root: Path) -> list[str]:
    return stored_hashes(root / "studies")


def check_safe(env: dict[str, str], expected: list[str]) -> None:
    """Right after a kill: every instance has at least one published copy and the index
    points only at copies that exist."""
    roots = storage_roots(env)
    everything = {h for root in roots.values() for h in published_hashes(root)}
    assert set(expected) <= everything, "an instance has no published copy"
    config = load_config(Path(env["STUDYVAULT_CONFIG"]))
    with StudyIndex(config.index_dir) as index:
        for study in index.iter_studies():
            for sid, location in study.copies.items():
                assert (roots[sid] / location).exists(), f"index points at missing {location}"


def check_invariants(env: dict[str, str], expected: list[str]) -> None:
    """After a complete run: every instance exactly once; index == disk; no leftovers."""
    roots = storage_roots(env)
    everything = [h for root in roots.values() for h in published_hashes(root)]
    assert sorted(everything) == sorted(expected)
    for root in roots.values():
        assert not list(root.glob("staging/*")), f"staging left in {root}"
    config = load_config(Path(env["STUDYVAULT_CONFIG"]))
    with StudyIndex(config.index_dir) as index:
        assert list(index.iter_journal()) == []
        indexed = 0
        for study in index.iter_studies():
            for sid, location in study.copies.items():
                assert (roots[sid] / location).exists(), f"index points at missing {location}"
            for inst in index.instances(study.study_uid):
                assert set(inst.paths) == set(study.copies)
                indexed += 1
        assert indexed == len(expected)


def kill_randomly(
    env: dict[str, str],
    args: list[str],
    rng: random.Random,
    max_kills: int,
    expected_before: list[str],
) -> int:
    """Run ``args`` and SIGKILL it at random moments until a run finishes; return kills.
    After each kill, no instance may be without a published copy."""
    kills = 0
    while True:
        if kills:
            check_safe(env, expected_before)
        proc = subprocess.Popen(
            [*SV, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        if kills < max_kills:
            time.sleep(rng.uniform(0.5, 1.0))  # start-up takes ~0.5 s
        if proc.poll() is None and kills < max_kills:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            continue
        assert proc.wait(timeout=120) in (0, 1)
        return kills


@pytest.mark.parametrize("destination", ["image-dir", "readable", "uid+zip"])
def test_killed_transfer_tasks_finish_with_nothing_lost(tmp_path, corpus, destination):
    corpus_dir, hashes = corpus
    env = setup(tmp_path, corpus_dir, destination)
    action = "move" if destination == "image-dir" else "archive"
    to = "Disk 2" if destination == "image-dir" else "Archive"
    sv(
        env,
        "tasks",
        "add",
        "T",
        "--action",
        action,
        "--from",
        "Image Center Storage",
        "--to",
        to,
        "--all",
        "--throttle-ms",
        "60",
    )
    rng = random.Random(len(destination))
    everything = [h for hs in hashes.values() for h in hs]
    kills = kill_randomly(env, ["tasks", "run", "T"], rng, max_kills=6, expected_before=everything)
    assert kills >= 4, "the run ended before it could be killed: make the corpus larger"
    check_invariants(env, everything)
    studies = sv(env, "studies", "--json").stdout
    import json

    listed = json.loads(studies)
    assert len(listed) == N_STUDIES
    assert {s["copies"][0]["storage"] for s in listed} == {to}
    assert {s["status"] for s in listed} == {"online" if action == "move" else "archived"}


def test_killed_delete_task_finishes_with_the_rest_intact(tmp_path, corpus):
    corpus_dir, hashes = corpus
    env = setup(tmp_path, corpus_dir, "image-dir")
    sv(
        env,
        "tasks",
        "add",
        "Purge",
        "--action",
        "delete",
        "--from",
        "Image Center Storage",
        "--dates",
        "2000-01-01..2004-12-31",
        "--throttle-ms",
        "80",
    )
    kept = [h for name, hs in hashes.items() if int(name[1:]) % 10 >= 5 for h in hs]
    kills = kill_randomly(
        env,
        ["tasks", "run", "Purge", "--confirm", "DELETE"],
        random.Random(7),
        max_kills=6,
        expected_before=kept,
    )
    assert kills >= 4
    import json

    remaining = json.loads(sv(env, "studies", "--json").stdout)
    assert {s["study_date"][:4] for s in remaining} == {"2005", "2006", "2007", "2008", "2009"}
    check_invariants(env, kept)


@pytest.mark.parametrize(
    "failpoint",
    ["journaled", "staged", "verified", "published", "committed", "removed"],
)
def test_kill_at_each_step_of_the_protocol(tmp_path, corpus, failpoint):
    corpus_dir, hashes = corpus
    env = setup(tmp_path, corpus_dir, "readable")
    sv(
        env,
        "tasks",
        "add",
        "T",
        "--action",
        "archive",
        "--from",
        "Image Center Storage",
        "--to",
        "Archive",
        "--all",
        "--throttle-ms",
        "0",
    )
    everything = [h for hs in hashes.values() for h in hs]
    for hit in (1, 3):
        crashed = subprocess.run(
            [*SV, "tasks", "run", "T"],
            capture_output=True,
            env={**env, "STUDYVAULT_FAILPOINT": f"{failpoint}:{hit}"},
        )
        assert crashed.returncode == -signal.SIGKILL
        check_safe(env, everything)
    sv(env, "tasks", "run", "T")
    check_invariants(env, everything)
    import json

    listed = json.loads(sv(env, "studies", "--json").stdout)
    assert len(listed) == N_STUDIES and {s["status"] for s in listed} == {"archived"}
