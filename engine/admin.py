"""Changing the set-up: adding and removing storages (config edits + key files)."""

from __future__ import annotations

from pathlib import Path

import msgspec

from .config import append_table, edit_config, remove_table, set_key
from .errors import StudyvaultError
from .keyfile import read_key
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
