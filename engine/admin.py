"""Changing the set-up: adding, removing, mounting storages (config edits + key files)."""

from __future__ import annotations

import datetime as dt
import uuid
from pathlib import Path

import msgspec

from .config import append_table, edit_config, remove_table, set_key, update_table
from .errors import StudyvaultError
from .keyfile import read_key
from .storage import Role, Status, Storage
from .vault import Vault


class StorageRow(msgspec.Struct, kw_only=True):
    """One line of ``image-dirs list`` / ``archives list``."""

    name: str
    id: str
    kind: str
    path: str
    status: str
    studies: int
    bytes: int
    free_bytes: int
    incoming: bool = False
    description: str = ""
    last_stored: str = "never"


def image_directory_rows(vault: Vault) -> list[StorageRow]:
    rows = []
    for storage in vault.image_directories():
        studies, size = vault.index.count_storage(storage.id)
        rows.append(
            StorageRow(
                name=storage.name,
                id=storage.id,
                kind=storage.kind,
                path=str(storage.root),
                status=storage.status().value,
                studies=studies,
                bytes=size,
                free_bytes=storage.free_bytes(),
                incoming=storage.name == vault.config.studyvault.incoming,
                description=storage.describe(),
            )
        )
    return rows


def _check_new_name(vault: Vault, name: str) -> None:
    if not name.strip():
        raise StudyvaultError("NAME: must not be empty")
    if name in vault.storages:
        raise StudyvaultError(f"NAME: {name!r} is already the name of a storage")


def add_image_directory(
    vault: Vault, name: str, path: Path, *, min_free_mb: int = 1024
) -> StorageRow:
    """Create (or adopt, when it already has a key) an image directory and add it to
    the config. An adopted folder's studies are indexed."""
    _check_new_name(vault, name)
    root = path.expanduser().resolve()
    for other in vault.storages.values():
        if other.root.resolve() == root:
            raise StudyvaultError(f"PATH: {root} is already the folder of {other.name!r}")
    kind = vault.plugins.storage_kinds.get("image_directory")
    entry = kind.config_type(name=name, path=str(root), min_free_mb=min_free_mb)
    storage = kind(entry, vault.config.base)
    key = root / "image_directory.key"
    adopted = key.exists()
    storage_id = read_key(key)["id"] if adopted else storage.create()
    if vault.storage_by_id(storage_id) is not None:
        raise StudyvaultError(
            f"PATH: {root} is already configured as {vault.storage_name(storage_id)!r}"
        )
    config = edit_config(
        vault.config.path,
        lambda doc: append_table(
            doc,
            "image_directories",
            {"name": name, "id": storage_id, "path": str(root), "min_free_mb": min_free_mb},
        ),
    )
    _reload(vault, config)
    if adopted:
        from .scan import index_storage

        index_storage(vault, vault.storage(name))
    return next(r for r in image_directory_rows(vault) if r.name == name)


def remove_image_directory(vault: Vault, name: str) -> None:
    storage = vault.image_directory(name)
    studies, _ = vault.index.count_storage(storage.id)
    if studies:
        raise StudyvaultError(
            f"{name} still holds {studies} studies: move them to another image directory "
            "first (a storage task with --action move --all)"
        )
    others = [s.name for s in vault.image_directories() if s.name != name]

    def change(doc: object) -> None:
        remove_table(doc, "image_directories", name)  # type: ignore[arg-type]
        if vault.config.studyvault.incoming == name:
            set_key(doc, "studyvault", "incoming", others[0] if others else "")  # type: ignore[arg-type]

    _reload(vault, edit_config(vault.config.path, change))


def set_incoming(vault: Vault, name: str) -> None:
    vault.image_directory(name)
    _reload(
        vault,
        edit_config(vault.config.path, lambda doc: set_key(doc, "studyvault", "incoming", name)),
    )


def _reload(vault: Vault, config: object) -> None:
    """Point the open vault at the edited config."""
    fresh = Vault(config, vault.plugins)  # type: ignore[arg-type]
    vault.config = fresh.config
    vault.storages = fresh.storages


