"""Key files: the small TOML file at a storage's root that says what it is."""

from __future__ import annotations

import datetime as dt
import tomllib
import uuid
from pathlib import Path
from typing import Any

import tomlkit

from .errors import StorageError
from .fsutil import atomic_write_bytes

FORMAT_VERSION = 1


def read_key(path: Path) -> dict[str, Any]:
    """Read a key file; a missing or unreadable one raises StorageError naming it."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StorageError(f"{path}: key file not found") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise StorageError(f"{path}: unreadable key file: {exc}") from None
    if not isinstance(data.get("id"), str) or not data["id"]:
        raise StorageError(f"{path}: key file has no id")
    return data


def write_key(path: Path, fields: dict[str, Any], *, new_id: str | None = None) -> str:
    """Write a key file with a new (or given) id and return the id."""
    storage_id = new_id or str(uuid.uuid4())
    doc = tomlkit.document()
    doc.add(tomlkit.comment("studyvault storage key: identifies this folder. Do not edit."))
    doc.add("id", storage_id)
    for key, value in fields.items():
        doc.add(key, value)
    doc.add("created", dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat())
    doc.add("format_version", FORMAT_VERSION)
    atomic_write_bytes(path, tomlkit.dumps(doc).encode("utf-8"))
    return storage_id


def folder_is_empty(path: Path) -> bool:
    return not path.exists() or (path.is_dir() and not any(path.iterdir()))
