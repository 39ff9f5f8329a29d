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


@image_dirs.command("mount")
def mount_cmd(
    ctx: typer.Context,
    path: Annotated[
        Path,
        typer.Argument(help="The image directory's folder at its new place (with its key file)."),
    ],
    name: Annotated[
        str | None,
        typer.Option(
            help="Name for an image directory the config does not know yet; or the "
            "Offline image directory an empty PATH replaces (its disk died)."
        ),
    ] = None,
    json: Annotated[bool, JsonOption] = False,
) -> None:
    """Mount an image directory by the id in its key file: a configured one that was
    copied to another disk is pointed there (its old folder must be gone: unmounted,
    renamed or removed); an unknown one is added and its studies are indexed."""
    from ..admin import mount_image_directory

    result = mount_image_directory(state(ctx).vault(), path, name=name)
    if json:
        print_json(result)
        return
    row = result.image_directory
    if result.outcome == "added":
        text = (
            f"Added image directory {row.name} at {row.path} ({row.status}): indexed "
            f"{result.studies_indexed} studies"
            + (f", {len(result.skipped)} files skipped" if result.skipped else "")
            + "."
        )
    elif result.outcome == "replaced":
        text = (
            f"Image directory {row.name} is now the empty folder {row.path} ({row.status}); "
            f"it was at {result.previous_path}. The index still lists "
            f"{result.studies_listed} studies in it: restore them from a backup, or forget "
            f'the lost ones with `studyvault study forget --storage "{row.name}"`.'
        )
    elif result.outcome == "unchanged":
        text = f"Image directory {row.name} already is at {row.path} ({row.status})."
    else:
        text = (
            f"Mounted image directory {row.name} at {row.path} ({row.status}); "
            f"it was at {result.previous_path}."
        )
    console.print(text, markup=False)


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
