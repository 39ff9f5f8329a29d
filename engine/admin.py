"""Changing the set-up: adding, removing, mounting storages (config edits + key files)."""

from __future__ import annotations

import datetime as dt
import re
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec

from .config import append_table, edit_config, remove_table, set_key, update_table
from .errors import StorageError, StorageOfflineError, StudyvaultError
from .keyfile import folder_is_empty, read_key
from .storage import Role, Status, Storage, StorageConfig
from .tasks import refuse_if_used
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
            f"PATH: {root} is already configured as {vault.storage_name(storage_id)!r} "
            f"(a moved copy? point it there with `studyvault image-dirs mount {root}`)"
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


IMAGE_DIR_KEY = "image_directory.key"


class ImageDirMountResult(msgspec.Struct, kw_only=True):
    """What ``image-dirs mount`` did."""

    image_directory: StorageRow
    #: moved: a configured one now points at PATH; added: an unknown one was added and
    #: its studies indexed; replaced: an empty folder took the place of a lost one;
    #: unchanged: it already was at PATH
    outcome: str
    previous_path: str = ""
    studies_indexed: int = 0
    skipped: list[str] = []
    studies_listed: int = 0  # replaced: studies the index lists there (now missing)


def _image_dir_row(vault: Vault, name: str) -> StorageRow:
    return next(r for r in image_directory_rows(vault) if r.name == name)


def _refuse_other_folder(vault: Vault, root: Path, owner: Storage | None) -> None:
    for other in vault.storages.values():
        if other is not owner and other.root.resolve() == root:
            raise StudyvaultError(f"PATH: {root} is already the folder of {other.name!r}")


def mount_image_directory(
    vault: Vault, path: Path, *, name: str | None = None
) -> ImageDirMountResult:
    """Mount the image directory at ``path`` by the id in its key file: a configured one
    (moved or copied to another disk) is pointed there; an unknown one is added (as
    ``name``, else the name in its key) and its studies are indexed. With ``name`` of a
    configured image directory that is Offline and ``path`` an empty or new folder, the
    folder becomes that image directory, empty (a dead disk replaced without a backup).

    :raises StudyvaultError: when ``path`` holds no image directory key (or an
        archive's), the key is an archive's, or the configured folder still holds the
        same image directory (two live copies: one must go first).
    """
    root = path.expanduser().resolve()
    key_path = root / IMAGE_DIR_KEY
    if (root / ARCHIVE_KEY).exists():
        raise StudyvaultError(
            f"PATH: {root} is a folder archive, not an image directory "
            f"(use `studyvault archives mount {root}`)"
        )
    if not key_path.exists():
        if name is not None and folder_is_empty(root):
            return _replace_lost_image_directory(vault, name, root)
        if not root.is_dir():
            raise StudyvaultError(f"PATH: {root}: no such folder")
        raise StudyvaultError(
            f"PATH: {root} holds no {IMAGE_DIR_KEY}: it is not an image directory "
            "(copy the whole folder, key file included; a new one is made with "
            "`studyvault image-dirs add`)"
        )
    try:
        key = read_key(key_path)
    except StorageError as exc:
        raise StudyvaultError(f"PATH: {exc}") from None
    if key.get("kind", "image_directory") != "image_directory":
        raise StudyvaultError(f"PATH: {key_path} is the key of a {key.get('kind')} storage")
    known = vault.storage_by_id(key["id"])
    if known is None:
        return _add_mounted_image_directory(vault, root, key, name)
    if known.role is not Role.IMAGE_DIRECTORY:
        raise StudyvaultError(
            f"PATH: {root} holds the key of archive {known.name!r}, not of an image directory"
        )
    if name is not None and name != known.name:
        raise StudyvaultError(
            f"--name: {root} is image directory {known.name!r} (by the id in its key), not {name!r}"
        )
    previous = known.root.resolve()
    if previous == root:
        return ImageDirMountResult(
            image_directory=_image_dir_row(vault, known.name),
            outcome="unchanged",
            previous_path=str(previous),
        )
    _refuse_other_folder(vault, root, known)
    if known.status() is Status.ONLINE:
        raise StudyvaultError(
            f"{known.name} is still at {previous} (its key file, same id, is there): two "
            f"live copies of one image directory; take one away first (unmount its disk, "
            f"or rename or remove {previous} once you are sure {root} is a whole copy)"
        )
    config = edit_config(
        vault.config.path,
        lambda doc: update_table(doc, "image_directories", known.name, {"path": str(root)}),
    )
    _reload(vault, config)
    return ImageDirMountResult(
        image_directory=_image_dir_row(vault, known.name),
        outcome="moved",
        previous_path=str(previous),
    )


