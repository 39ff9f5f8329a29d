"""The config file: starter config, validation errors, edits that keep comments."""

from __future__ import annotations

import tomllib
from pathlib import Path

import msgspec
import pytest

from studyvault.config import (
    FetchConfig,
    ReceiverConfig,
    Settings,
    TaskConfig,
    load_config,
    starter_config,
)
from studyvault.storage import StorageConfig


def test_first_run_creates_the_default_config_and_works(run, tmp_path, monkeypatch):
    monkeypatch.delenv("STUDYVAULT_CONFIG", raising=False)
    monkeypatch.setenv("STUDYVAULT_HOME", str(tmp_path / "home"))
    result = run("image-dirs", "list", "--json")
    assert result.code == 0, result.err
    assert (tmp_path / "home" / "studyvault.toml").exists()
    assert (tmp_path / "home" / "images" / "image_directory.key").exists()
    [row] = result.json()
    assert row["name"] == "Image Center Storage" and row["incoming"] is True


def test_init_writes_every_setting_with_a_comment(run, tmp_path):
    assert run("init", tmp_path / "v").code == 0
    text = (tmp_path / "v" / "studyvault.toml").read_text()
    data = tomllib.loads(text)
    for table, struct in (
        ("studyvault", Settings),
        ("receiver", ReceiverConfig),
        ("fetch", FetchConfig),
    ):
        for field in msgspec.structs.fields(struct):
            assert field.encode_name in data[table], f"{table}.{field.encode_name} missing"
            if (table, field.encode_name) == ("studyvault", "incoming"):
                continue  # the starter names its own image directory
            default = (
                field.default if field.default is not msgspec.NODEFAULT else field.default_factory()
            )
            assert data[table][field.encode_name] == default, field.encode_name
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if "=" in line and not line.startswith("#") and not line.startswith("["):
            assert lines[i - 1].startswith("#"), f"no comment above: {line}"
    # the commented examples name every task and archive field
    for field in msgspec.structs.fields(TaskConfig):
        assert f"# {field.encode_name} = " in text, field.encode_name
    for field in msgspec.structs.fields(StorageConfig):
        assert f"{field.encode_name} = " in text
    assert run("init", tmp_path / "v").code == 2  # never overwrites


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda t: t.replace("port = 11112", 'port = "eleven"'),
            "receiver.port: Expected `int`, got `str`",
        ),
        (
            lambda t: t.replace("keep_days = 14", "keep_days = 14\nkeep_dayz = 3"),
            "fetch: Object contains unknown field `keep_dayz`",
        ),
        (
            lambda t: t.replace('path = "images"', 'path = "images"\nkind = "floppy"'),
            "image_directories[0].kind: unknown storage kind 'floppy'",
        ),
        (
            lambda t: t.replace('incoming = "Image Center Storage"', 'incoming = "Nope"'),
            "studyvault.incoming: 'Nope' is not an image directory",
        ),
        (
            lambda t: t + "\n[[tasks]]\nname = 'x'\n",
            "tasks[0]: Object missing required field `action`",
        ),
        (lambda t: t.replace("[fetch]", "[fetch"), "not valid TOML"),
    ],
)
def test_bad_config_is_one_line_naming_file_and_field(run, tmp_path, edit, message):
    run("init", tmp_path / "v")
    path = tmp_path / "v" / "studyvault.toml"
    path.write_text(edit(path.read_text()))
    result = run("--config", path, "studies")
    assert result.code == 2
    assert result.err.startswith(f"studyvault: error: {path}: ")
    assert message in result.err
    assert len(result.err.strip().splitlines()) == 1


def test_missing_config_named_explicitly_is_an_error_not_created(run, tmp_path):
    result = run("--config", tmp_path / "none.toml", "studies")
    assert result.code == 2
    assert "config file not found" in result.err
    assert not (tmp_path / "none.toml").exists()


def test_setup_commands_keep_the_admins_comments_and_order(home, run, tmp_path):
    path = home / "studyvault.toml"
    text = path.read_text().replace("keep_days = 14", "keep_days = 30  # radiologist asked")
    path.write_text("# my own header comment\n" + text)
    assert run("image-dirs", "add", "Disk 2", tmp_path / "d2").code == 0
    assert run("image-dirs", "incoming", "Disk 2").code == 0
    new = path.read_text()
    assert new.startswith("# my own header comment\n")
    assert "keep_days = 30  # radiologist asked" in new
    assert new.index("[receiver]") < new.index("[fetch]") < new.index('name = "Disk 2"')
    config = load_config(path)
    assert config.studyvault.incoming == "Disk 2"
    assert [d.name for d in config.image_directories] == ["Image Center Storage", "Disk 2"]
    assert not list(Path(home).glob(".studyvault.toml.*"))  # no temp files left


def test_starter_config_is_valid():
    config = load_config_text(starter_config())
    assert config.image_directories[0].min_free_mb == 1024


def load_config_text(text: str):
    from studyvault.config import parse_config

    return parse_config(text, Path("/tmp/studyvault.toml"))
