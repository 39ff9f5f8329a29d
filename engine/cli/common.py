"""Shared pieces of the command line: state, output, tables, progress."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from ..vault import Vault

console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)

JsonOption = typer.Option("--json", help="Print JSON for scripts.")


@dataclass
class State:
    """What the root callback hands to every command."""

    config_path: Path | None = None
    debug: bool = False
    _vault: Vault | None = field(default=None, repr=False)

    def vault(self) -> Vault:
        if self._vault is None:
            self._vault = Vault.open(self.config_path)
        return self._vault

    def close(self) -> None:
        if self._vault is not None:
            self._vault.close()
            self._vault = None


def state(ctx: typer.Context) -> State:
    obj = ctx.find_root().obj
    assert isinstance(obj, State)
    return obj


def print_json(value: Any) -> None:
    sys.stdout.write(msgspec.json.format(msgspec.json.encode(value), indent=2).decode() + "\n")


def print_table(
    columns: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None
) -> None:
    table = Table(title=title, show_lines=False, header_style="bold")
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row))
    console.print(table)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def confirm(word: str, given: str | None, what: str) -> None:
    """Ask the user to type ``word`` (or take ``--confirm WORD``)."""
    from ..errors import ConfirmationRequired

    if given is not None:
        if given != word:
            raise ConfirmationRequired(f"--confirm: type exactly {word} to {what}")
        return
    if not sys.stdin.isatty():
        raise ConfirmationRequired(f"{what}: not confirmed; pass --confirm {word}")
    answer = typer.prompt(f"Type {word} to {what}")
    if answer.strip() != word:
        raise ConfirmationRequired(f"{what}: not confirmed (you typed {answer.strip()!r})")


@contextmanager
def progress_reporter(label: str, unit: str = "files") -> Iterator[Callable[..., None]]:
    """A progress bar on a terminal; otherwise a plain line on stderr every few seconds."""
    if err_console.is_terminal:
        with Progress(
            TextColumn(label),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(unit),
            TimeRemainingColumn(),
            console=err_console,
            transient=True,
        ) as bar:
            task = bar.add_task(label, total=None)

            def update(done: int, total: int, *_: Any) -> None:
                bar.update(task, completed=done, total=total)

            yield update
        return
    last = [0.0]

    def plain(done: int, total: int, *_: Any) -> None:
        now = time.monotonic()
        if now - last[0] >= 5 or done == total:
            last[0] = now
            pct = f" ({100 * done // total}%)" if total else ""
            print(f"{label}: {done}/{total} {unit}{pct}", file=sys.stderr, flush=True)

    yield plain
