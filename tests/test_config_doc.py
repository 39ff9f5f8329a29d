"""docs/config.md is generated from the config Structs and the starter's comments."""

from __future__ import annotations

from pathlib import Path

import msgspec

from studyvault.config import (
    AlertsConfig,
    EmailChannel,
    FetchConfig,
    MetricsConfig,
    ReceiverConfig,
    Settings,
    TaskConfig,
    WebhookChannel,
)
from studyvault.configdoc import field_rows, render_config_reference, starter_comments
from studyvault.manager import load_plugins
from studyvault.storage import Role

DOC = Path(__file__).resolve().parent.parent / "docs" / "config.md"
REGENERATE = "regenerate it with: python -m studyvault.configdoc > docs/config.md"


def test_config_reference_is_up_to_date():
    assert DOC.read_text(encoding="utf-8") == render_config_reference(), (
        f"docs/config.md is out of date; {REGENERATE}"
    )


def _tables() -> list[tuple[str, type[msgspec.Struct]]]:
    tables: list[tuple[str, type[msgspec.Struct]]] = [
        ("studyvault", Settings),
        ("receiver", ReceiverConfig),
        ("fetch", FetchConfig),
        ("tasks", TaskConfig),
        ("alerts", AlertsConfig),
        ("alerts.email", EmailChannel),
        ("alerts.webhook", WebhookChannel),
        ("metrics", MetricsConfig),
    ]
    kinds = load_plugins().storage_kinds
    for name in kinds.names():
        kind = kinds.get(name)
        if kind.__module__.startswith("studyvault."):
            table = "archives" if kind.role is Role.ARCHIVE else "image_directories"
            tables.append((table, kind.config_type))
    return tables


def test_every_config_field_has_a_description():
    comments, _ = starter_comments()
    reference = render_config_reference()
    tables = _tables()
    assert {table for table, _ in tables} >= {"image_directories", "archives"}
    for table, struct in tables:
        rows = field_rows(struct, table, comments)
        assert sorted(r.key for r in rows) == sorted(
            f.encode_name for f in msgspec.structs.fields(struct)
        )
        for row in rows:
            assert row.description, (
                f"{table}.{row.key} has no description: add a comment above it (or, on a "
                f"commented-out example, after it) in engine/starter.toml; then {REGENERATE}"
            )
            assert f"| `{row.key}` | {row.type} |" in reference


def test_descriptions_come_from_the_starter_comments():
    text = """\
# The fetch table.
[fetch]
# Days a fetched study stays online.
# Second line.
keep_days = 14

# Storage tasks.
# [[tasks]]
# name = "Nightly"
# action = "archive"           # what to do, or
# hours = "22:00-04:00"        # window # with a hash
"""
    keys, intros = starter_comments(text)
    assert keys[("fetch", "keep_days")] == "Days a fetched study stays online. Second line."
    assert keys[("tasks", "action")] == "What to do."
    assert keys[("tasks", "hours")] == "Window # with a hash."
    assert keys[("tasks", "name")] == ""
    assert intros == {"fetch": "The fetch table.", "tasks": "Storage tasks."}
