"""``image-dirs``: manage the image directories (online storage)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import JsonOption, console, human_bytes, print_json, print_table, state

image_dirs = typer.Typer(help="Manage image directories (online storage).", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(image_dirs, name="image-dirs")


@image_dirs.command("list")
def list_cmd(ctx: typer.Context, json: Annotated[bool, JsonOption] = False) -> None:
    """Name, studies and free space of each image directory."""
    from ..admin import image_directory_rows

    rows = image_directory_rows(state(ctx).vault())
    if json:
        print_json(rows)
        return
    print_table(
        ["Name", "Incoming", "Path", "Status", "Studies", "Size", "Free Space"],
        [
            (
                r.name,
                "yes" if r.incoming else "",
                r.path,
                r.status,
                r.studies,
                human_bytes(r.bytes),
                human_bytes(r.free_bytes) if r.status == "Online" else "-",
            )
            for r in rows
        ],
    )


@image_dirs.command("add")
def add_cmd(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Name shown in lists.")],
    path: Annotated[
        Path, typer.Argument(help="An empty or new folder (or a moved image directory).")
    ],
    min_free_mb: Annotated[int, typer.Option(help="Free-space reserve in MB.")] = 1024,
    json: Annotated[bool, JsonOption] = False,
) -> None:
    """Add an image directory."""
    from ..admin import add_image_directory

    row = add_image_directory(state(ctx).vault(), name, path, min_free_mb=min_free_mb)
    if json:
        print_json(row)
    else:
        console.print(f"Added image directory {name} at {row.path}.", markup=False)


@image_dirs.command("remove")
def remove_cmd(ctx: typer.Context, name: Annotated[str, typer.Argument()]) -> None:
    """Remove an image directory from the config (only when it holds no studies).
    Its folder is left on disk."""
    from ..admin import remove_image_directory

    remove_image_directory(state(ctx).vault(), name)
    console.print(f"Removed image directory {name}; its folder was left on disk.", markup=False)


@image_dirs.command("incoming")
def incoming_cmd(ctx: typer.Context, name: Annotated[str, typer.Argument()]) -> None:
    """Make NAME the image directory that receives new studies."""
    from ..admin import set_incoming

    set_incoming(state(ctx).vault(), name)
    console.print(f"New studies now go to {name}.", markup=False)
