"""The example third-party plugin in docs/examples installs with pip into a fresh
virtual environment, shows in ``studyvault plugins`` and runs as a storage task."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import site
import subprocess
import venv
from importlib.metadata import distribution
from pathlib import Path

import pytest

from studyvault.testing.dicomgen import make_study

EXAMPLE = Path(__file__).parent.parent / "docs" / "examples" / "studyvault-second-copy"
GUIDE = Path(__file__).parent.parent / "docs" / "plugins.md"
# no index, no download: the example depends only on what is installed already
OFFLINE = ["--no-index", "--no-deps", "--no-build-isolation", "--no-cache-dir"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_venv(folder: Path) -> tuple[Path, Path]:
    """A new virtual environment (no pip of its own) that also sees the packages of
    the one running these tests: studyvault, pip, setuptools, pytest. A ``.pth`` file
    adds them with ``site.addsitedir`` so their own ``.pth`` files (studyvault's
    editable install) work too. Returns its python and its site-packages."""
    venv.EnvBuilder(with_pip=False).create(folder)
    python = folder / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    parents = [*site.getsitepackages(), str(distribution("studyvault").locate_file(""))]
    lines = [f"import site; site.addsitedir({p!r})" for p in dict.fromkeys(parents)]
    (Path(purelib) / "_studyvault_parent.pth").write_text("\n".join(lines) + "\n")
    return python, Path(purelib)


@pytest.fixture(scope="module")
def plugin_venv(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(python of a fresh venv with studyvault-second-copy installed, the example's copy
    it was installed from, the venv's site-packages). Installed offline, from a copy,
    so the build leaves nothing in docs/examples."""
    root = tmp_path_factory.mktemp("example-plugin")
    source = root / "studyvault-second-copy"
    shutil.copytree(
        EXAMPLE,
        source,
        ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", ".pytest_cache"),
    )
    python, purelib = make_venv(root / "venv")
    install = subprocess.run(
        [python, "-m", "pip", "install", *OFFLINE, "--quiet", source],
        capture_output=True,
        text=True,
        env=clean_env(),
    )
    assert install.returncode == 0, install.stdout + install.stderr
    return python, source, purelib


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without what would leak studyvault or pytest state
    into a child process."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("STUDYVAULT_", "PYTEST_")) and k != "PYTHONPATH"
    }
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.update(extra)
    return env


def studyvault_in(python: Path, *args: object, **env: str) -> str:
    """Run ``python -m studyvault ARGS`` (the new venv's studyvault); its stdout."""
    done = subprocess.run(
        [python, "-m", "studyvault", *map(str, args)],
        capture_output=True,
        text=True,
        env=clean_env(**env),
        timeout=60,
    )
    assert done.returncode == 0, f"studyvault {args}: {done.stdout}{done.stderr}"
    return done.stdout


def test_installed_example_is_listed_by_studyvault_plugins(plugin_venv, tmp_path):
    python, _, purelib = plugin_venv
    listed = studyvault_in(python, "plugins", "--json", STUDYVAULT_HOME=str(tmp_path))
    plugins = {p["name"]: p for p in json.loads(listed)}
    assert plugins["second_copy"]["distribution"] == "studyvault-second-copy"
    assert plugins["second_copy"]["version"] == "1.0.0"
    assert plugins["second_copy"]["actions"] == ["copy"]
    assert plugins["second_copy"]["hooks"] == ["studyvault_register_actions"]
    assert plugins["image_directory"]["distribution"] == "studyvault"  # seen from the venv
    table = studyvault_in(python, "plugins", STUDYVAULT_HOME=str(tmp_path))
    assert re.search(r"second_copy\s.*studyvault-se", table)

    # pip put it into the new venv, beside nothing else but the link to studyvault's
    installed = sorted(p.name for p in purelib.iterdir() if not p.name.startswith("_"))
    assert installed == ["studyvault_second_copy", "studyvault_second_copy-1.0.0.dist-info"]


