"""The config reference (docs/config.md), generated so that it cannot drift.

Names, types and defaults come from the msgspec Structs that read the config; the
one-line descriptions come from the comments of the starter config
(``engine/starter.toml``), which is what an admin sees on ``studyvault init``. A key's
description is the comment block right above it or, on a commented-out example line
(the ``[[archives]]`` and ``[[tasks]]`` examples), its trailing comment.

Regenerate the reference after changing a config Struct or the starter's comments::

    python -m studyvault.configdoc > docs/config.md
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from importlib.resources import files
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import msgspec

from .config import (
    AlertsConfig,
    EmailChannel,
    FetchConfig,
    MetricsConfig,
    ReceiverConfig,
    Settings,
    TaskConfig,
    WebhookChannel,
)
from .storage import Role, Storage

__all__ = ["field_rows", "render_config_reference", "starter_comments"]

#: Descriptions for the few example keys the starter shows without a comment (they
#: read for themselves there). A comment added in starter.toml takes precedence.
UNCOMMENTED: dict[tuple[str, str], str] = {
    ("archives", "name"): "Name shown in lists and used on the command line.",
    ("archives", "path"): "Folder of the archive (a local disk or a mounted network share).",
    ("tasks", "name"): "Name shown in lists and used on the command line.",
    ("tasks", "from"): "Storage whose studies the task works on (by name).",
    ("tasks", "to"): "Destination storage (by name), for archive and move.",
    ("alerts", "email"): "Email channels: the `[[alerts.email]]` entries.",
    ("alerts", "webhook"): "Webhook channels: the `[[alerts.webhook]]` entries.",
}

_TABLE = re.compile(r"^\[\[?\s*([A-Za-z0-9_.-]+)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"^([A-Za-z0-9_-]+)\s*=\s*(.*)$")


class Row(msgspec.Struct, frozen=True):
    """One key of the reference."""

    key: str
    type: str
    default: str
    description: str


def starter_comments(text: str | None = None) -> tuple[dict[tuple[str, str], str], dict[str, str]]:
    """Read the descriptions out of the starter config.

    :param text: the starter's text (default: the packaged ``starter.toml``).
    :returns: ``{(table, key): description}`` and ``{table: intro}``, where a table's
        intro is the comment block right above its header. Tables and keys of
        commented-out examples (``# [[archives]]``, ``# name = ...``) count as well.
    """
    if text is None:
        text = files("studyvault").joinpath("starter.toml").read_text(encoding="utf-8")
    keys: dict[tuple[str, str], str] = {}
    intros: dict[str, str] = {}
    table = ""
    block: list[str] = []  # prose comment lines since the last blank line or key
    for raw in text.splitlines():
        line = raw.strip()
        commented = line.startswith("#")
        body = line.lstrip("#").strip() if commented else line
        if not line:
            block = []
            continue
        if match := _TABLE.match(body):
            table = match.group(1)
            if block:
                intros.setdefault(table, " ".join(block))
            block = []
            continue
        if (match := _KEY.match(body)) and table:
            value, trailing = _split_comment(match.group(2))
            if not commented or _is_toml_value(value):
                above = " ".join(block)
                keys.setdefault((table, match.group(1)), _tidy(trailing or above))
                block = []
                continue
        if commented:
            block.append(body)
    return keys, intros


def _split_comment(rest: str) -> tuple[str, str]:
    """Split ``value  # comment`` at the first ``#`` outside a string."""
    quote = ""
    for i, char in enumerate(rest):
        if quote:
            if char == quote:
                quote = ""
        elif char in "\"'":
            quote = char
        elif char == "#":
            return rest[:i].strip(), rest[i + 1 :].strip()
    return rest.strip(), ""


def _is_toml_value(value: str) -> bool:
    """Whether ``value`` parses as a TOML value (tells an example key from prose)."""
    import tomllib

    try:
        tomllib.loads(f"x = {value}")
    except tomllib.TOMLDecodeError:
        return False
    return True


def _tidy(text: str) -> str:
    """One sentence for a table cell: capitalised, with a full stop. An example's
    alternatives end in ", or" ("limit: ..., or"); a table row needs no such link."""
    text = re.sub(r",\s*or$", "", text.strip()).strip()
    if not text:
        return ""
    text = text[0].upper() + text[1:]
    return text if text[-1] in ".!?" else text + "."


# -- rendering -------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    """The TOML type of a field's annotation."""
    if tp is str:
        return "string"
    if tp is bool:
        return "boolean"
    if tp is int:
        return "integer"
    if tp is float:
        return "float"
    origin, args = get_origin(tp), get_args(tp)
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return "table"
    if origin is Annotated:
        return _type_name(args[0])
    if origin is Literal:
        return "one of " + ", ".join(f'`"{a}"`' for a in args)
    if origin in (list, tuple, set, frozenset):
        return f"array of {_type_name(args[0])}s" if args else "array"
    if origin is dict:
        return "table"
    if origin is Union or type(tp).__name__ == "UnionType":
        others = [a for a in args if a is not type(None)]
        name = " or ".join(_type_name(a) for a in others)
        return f"{name} (optional)" if len(others) < len(args) else name
    return getattr(tp, "__name__", str(tp))


def _default(field: msgspec.structs.FieldInfo) -> str:
    if field.required:
        return "required"
    value = field.default if field.default is not msgspec.NODEFAULT else field.default_factory()
    if value is None:
        return "not set"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, list | tuple):
        return "`[]`" if not value else "`[" + ", ".join(map(repr, value)) + "]`"
    return f"`{value}`"


