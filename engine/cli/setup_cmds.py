"""``init`` and ``plugins``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..config import CONFIG_NAME, default_home, write_starter
from ..manager import load_plugins
from .common import JsonOption, console, print_json, print_table


def register(app: typer.Typer) -> None:
    app.command("init")(init)
    app.command("plugins")(plugins)


def init(
    folder: Annotated[
        Path | None,
        typer.Argument(help="Folder for the config and data (default: the studyvault home)."),
    ] = None,
) -> None:
    """Write a starter config (every setting, with comments) and an image directory."""
    folder = folder or default_home()
    path = write_starter(folder)
    from ..vault import Vault

    with Vault.open(path):
        pass
    console.print(f"Created {path} and the image directory {folder / 'images'}.")
    if folder != default_home():
        console.print(f"Use it with: export STUDYVAULT_CONFIG={path.resolve()}")
    else:
        console.print(f"This is the default config; edit {CONFIG_NAME} to change settings.")


def plugins(json: Annotated[bool, JsonOption] = False) -> None:
    """List the loaded plugins, their distributions and what they provide."""
    infos = load_plugins().describe()
    if json:
        print_json(infos)
        return
    print_table(
        ["Plugin", "Distribution", "Storage kinds", "Actions", "Hooks"],
        [
            (
                i.name,
                f"{i.distribution} {i.version}".strip(),
                ", ".join(i.storage_kinds),
                ", ".join(i.actions),
                ", ".join(h.removeprefix("studyvault_") for h in i.hooks),
            )
            for i in infos
        ],
    )