# -- archives -------------------------------------------------------------------------

ARCHIVE_KEY = "folder_archive.key"


class MountResult(msgspec.Struct, kw_only=True):
    """What ``archives mount`` did."""

    archive: StorageRow
    registered: bool  # a new archive was added to the config (its key was unknown)
    studies_indexed: int = 0
    moved_out: int = 0  # studies marked as moved out of studyvault: not indexed
    skipped: list[str] = []


def _last_stored(storage: Storage) -> str:
    stamp = storage.last_stored()
    if stamp is None:
        return "never"
    return dt.datetime.fromtimestamp(stamp).astimezone().isoformat(timespec="seconds")


def archive_rows(vault: Vault) -> list[StorageRow]:
    """One row per archive for ``archives list``; free space and last-stored time only
    for an Online archive (an unmounted or offline one is not touched)."""
    rows = []
    for storage in vault.archives():
        studies, size = vault.index.count_storage(storage.id)
        status = storage.status()
        online = status is Status.ONLINE
        rows.append(
            StorageRow(
                name=storage.name,
                id=storage.id,
                kind=storage.kind,
                path=str(storage.root),
                status=status.value,
                studies=studies,
                bytes=size,
                free_bytes=storage.free_bytes() if online else 0,
                description=storage.describe(),
                last_stored=_last_stored(storage) if online else "never",
            )
        )
    return rows


def _archive_row(vault: Vault, name: str) -> StorageRow:
    return next(r for r in archive_rows(vault) if r.name == name)


def archive_named(vault: Vault, name: str) -> Storage:
    """The archive called ``name``; an image directory of that name is an error."""
    storage = vault.storage(name)
    if storage.role is not Role.ARCHIVE:
        raise StudyvaultError(f"{name!r} is an image directory, not an archive")
    return storage


def _check_no_transfer(vault: Vault, storage: Storage, what: str) -> None:
    for entry in vault.index.iter_journal():
        if storage.id in (entry.source, entry.destination):
            raise StudyvaultError(
                f"cannot {what} {storage.name}: the {entry.op} of study {entry.study_uid} "
                "to or from it is not finished (let the task finish or run it again first)"
            )


def add_archive(
    vault: Vault,
    name: str,
    path: Path,
    *,
    naming: str = "readable",
    zip: bool = False,
    min_free_mb: int = 1024,
) -> StorageRow:
    """Create a folder archive in an empty or new folder and add it to the config.

    :raises StudyvaultError: for a taken name or folder, bad options, a folder that
        holds other files, or one that already is a folder archive (mount it instead).
    """
    _check_new_name(vault, name)
    if naming not in ("readable", "uid"):
        raise StudyvaultError(f"--naming: must be readable or uid, not {naming!r}")
    if min_free_mb < 0:
        raise StudyvaultError(f"--min-free-mb: must be 0 or more, not {min_free_mb}")
    root = path.expanduser().resolve()
    for other in vault.storages.values():
        if other.root.resolve() == root:
            raise StudyvaultError(f"PATH: {root} is already the folder of {other.name!r}")
    if (root / ARCHIVE_KEY).exists():
        raise StudyvaultError(
            f"PATH: {root} already is a folder archive; add it with "
            f"`studyvault archives mount {root}`"
        )
    kind = vault.plugins.storage_kinds.get("folder")
    values = {
        "name": name,
        "kind": "folder",
        "id": str(uuid.uuid4()),
        "path": str(root),
        "naming": naming,
        "zip": zip,
        "min_free_mb": min_free_mb,
    }
    entry = msgspec.convert({k: v for k, v in values.items() if k != "kind"}, kind.config_type)
    kind(entry, vault.config.base).create()
    config = edit_config(vault.config.path, lambda doc: append_table(doc, "archives", values))
    _reload(vault, config)
    return _archive_row(vault, name)