def _add_mounted_image_directory(
    vault: Vault, root: Path, key: Mapping[str, Any], name: str | None
) -> ImageDirMountResult:
    """Add the image directory at ``root`` (its key's id is unknown) and index it."""
    if name is None:
        name = _unique_name(vault, str(key.get("name") or root.name))
    _check_new_name(vault, name)
    _refuse_other_folder(vault, root, None)
    record = {"name": name, "id": key["id"], "path": str(root), "min_free_mb": 1024}
    config = edit_config(
        vault.config.path, lambda doc: append_table(doc, "image_directories", record)
    )
    _reload(vault, config)
    from .scan import index_storage

    summary = index_storage(vault, vault.storage(name))
    return ImageDirMountResult(
        image_directory=_image_dir_row(vault, name),
        outcome="added",
        studies_indexed=summary.studies,
        skipped=summary.skipped,
    )


def _replace_lost_image_directory(vault: Vault, name: str, root: Path) -> ImageDirMountResult:
    """Make the empty folder ``root`` the image directory ``name`` (same id, so its
    name, tasks and index entries stay), for a disk that died without a backup."""
    storage = vault.image_directory(name)
    previous = storage.root.resolve()
    if storage.status() is Status.ONLINE:
        raise StudyvaultError(
            f"PATH: {root} is empty, and {name} is Online at {previous}: to move it, "
            f"copy its whole folder (key file included) to {root} first"
        )
    _refuse_other_folder(vault, root, storage)
    kind = vault.plugins.storage_kinds.get(storage.kind)
    entry = msgspec.structs.replace(storage.config, path=str(root))
    kind(entry, vault.config.base).create()  # the key keeps the configured id
    config = edit_config(
        vault.config.path,
        lambda doc: update_table(doc, "image_directories", name, {"path": str(root)}),
    )
    _reload(vault, config)
    listed = vault.index.count_storage_studies(storage.id)
    return ImageDirMountResult(
        image_directory=_image_dir_row(vault, name),
        outcome="replaced",
        previous_path=str(previous),
        studies_listed=listed,
    )


