"""``archives``: manage the archives (nearline storage): add, list, unmount, mount, remove."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated

import typer

from ..admin import (
    StorageRow,
    add_archive,
    archive_named,
    archive_rows,
    mount_archive,
    remove_archive,
    unmount_archive,
)
from .common import JsonOption, confirm, console, human_bytes, print_json, print_table, state

archives = typer.Typer(help="Manage archives (nearline storage).", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(archives, name="archives")


def _when(value: str) -> str:
    if value == "never":
        return value
    return dt.datetime.fromisoformat(value).strftime("%Y-%m-%d %H:%M")


def _type(row: StorageRow) -> str:
    return row.kind.replace("_", " ").capitalize()


@archives.command("list")
def list_cmd(ctx: typer.Context, json: Annotated[bool, JsonOption] = False) -> None:
    """Name, type, description, status, studies, free space and last store of each archive."""
    rows = archive_rows(state(ctx).vault())
    if json:
        print_json(rows)
        return
    print_table(
        ["Name", "Type", "Description", "Status", "Studies", "Free Space", "Last Stored"],
        [
            (
                r.name,
                _type(r),
                r.description,
                r.status,
                r.studies,
                human_bytes(r.free_bytes) if r.status == "Online" else "-",
                _when(r.last_stored),
            )
            for r in rows
        ],
    )


@archives.command("add")
def add_cmd(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Name shown in lists and used by tasks.")],
    path: Annotated[Path, typer.Argument(help="An empty or new folder (local or a share).")],
    naming: Annotated[
        str,
        typer.Option(
            help="readable: studies/YYYY/YYYYMMDD NAME id/; uid: studies/StudyInstanceUID/."
        ),
    ] = "readable",
    zip: Annotated[
        bool, typer.Option("--zip", help="Store each study as one uncompressed .zip.")
    ] = False,
    min_free_mb: Annotated[
        int, typer.Option(help="Refuse a study that would leave less free space (MB).")
    ] = 1024,
    json: Annotated[bool, JsonOption] = False,
) -> None:
    """Create a folder archive in an empty or new folder."""
    row = add_archive(
        state(ctx).vault(), name, path, naming=naming, zip=zip, min_free_mb=min_free_mb
    )
    if json:
        print_json(row)
    else:
        console.print(f"Added archive {name}: {row.description}.", markup=False)


@archives.command("unmount")
def unmount_cmd(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument()],
    confirm_word: Annotated[
        str | None, typer.Option("--confirm", help="Type UNMOUNT to confirm (for scripts).")
    ] = None,
) -> None:
    """Unmount an archive: nothing is stored or fetched until it is mounted again; its
    studies stay listed as archived. Its folder may then be moved."""
    vault = state(ctx).vault()
    archive_named(vault, name)  # an unknown name is refused before asking
    confirm("UNMOUNT", confirm_word, f"unmount archive {name}")
    row = unmount_archive(vault, name)
    console.print(
        f"Unmounted {name}. Mount it again with `studyvault archives mount PATH` "
        f"(it was at {row.path}).",
        markup=False,
    )


@archives.command("mount")
def mount_cmd(
    ctx: typer.Context,
    path: Annotated[
        Path, typer.Argument(help="The archive's folder (holding folder_archive.key).")
    ],
    json: Annotated[bool, JsonOption] = False,
) -> None:
    """Mount a folder archive at PATH: a known one (moved or unmounted) comes back Online
    there; an unknown one is added and its studies are indexed."""
    result = mount_archive(state(ctx).vault(), path)
    if json:
        print_json(result)
        return
    row = result.archive
    if result.registered:
        console.print(
            f"Added archive {row.name} at {row.path} ({row.status}): indexed "
            f"{result.studies_indexed} studies"
            + (f", {result.moved_out} moved out of studyvault left out" if result.moved_out else "")
            + (f", {len(result.skipped)} files skipped" if result.skipped else "")
            + ".",
            markup=False,
        )
    else:
        console.print(f"Mounted archive {row.name} at {row.path} ({row.status}).", markup=False)


@archives.command("remove")
def remove_cmd(ctx: typer.Context, name: Annotated[str, typer.Argument()]) -> None:
    """Remove an archive from the config (only when it holds no studies). Its folder is
    left on disk."""
    remove_archive(state(ctx).vault(), name)
    console.print(f"Removed archive {name}; its folder was left on disk.", markup=False)