def unmount_archive(vault: Vault, name: str) -> StorageRow:
    """Set an archive Unmounted: nothing is stored in or fetched from it; its studies
    stay listed as archived. The admin may then move its folder."""
    storage = archive_named(vault, name)
    if "mounted" not in storage.config_type.__struct_fields__:
        raise StudyvaultError(f"{name} is a {storage.kind} archive: it cannot be unmounted")
    _check_no_transfer(vault, storage, "unmount")
    config = edit_config(
        vault.config.path, lambda doc: update_table(doc, "archives", name, {"mounted": False})
    )
    _reload(vault, config)
    return _archive_row(vault, name)


def mount_archive(vault: Vault, path: Path) -> MountResult:
    """Mount the folder archive at ``path``: a known one (by the id in its key) is
    pointed at ``path`` and set mounted; an unknown one is added to the config under the
    name in its key (made unique) and its studies are indexed, except those marked as
    moved out of studyvault.

    :raises StudyvaultError: when ``path`` holds no folder archive key, or is the folder
        of another mounted storage.
    """
    root = path.expanduser().resolve()
    key_path = root / ARCHIVE_KEY
    if not key_path.exists():
        if not root.is_dir():
            raise StudyvaultError(f"PATH: {root}: no such folder")
        hint = (
            "it is an image directory (use `studyvault image-dirs add`)"
            if (root / "image_directory.key").exists()
            else "it is not a folder archive (create one with `studyvault archives add`)"
        )
        raise StudyvaultError(f"PATH: {root} holds no {ARCHIVE_KEY}: {hint}")
    key = read_key(key_path)
    known = vault.storage_by_id(key["id"])
    if known is None or known.root.resolve() != root:
        for other in vault.storages.values():
            if other.root.resolve() == root and other.status() is not Status.UNMOUNTED:
                raise StudyvaultError(
                    f"PATH: {root} is the folder of {other.name!r}; unmount it first"
                )
    if known is not None:
        if known.role is not Role.ARCHIVE:
            raise StudyvaultError(f"PATH: {root} is configured as image directory {known.name!r}")
        values: dict[str, object] = {"path": str(root)}
        if "mounted" in known.config_type.__struct_fields__:
            values["mounted"] = True
        config = edit_config(
            vault.config.path, lambda doc: update_table(doc, "archives", known.name, values)
        )
        _reload(vault, config)
        return MountResult(archive=_archive_row(vault, known.name), registered=False)
    name = _unique_name(vault, str(key.get("name") or root.name))
    entry = {
        "name": name,
        "kind": "folder",
        "id": key["id"],
        "path": str(root),
        "naming": key.get("naming") if key.get("naming") in ("readable", "uid") else "readable",
        "zip": key.get("compression") == "zip",
        "min_free_mb": 1024,
    }
    config = edit_config(vault.config.path, lambda doc: append_table(doc, "archives", entry))
    _reload(vault, config)
    from .scan import index_storage

    summary = index_storage(vault, vault.storage(name))
    return MountResult(
        archive=_archive_row(vault, name),
        registered=True,
        studies_indexed=summary.studies,
        moved_out=summary.moved_out,
        skipped=summary.skipped,
    )


def _unique_name(vault: Vault, base: str) -> str:
    base = base.strip() or "Archive"
    name, n = base, 2
    while name in vault.storages:
        name, n = f"{base} ({n})", n + 1
    return name


def remove_archive(vault: Vault, name: str) -> None:
    """Remove an archive from the config, only when the index lists no study in it.
    Its folder is left on disk."""
    storage = archive_named(vault, name)
    studies, _ = vault.index.count_storage(storage.id)
    if studies:
        raise StudyvaultError(
            f"{name} still holds {studies} archived studies: fetch or move them to another "
            "archive first (its folder stays on disk either way)"
        )
    _check_no_transfer(vault, storage, "remove")
    _reload(vault, edit_config(vault.config.path, lambda doc: remove_table(doc, "archives", name)))
