"""Fixtures: a fresh studyvault set-up in tmp_path and a way to run its CLI."""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from studyvault.cli import main
from studyvault.manager import reset_plugins


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> object:
        return json.loads(self.out)


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]):
    """Run ``studyvault ARGS`` in this process; returns exit code, stdout, stderr."""

    def _run(*args: object) -> Result:
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return _run


@pytest.fixture
def add_task(run):
    """``studyvault tasks add NAME --action ACTION --from SOURCE [--to TO] OPTION...
    --throttle-ms N`` through :func:`run`: the source defaults to the starter image
    directory and the throttle to 0 (``throttle_ms=None`` leaves the option out)."""

    def _add(
        name: str,
        action: str,
        *options: object,
        source: str = "Image Center Storage",
        to: object = None,
        throttle_ms: int | None = 0,
    ) -> Result:
        args: list[object] = ["tasks", "add", name, "--action", action, "--from", source]
        if to is not None:
            args += ["--to", to]
        args += options
        if throttle_ms is not None:
            args += ["--throttle-ms", throttle_ms]
        return run(*args)

    return _add


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run) -> Path:
    """A studyvault set up with `studyvault init` in tmp_path/vault, used by default."""
    folder = tmp_path / "vault"
    monkeypatch.delenv("STUDYVAULT_CONFIG", raising=False)
    monkeypatch.setenv("STUDYVAULT_HOME", str(tmp_path / "default-home"))
    result = run("init", folder)
    assert result.code == 0, result.err
    monkeypatch.setenv("STUDYVAULT_CONFIG", str(folder / "studyvault.toml"))
    return folder


@pytest.fixture(autouse=True)
def _fresh_plugins(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("STUDYVAULT_BLOCK_PLUGINS", raising=False)
    reset_plugins()
    yield
    reset_plugins()


# pynetdicom installs its own storescu/echoscu into the virtual environment's bin, which
# tox puts first on PATH; the tests mean DCMTK's, which live beside dcmdump.
_dcmdump = shutil.which(
    "dcmdump",
    path=os.environ.get("PATH", "").replace(os.path.dirname(sys.executable) + os.pathsep, ""),
)
if _dcmdump:
    os.environ["PATH"] = os.path.dirname(_dcmdump) + os.pathsep + os.environ.get("PATH", "")


@pytest.fixture(scope="session")
def dcmtk() -> None:
    """DCMTK is an independent judge in these tests; scripts/bootstrap installs it."""
    assert shutil.which("dcmdump"), "DCMTK is missing: run scripts/bootstrap"


@pytest.fixture(scope="session")
def dicom3tools() -> None:
    assert shutil.which("dciodvfy"), "dicom3tools is missing: run scripts/bootstrap"


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


os.environ.setdefault("COLUMNS", "200")

# CI runs the same hypothesis examples every time (a failure there is reproducible);
# developers' runs explore new ones.
from hypothesis import settings as _hypothesis_settings  # noqa: E402

_hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    _hypothesis_settings.load_profile("ci")
