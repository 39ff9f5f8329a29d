"""``archives``: manage the archives (nearline storage): add, list, unmount, mount, remove."""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Annotated

import typer

from ..errors import StudyvaultError
from .common import JsonOption, confirm, console, human_bytes, print_json, print_table, state

if TYPE_CHECKING:
    from ..admin import StorageRow

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
    from ..admin import archive_rows  # loaded by the commands that need it

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
                _when(r.last_stored) if r.status == "Online" else "-",
            )
            for r in rows
        ],
    )


def _parse_options(pairs: list[str]) -> dict[str, str]:
    options: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise StudyvaultError(f"--option {pair!r}: expected KEY=VALUE")
        options[key] = value
    return options


#: ``--option KEY=VALUE``: any setting of the kind's config entry (repeatable)
OptionOption = typer.Option(
    "--option",
    "-o",
    metavar="KEY=VALUE",
    help="A setting of the archive kind's config entry (repeatable), e.g. workers=8.",
)


def _s3_options(
    options: list[str],
    bucket: str | None,
    prefix: str | None,
    endpoint_url: str | None,
    region: str | None,
    profile: str | None,
    sse: str | None,
    verify: str | None,
) -> dict[str, str]:
    """``--option`` pairs plus the convenience flags (shorthands for ``--option``)."""
    values = _parse_options(options)
    flags = {
        "bucket": bucket,
        "prefix": prefix,
        "endpoint_url": endpoint_url,
        "region": region,
        "profile": profile,
        "sse": sse,
        "verify": verify,
    }
    values.update({k: v for k, v in flags.items() if v is not None})
    return values


Bucket = Annotated[str | None, typer.Option(help="S3: an existing bucket.")]
Prefix = Annotated[str | None, typer.Option(help="S3: this archive's key prefix in the bucket.")]
EndpointUrl = Annotated[
    str | None, typer.Option(help="S3: the store's URL (MinIO, Ceph RGW); none for AWS.")
]
Region = Annotated[str | None, typer.Option(help="S3: region; none for the profile's default.")]
Profile = Annotated[
    str | None, typer.Option(help="S3: AWS shared-config profile holding the credentials.")
]
Sse = Annotated[str | None, typer.Option(help="S3: server-side encryption, AES256 or aws:kms.")]
Verify = Annotated[
    str | None,
    typer.Option(help="S3: checksum (trust the store's check of each upload) or readback."),
]


@archives.command("add")
def add_cmd(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Name shown in lists and used by tasks.")],
    where: Annotated[
        str | None,
        typer.Argument(
            metavar="[PATH|URL]",
            help="An empty or new folder (folder archives), or s3://BUCKET/PREFIX.",
        ),
    ] = None,
    kind: Annotated[
        str | None,
        typer.Option(
            help="Archive kind: folder, s3 or a plugin's "
            "(default: the URL's; s3 with --bucket; else folder)."
        ),
    ] = None,
    option: Annotated[list[str] | None, OptionOption] = None,
    naming: Annotated[
        str | None,
        typer.Option(
            help="readable: studies/YYYY/YYYYMMDD NAME id/; uid: studies/StudyInstanceUID/."
        ),
    ] = None,
    zip: Annotated[
        bool, typer.Option("--zip", help="Store each study as one uncompressed .zip.")
    ] = False,
    min_free_mb: Annotated[
        int, typer.Option(help="Refuse a study that would leave less free space (MB).")
    ] = 1024,
    bucket: Bucket = None,
    prefix: Prefix = None,
    endpoint_url: EndpointUrl = None,
    region: Region = None,
    profile: Profile = None,
    sse: Sse = None,
    verify: Verify = None,
    json: Annotated[bool, JsonOption] = False,
) -> None:
    """Create an archive: a folder archive in an empty or new folder, or (--kind s3) an
    S3 archive in an empty prefix of an existing bucket. Credentials never go into the
    config: S3 takes them from the environment or an AWS profile."""
    options = _s3_options(option or [], bucket, prefix, endpoint_url, region, profile, sse, verify)
    text = where or ""
    if kind is None:
        kind = text.split("://", 1)[0].lower() if "://" in text else ("s3" if bucket else "folder")
    from ..admin import add_archive

    row = add_archive(
        state(ctx).vault(),
        name,
        text,
        kind=kind,
        options=options,
        naming=naming,
        zip=zip,
        min_free_mb=min_free_mb,
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
    studies stay listed as archived. Its folder (or bucket prefix) may then be moved."""
    vault = state(ctx).vault()
    from ..admin import archive_named, unmount_archive

    archive_named(vault, name)  # an unknown name is refused before asking
    confirm("UNMOUNT", confirm_word, f"unmount archive {name}")
    row = unmount_archive(vault, name)
    console.print(
        f"Unmounted {name}. Mount it again with `studyvault archives mount {row.path}`"
        + ("" if "://" in row.path else f" (it was at {row.path})")
        + ".",
        markup=False,
    )


@archives.command("mount")
def mount_cmd(
    ctx: typer.Context,
    where: Annotated[
        str,
        typer.Argument(
            metavar="PATH|URL",
            help="The archive's folder (holding folder_archive.key) or s3://BUCKET/PREFIX.",
        ),
    ],
    option: Annotated[list[str] | None, OptionOption] = None,
    endpoint_url: EndpointUrl = None,
    region: Region = None,
    profile: Profile = None,
    sse: Sse = None,
    verify: Verify = None,
    json: Annotated[bool, JsonOption] = False,
) -> None:
    """Mount an archive: a known one (moved or unmounted) comes back Online there; an
    unknown one is added and its studies are indexed. An S3 archive is named by its URL;
    settings not given are kept from its config entry, if it has one."""
    options = _s3_options(option or [], None, None, endpoint_url, region, profile, sse, verify)
    from ..admin import mount_archive

    result = mount_archive(state(ctx).vault(), where, options=options)
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
    from ..admin import remove_archive

    remove_archive(state(ctx).vault(), name)
    console.print(f"Removed archive {name}; its folder was left on disk.", markup=False)