def test_second_copy_task_runs_end_to_end_on_real_dicom_files(plugin_venv, home, run, tmp_path):
    python, _, _ = plugin_venv
    config = home / "studyvault.toml"
    text = config.read_text()
    config.write_text(text.replace("stable_age_minutes = 10.0", "stable_age_minutes = 0.0"))
    studies = {
        name: make_study(tmp_path / "cd" / name, n_instances=n, patient_name=name, n_series=2)
        for name, n in (("DOE^JANE", 3), ("ROE^RICHARD", 4))
    }
    assert run("import", tmp_path / "cd").code == 0
    assert run("archives", "add", "My Study Archive", tmp_path / "first").code == 0
    offsite = run("archives", "add", "Offsite Archive", tmp_path / "second", "--naming", "uid")
    assert offsite.code == 0
    run(
        "tasks",
        "add",
        "Archive",
        "--action",
        "archive",
        "--from",
        "Image Center Storage",
        "--to",
        "My Study Archive",
        "--all",
        "--throttle-ms",
        "0",
    )
    assert "Completed 2/2 studies [0 errors]" in run("tasks", "run", "Archive").out

    env = {"STUDYVAULT_CONFIG": str(config)}
    added = studyvault_in(
        python,
        "tasks",
        "add",
        "Second Copy",
        "--action",
        "copy",
        "--from",
        "My Study Archive",
        "--to",
        "Offsite Archive",
        "--all",
        "--throttle-ms",
        "0",
        **env,
    )
    assert "Copy all studies from My Study Archive to Offsite Archive" in added
    ran = studyvault_in(python, "tasks", "run", "Second Copy", **env)
    assert "Completed 2/2 studies [0 errors]" in ran

    # on disk: each archive holds every study whole, byte for byte, as a DICOM file-set
    for archive in ("first", "second"):
        folders = sorted(p.parent for p in (tmp_path / archive / "studies").rglob("DICOMDIR"))
        assert len(folders) == 2, archive
        held = sorted(
            sha256(p) for folder in folders for p in (folder / "DICOM").rglob("*") if p.is_file()
        )
        assert held == sorted(sha256(f) for files in studies.values() for f in files)
    listed = json.loads(studyvault_in(python, "studies", "--json", **env))
    for study in listed:
        assert study["status"] == "archived"
        assert sorted(c["storage"] for c in study["copies"]) == [
            "My Study Archive",
            "Offsite Archive",
        ]
    verified = json.loads(studyvault_in(python, "verify", "Offsite Archive", "--json", **env))
    assert verified["ok"] and verified["problems"] == []
    assert verified["storages"][0]["studies"] == 2 and verified["storages"][0]["files"] == 7
    audit = [json.loads(line) for line in (home / "audit.log").read_text().splitlines()]
    copies = [a for a in audit if a["op"] == "copy"]
    assert {(a["source"], a["destination"], a["task"]) for a in copies} == {
        ("My Study Archive", "Offsite Archive", "Second Copy")
    }
    assert len(copies) == 2
    assert not any(a["op"] == "delete" for a in audit)


def test_the_examples_own_tests_pass_in_the_new_venv(plugin_venv):
    python, source, _ = plugin_venv
    done = subprocess.run(
        [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist"],
        cwd=source,
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 passed" in done.stdout


def test_the_guide_shows_the_example_as_shipped():
    guide = GUIDE.read_text()
    plugin = (EXAMPLE / "src" / "studyvault_second_copy" / "plugin.py").read_text()
    pyproject = (EXAMPLE / "pyproject.toml").read_text()
    blocks = re.findall(r"```(\w+)\n(.*?)```", guide, re.S)
    action = [b for lang, b in blocks if lang == "python" and "class SecondCopyAction" in b]
    assert action and action[0] in plugin
    entry = [b for lang, b in blocks if lang == "toml" and "entry-points.studyvault" in b]
    assert entry and entry[0] in pyproject
