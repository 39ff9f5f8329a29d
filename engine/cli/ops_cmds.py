"""``alerts test`` and ``alerts list``: the alert channels and what they would report."""

from __future__ import annotations

import sys
import time
from typing import Annotated

import msgspec
import typer

from ..errors import ConfigError
from .common import JsonOption, console, print_json, print_table, state

alerts_app = typer.Typer(help="Alerts by email and webhook.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(alerts_app, name="alerts")


@alerts_app.command("test")
def alerts_test(ctx: typer.Context, json: Annotated[bool, JsonOption] = False) -> None:
    """Send a test message through every alert channel and report each result.

    Exits 1 when a channel failed."""
    from ..alerts import send_test

    vault = state(ctx).vault()
    config = vault.config
    if not config.alerts.email and not config.alerts.webhook:
        raise ConfigError(
            f"{config.path}: alerts: no channel is configured; add an [[alerts.email]] or "
            "[[alerts.webhook]] entry (see docs/operations.md)"
        )
    results = send_test(config)
    if json:
        print_json(results)
    else:
        for r in results:
            outcome = "sent" if r.ok else f"FAILED: {r.error}"
            console.print(f"{r.channel}: {r.target}: {outcome}", markup=False, highlight=False)
    if not all(r.ok for r in results):
        sys.exit(1)


class _Row(msgspec.Struct, kw_only=True):
    key: str
    severity: str
    title: str
    details: list[str]
    action: str


@alerts_app.command("list")
def alerts_list(ctx: typer.Context, json: Annotated[bool, JsonOption] = False) -> None:
    """The problems an alert would report now (free space, offline storages, tasks,
    verify findings), whether or not a channel is configured."""
    from ..watch import AlertWatcher

    vault = state(ctx).vault()
    found, _ = AlertWatcher(vault).conditions(now=time.time())
    rows = [
        _Row(key=c.key, severity=c.severity, title=c.title, details=c.details, action=c.action)
        for c in found
    ]
    if json:
        print_json(rows)
        return
    if not rows:
        console.print("No problems.", markup=False)
        return
    print_table(["Severity", "Problem"], [(r.severity, r.title) for r in rows])