def field_rows(
    struct: type[msgspec.Struct], table: str, comments: dict[tuple[str, str], str]
) -> list[Row]:
    """The reference rows of one Struct, in the starter's order (keys the starter does
    not show follow, in field order).

    :param table: the TOML table the Struct reads (``tasks``, ``archives`` …).
    :param comments: descriptions by (table, key), from :func:`starter_comments`, in the
        starter's order.
    """
    rows = []
    for field in msgspec.structs.fields(struct):
        key = field.encode_name
        description = comments.get((table, key)) or UNCOMMENTED.get((table, key), "")
        rows.append(Row(key, _type_name(field.type), _default(field), description))
    return sorted(rows, key=_starter_order(table, comments))


def _starter_order(table: str, comments: dict[tuple[str, str], str]) -> Any:
    position = {key: i for i, (t, key) in enumerate(comments) if t == table}
    return lambda row: position.get(row.key, len(comments))


def _kinds(role: Role) -> Iterator[type[Storage]]:
    """The built-in storage kinds of ``role`` (third-party ones document themselves)."""
    from .manager import load_plugins

    kinds = load_plugins().storage_kinds
    for name in kinds.names():
        kind = kinds.get(name)
        if kind.role is role and kind.__module__.startswith("studyvault."):
            yield kind


def _sections(
    comments: dict[tuple[str, str], str],
) -> Iterator[tuple[str, str, list[Row]]]:
    """(heading, table, rows) of every section, in the starter's order."""
    for title, table, struct in (
        ("[studyvault]", "studyvault", Settings),
        ("[receiver]", "receiver", ReceiverConfig),
        ("[fetch]", "fetch", FetchConfig),
        ("[alerts]", "alerts", AlertsConfig),
        ("[[alerts.email]]", "alerts.email", EmailChannel),
        ("[[alerts.webhook]]", "alerts.webhook", WebhookChannel),
        ("[metrics]", "metrics", MetricsConfig),
    ):
        yield f"`{title}`", table, field_rows(struct, table, comments)
    for table, role in (("image_directories", Role.IMAGE_DIRECTORY), ("archives", Role.ARCHIVE)):
        for kind in _kinds(role):
            kind_comment = comments.get((table, "kind")) or next(
                (text for (_, key), text in comments.items() if key == "kind"), ""
            )
            kind_row = Row("kind", "string", f'`"{kind.kind}"`', kind_comment)
            rows = field_rows(kind.config_type, table, comments)
            if (table, "kind") in comments:
                rows = sorted([kind_row, *rows], key=_starter_order(table, comments))
            else:  # right after the name
                rows = rows[:1] + [kind_row] + rows[1:]
            yield f"`[[{table}]]`, kind `{kind.kind}`", table, rows
    yield "`[[tasks]]`", "tasks", field_rows(TaskConfig, "tasks", comments)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_config_reference() -> str:
    """The Markdown config reference (docs/config.md)."""
    comments, intros = starter_comments()
    out = [
        "# Config reference",
        "",
        "<!-- Generated by `python -m studyvault.configdoc > docs/config.md` from the",
        "     config Structs and the comments of engine/starter.toml. Do not edit. -->",
        "",
        "studyvault reads one TOML file: `--config FILE`, else `$STUDYVAULT_CONFIG`, else",
        "`studyvault.toml` in `$STUDYVAULT_HOME` (default `~/.local/share/studyvault`).",
        "`studyvault init [DIR]` writes a starter config that shows every setting below",
        "with its default. Relative paths are relative to the config file's folder. An",
        "unknown key or a value of the wrong type is an error naming the file and the key.",
    ]
    seen: set[str] = set()
    for heading, table, rows in _sections(comments):
        out += ["", f"## {heading}", ""]
        if table in intros and table not in seen:
            out += [intros[table], ""]
        seen.add(table)
        out += ["| Key | Type | Default | Description |", "|---|---|---|---|"]
        for row in rows:
            out.append(
                f"| `{row.key}` | {row.type} | {_cell(row.default)} | {_cell(row.description)} |"
            )
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render_config_reference())