def remove_image_directory(vault: Vault, name: str) -> None:
    storage = vault.image_directory(name)
    refuse_if_used(vault, name)
    studies, _ = vault.index.count_storage(storage.id)
    if studies:
        raise StudyvaultError(
            f"{name} still holds {studies} studies: move them to another image directory "
            "first (a storage task with --action move --all); if its disk died with them, "
            f'see `studyvault study forget --storage "{name}"`'
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
                path=storage.where(),
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


#: option names that would put a secret in the config file: always refused
_CREDENTIAL_WORDS = ("secret", "password", "passwd", "token", "access_key", "credential")


def archive_kind(vault: Vault, kind_name: str) -> type[Storage]:
    """The archive kind called ``kind_name`` (``folder``, ``s3``, a plugin's)."""
    try:
        kind = vault.plugins.storage_kinds.get(kind_name)
    except StudyvaultError as exc:
        raise StudyvaultError(f"--kind: {exc}") from None
    if kind.role is not Role.ARCHIVE:
        raise StudyvaultError(f"--kind: {kind_name!r} is not an archive kind")
    return kind


def _option_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def archive_fields(
    kind: type[Storage], where: str, options: Mapping[str, Any]
) -> tuple[StorageConfig, dict[str, Any]]:
    """Check ``options`` (field -> value, strings allowed) for an archive of ``kind`` at
    ``where``; return the decoded config entry and the fields to write to the config.

    :raises StudyvaultError: for a secret, an unknown setting or a bad value, naming it.
    """
    settings = set(kind.config_type.__struct_fields__) - {"name", "id", "mounted"}
    for key in options:
        if any(word in key.lower() for word in _CREDENTIAL_WORDS):
            raise StudyvaultError(
                f"--option {key}: credentials are never stored in studyvault's config; "
                f"a {kind.kind} archive takes them from their standard sources (see its docs)"
            )
        if key not in settings:
            raise StudyvaultError(
                f"--option {key}: not a setting of {kind.kind} archives "
                f"(settings: {', '.join(sorted(settings))})"
            )
    try:
        fields = kind.config_from_options(where, options)
    except ValueError as exc:
        raise StudyvaultError(str(exc)) from None
    try:
        entry = msgspec.convert({"name": "-", **fields}, kind.config_type, strict=False)
    except msgspec.ValidationError as exc:
        text = str(exc)
        missing = re.match(r"Object missing required field `(\w+)`", text)
        if missing:
            raise StudyvaultError(
                f"{_option_name(missing.group(1))}: required for {kind.kind} archives"
            ) from None
        at = re.search(r" - at `\$\.(\w+)`", text)
        where_ = _option_name(at.group(1)) + ": " if at else ""
        raise StudyvaultError(f"{where_}{text[: at.start()] if at else text}") from None
    typed = {key: getattr(entry, key) for key in fields}
    return entry, typed


def add_archive(
    vault: Vault,
    name: str,
    where: Path | str,
    *,
    kind: str = "folder",
    options: Mapping[str, Any] | None = None,
    naming: str | None = None,
    zip: bool | None = None,
    min_free_mb: int = 1024,
) -> StorageRow:
    """Create an archive of ``kind`` (a new folder archive in an empty or new folder, an
    S3 archive in an empty prefix...) and add it to the config. One path for every kind:
    the options are checked against the kind's config, the kind creates its key, then
    the config entry is written.

    :param where: a folder, or a URL of the kind's :attr:`~Storage.url_scheme` (may be
        empty when the options say where).
    :param options: more settings of the kind's config entry (field -> value).
    :raises StudyvaultError: for a taken name or place, bad options, a place that holds
        other files, or one that already is an archive (mount it instead).
    """
    _check_new_name(vault, name)
    storage_kind = archive_kind(vault, kind)
    values: dict[str, Any] = dict(options or {})
    settings = storage_kind.config_type.__struct_fields__
    if naming is not None and naming not in ("readable", "uid"):
        raise StudyvaultError(f"--naming: must be readable or uid, not {naming!r}")
    # written out even when they are the defaults, so the entry shows the choice
    if naming is not None or "naming" in settings:
        values.setdefault("naming", naming or "readable")
    if zip or "zip" in settings:
        values.setdefault("zip", bool(zip))
    if min_free_mb < 0:
        raise StudyvaultError(f"--min-free-mb: must be 0 or more, not {min_free_mb}")
    values.setdefault("min_free_mb", min_free_mb)
    place = str(where or "")
    if not storage_kind.url_scheme:
        if not place:
            raise StudyvaultError(f"PATH: required for {kind} archives")
        root = Path(place).expanduser().resolve()
        place = str(root)
        for other in vault.storages.values():
            if other.root.resolve() == root:
                raise StudyvaultError(f"PATH: {root} is already the folder of {other.name!r}")
    entry, fields = archive_fields(storage_kind, place, values)
    storage_id = str(uuid.uuid4())
    storage = storage_kind(
        msgspec.structs.replace(entry, name=name, id=storage_id), vault.config.base
    )
    if storage.url_scheme:
        for other in vault.archives():
            if other.kind == storage.kind and other.where() == storage.where():
                raise StudyvaultError(f"{storage.where()} is already the place of {other.name!r}")
    try:
        storage.key()
    except StorageOfflineError:
        raise
    except StorageError:
        pass  # no key there: a new archive
    else:
        raise StudyvaultError(
            f"{storage.where()} already is a {kind} archive; add it with "
            f"`studyvault archives mount {storage.where()}`"
        )
    storage.create()
    record = {"name": name, "kind": kind, "id": storage_id, **fields}
    config = edit_config(vault.config.path, lambda doc: append_table(doc, "archives", record))
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


def mount_archive(
    vault: Vault, where: Path | str, *, options: Mapping[str, Any] | None = None
) -> MountResult:
    """Mount the archive at ``where`` (a folder holding a folder archive key, or a URL
    such as ``s3://bucket/prefix`` with ``options`` saying how to reach it): a known one
    (by the id in its key) is pointed there and set mounted; an unknown one is added to
    the config under the name in its key (made unique) and its studies are indexed,
    except those marked as moved out of studyvault.

    :raises StudyvaultError: when ``where`` holds no archive key, cannot be reached, or
        is the folder of another mounted storage.
    """
    text = str(where)
    if "://" in text:
        kind, fields, key = _locate_url(vault, text, options or {})
        fallback = text.rstrip("/").rsplit("/", 1)[-1]
    else:
        if options:
            raise StudyvaultError(f"--option: a folder archive ({text}) takes no options")
        kind, fields, key = _locate_folder(vault, Path(text))
        fallback = Path(fields["path"]).name
    known = vault.storage_by_id(key["id"])
    if known is not None:
        if known.role is not Role.ARCHIVE:
            raise StudyvaultError(f"{text} is configured as image directory {known.name!r}")
        values: dict[str, Any] = dict(fields)
        if "mounted" in known.config_type.__struct_fields__:
            values["mounted"] = True
        config = edit_config(
            vault.config.path, lambda doc: update_table(doc, "archives", known.name, values)
        )
        _reload(vault, config)
        return MountResult(archive=_archive_row(vault, known.name), registered=False)
    name = _unique_name(vault, str(key.get("name") or fallback))
    entry: dict[str, Any] = {"name": name, "kind": kind.kind, "id": key["id"], **fields}
    settings = kind.config_type.__struct_fields__
    if "naming" in settings:
        entry["naming"] = (
            key.get("naming") if key.get("naming") in ("readable", "uid") else "readable"
        )
    if "zip" in settings:
        entry["zip"] = key.get("compression") == "zip"
    entry.setdefault("min_free_mb", 1024)
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


def _locate_folder(
    vault: Vault, path: Path
) -> tuple[type[Storage], dict[str, Any], dict[str, Any]]:
    """The folder archive kind, its config fields and its key, for mounting ``path``."""
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
    return vault.plugins.storage_kinds.get("folder"), {"path": str(root)}, key


def _locate_url(
    vault: Vault, url: str, options: Mapping[str, Any]
) -> tuple[type[Storage], dict[str, Any], dict[str, Any]]:
    """The kind whose URL scheme ``url`` has, its config fields and the key found there.
    Settings not given are taken from a configured archive at the same URL (mounting an
    unmounted archive again needs no options)."""
    scheme = url.split("://", 1)[0].lower()
    registry = vault.plugins.storage_kinds
    kinds = [registry.get(n) for n in registry.names() if registry.get(n).url_scheme == scheme]
    if not kinds or kinds[0].role is not Role.ARCHIVE:
        raise StudyvaultError(f"{url}: no archive kind takes {scheme}:// URLs")
    kind = kinds[0]
    entry, fields = archive_fields(kind, url, options)
    here = kind(entry, vault.config.base).where()
    for other in vault.archives():
        if other.kind == kind.kind and other.where() == here:
            entry = msgspec.structs.replace(other.config, **{k: getattr(entry, k) for k in fields})
            break
    storage = kind(msgspec.structs.replace(entry, name=url), vault.config.base)
    try:
        key = storage.key()
    except StorageOfflineError as exc:
        raise StudyvaultError(f"{url}: cannot be reached: {exc}") from None
    except StorageError as exc:
        raise StudyvaultError(
            f"{url} holds no archive key ({exc}); create one with `studyvault archives add`"
        ) from None
    if key.get("kind", kind.kind) != kind.kind:
        raise StudyvaultError(f"{url} holds a {key.get('kind')} archive, not {kind.kind}")
    return kind, fields, key


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
    refuse_if_used(vault, name)
    studies, _ = vault.index.count_storage(storage.id)
    if studies:
        raise StudyvaultError(
            f"{name} still holds {studies} archived studies: fetch or move them to another "
            "archive first (its folder stays on disk either way)"
        )
    _check_no_transfer(vault, storage, "remove")
    _reload(vault, edit_config(vault.config.path, lambda doc: remove_table(doc, "archives", name)))
