"""The folder archive storage kind: nearline studies in a disk folder or network share.

Each study is a standalone DICOM file-set (see :mod:`.fileset`) at a location chosen
by the archive's naming (see :mod:`.layout`), as a folder or, with ``zip = true``, as
one uncompressed zip. A store goes through ``staging/`` on the same filesystem and is
published by an atomic rename.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from studyvault.errors import StorageError, StorageOfflineError
from studyvault.fsutil import (
    atomic_write_bytes,
    fsync_dir,
    publish_folder,
    recover_folder,
    remove_tree,
    temp_name,
)
from studyvault.keyfile import folder_is_empty, read_key, write_key
from studyvault.records import InstanceRecord, StudyRecord
from studyvault.storage import Opener, Role, Status, Storage, StorageConfig, StorePlan

from . import layout
from .fileset import file_set_items, os_error, write_folder, write_zip
from .layout import DICOMDIR, KEY_NAME, LAST_STORED, STAGING, STUDIES, is_zip, resolve
from .zipread import ZipReader

log = logging.getLogger(__name__)

NAMINGS = ("readable", "uid")


class FolderArchiveConfig(StorageConfig):
    """An ``[[archives]]`` entry of kind ``folder`` (frozen, keyword-only, no unknown
    fields: struct options are inherited from :class:`StorageConfig`).

    :param naming: ``readable`` (``studies/<YYYY>/<YYYYMMDD> <NAME> <id>/``) or ``uid``
        (``studies/<StudyInstanceUID>/``).
    :param zip: store each new study as one uncompressed ``.zip``.
    :param mounted: false after ``archives unmount``: nothing is stored or fetched.
    """

    naming: str = "readable"
    zip: bool = False
    mounted: bool = True

    def __post_init__(self) -> None:
        if self.naming not in NAMINGS:
            msg = f"naming must be 'readable' or 'uid', not {self.naming!r}"
            raise ValueError(msg)


class FolderArchive(Storage):
    """A folder holding archived studies, each a DICOM file-set (folder or zip)."""

    kind = "folder"
    role = Role.ARCHIVE
    config_type = FolderArchiveConfig
    id: str

    def __init__(self, config: StorageConfig, base: Path | None = None) -> None:
        super().__init__(config, base)
        self.settings: FolderArchiveConfig = (
            config
            if isinstance(config, FolderArchiveConfig)
            else FolderArchiveConfig(
                name=config.name, id=config.id, path=config.path, min_free_mb=config.min_free_mb
            )
        )
        self._zips = ZipReader()
        # staging name -> instances read back and checked while it was written
        self._vouched: dict[str, set[str]] = {}
        self._key_stamp: tuple[int, int, int] | None = None
        self._key_id = ""

    # -- identity and state -----------------------------------------------------------
    @property
    def key_path(self) -> Path:
        return self.root / KEY_NAME

    def create(self) -> str:
        if self.key_path.exists():
            key = read_key(self.key_path)
            if self.id and key["id"] == self.id:
                return self.id
            raise StorageError(
                f"{self.root} already holds folder archive {key.get('name', '?')!r}; "
                f"add it with `studyvault archives mount {self.root}`"
            )
        if not folder_is_empty(self.root):
            raise StorageError(
                f"{self.root}: folder is not empty and has no {KEY_NAME}; "
                "choose an empty or new folder"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        for sub in (STUDIES, STAGING):
            (self.root / sub).mkdir(exist_ok=True)
        fields = {
            "name": self.name,
            "kind": self.kind,
            "naming": self.settings.naming,
            "compression": "zip" if self.settings.zip else "none",
        }
        self.id = write_key(self.key_path, fields, new_id=self.id or None)
        fsync_dir(self.root)
        if self.root.parent.exists():
            fsync_dir(self.root.parent)
        return self.id

    def status(self) -> Status:
        if not self.settings.mounted:
            return Status.UNMOUNTED
        try:
            stat = self.key_path.stat()
            # the key is re-read only when it changed (a status check runs several times
            # per study); a vanished or replaced folder still shows at once
            stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
            if stamp != self._key_stamp:
                self._key_id = read_key(self.key_path)["id"]
                self._key_stamp = stamp
        except (OSError, StorageError):
            self._key_stamp = None
            return Status.OFFLINE
        if self.id and self._key_id != self.id:
            return Status.OFFLINE
        return Status.ONLINE

    def describe(self) -> str:
        naming = "UID file naming" if self.settings.naming == "uid" else "readable file naming"
        return f"{self.root} [{naming}{', zip' if self.settings.zip else ''}]"

    def free_bytes(self) -> int:
        # an unmounted archive is not touched: its share may be gone on purpose
        return super().free_bytes() if self.settings.mounted else 0

    def last_stored(self) -> float | None:
        try:
            text = (self.root / LAST_STORED).read_text(encoding="utf-8").strip()
            return dt.datetime.fromisoformat(text).timestamp()
        except (OSError, ValueError):
            return None

    def _require_online(self) -> None:
        status = self.status()
        if status is not Status.ONLINE:
            raise StorageOfflineError(f"{self.name} is {status.value.lower()}: {self.root}")

    # -- storing ----------------------------------------------------------------------
    def plan_store(self, study: StudyRecord, instances: list[InstanceRecord]) -> StorePlan:
        return layout.plan_store(
            study, instances, self.id, self._new_location, layout.ZIP_STAGING_SUFFIX
        )

    def _new_location(self, study: StudyRecord) -> str:
        for location in layout.candidates(study, self.settings.naming, self.settings.zip):
            path = resolve(self.root, location)
            if not path.exists() or self._study_uid_at(location) == study.study_uid:
                return location
        raise StorageError(f"{self.name}: every location for study {study.study_uid} is taken")

    def _study_uid_at(self, location: str) -> str | None:
        """The StudyInstanceUID in the DICOMDIR at ``location``, if it can be read."""
        try:
            with self.open_file(location, DICOMDIR) as f:
                from pydicom import dcmread  # loaded only when a location is contested

                records = dcmread(f, force=True).DirectoryRecordSequence
            return next(
                str(r.StudyInstanceUID) for r in records if r.DirectoryRecordType == "STUDY"
            )
        except Exception:  # anything unreadable is not this study
            return None

    def write_staging(
        self,
        plan: StorePlan,
        study: StudyRecord,
        instances: Iterable[tuple[InstanceRecord, Opener]],
    ) -> None:
        items = file_set_items(plan, instances)
        self._require_online()
        # refused before anything is written, so a full archive is left as it was
        self.check_room(sum(inst.size for inst, _, _ in items))
        staging = resolve(self.root, plan.staging, "staging name")
        self._zips.forget(staging)
        self._vouched.pop(plan.staging, None)
        remove_tree(staging)
        if not staging.parent.exists():
            staging.parent.mkdir(parents=True)
            fsync_dir(self.root)
        try:
            if is_zip(plan.staging):
                write_zip(staging, study, items)  # read back by the engine
            else:
                write_folder(staging, study, items)
                self._vouched[plan.staging] = {inst.sop_uid for inst, _, _ in items}
        except BaseException as exc:
            # a half-written staging is never published: clear it for the next attempt
            remove_tree(staging)
            if isinstance(exc, OSError) and not isinstance(exc, StorageError):
                raise os_error(exc, staging) from exc
            raise

    def verified_on_write(self, plan: StorePlan, instances: list[InstanceRecord]) -> set[str]:
        # a folder's instance files were each read back once durable and checked against
        # their recorded SHA-256 by write_folder (zips are read back by the engine)
        return self._vouched.pop(plan.staging, set()) & {i.sop_uid for i in instances}

    def publish(self, plan: StorePlan) -> None:
        staging = resolve(self.root, plan.staging, "staging name")
        location = resolve(self.root, plan.location)
        parent = location.parent
        if not parent.exists():
            parent.mkdir(parents=True)
            fsync_dir(parent.parent)
        if staging.exists() and is_zip(plan.location):
            # the new zip replaces a moved-out one: it is in studyvault again (a folder's
            # marker goes with the folder it replaces)
            remove_tree(layout.moved_out_marker(self.root, plan.location))
        publish_folder(staging, location, self.root / (plan.staging + ".old"))
        self._zips.forget(location)
        self._record_last_stored()

    def _record_last_stored(self) -> None:
        path = self.root / LAST_STORED
        tmp = temp_name(path)
        stamp = dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()
        try:
            # shown in lists only: not worth an fsync; a crash may keep the older time
            tmp.write_text(stamp + "\n", encoding="utf-8")
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            log.warning("%s: cannot record the last store time: %s", path, exc)

    def discard_staging(self, plan: StorePlan) -> None:
        staging = resolve(self.root, plan.staging, "staging name")
        self._zips.forget(staging)
        recover_folder(
            staging, resolve(self.root, plan.location), self.root / (plan.staging + ".old")
        )

    # -- reading ----------------------------------------------------------------------
    def open_file(self, location: str, path: str) -> IO[bytes]:
        where = resolve(self.root, location)
        if is_zip(location):
            return self._zips.open(where, path)
        target = resolve(where, path, "file path")
        try:
            return open(target, "rb")
        except OSError as exc:
            raise StorageError(f"{target}: {exc.strerror or exc}") from None

    def iter_studies(self) -> Iterator[str]:
        yield from layout.iter_locations(self.root)

    def iter_files(self, location: str) -> Iterator[tuple[str, Opener]]:
        where = resolve(self.root, location)
        if is_zip(location):
            for name, info in sorted(self._zips.members(where).items()):
                if not info.is_dir() and name not in layout.NOT_INSTANCES:
                    yield name, (lambda name=name: self._zips.open(where, name))
            return
        for rel in layout.iter_folder_files(where):
            yield rel, (lambda p=where / rel: open(p, "rb"))

    # -- moved out of studyvault ------------------------------------------------------
    def mark_moved_out(self, location: str) -> None:
        marker = layout.moved_out_marker(self.root, location)
        if not resolve(self.root, location).exists():
            raise StorageError(f"{self.name}: no study at {location}")
        stamp = dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()
        text = (
            "This study was moved out of studyvault on "
            f"{stamp}; an index rebuild does not list it.\n"
        )
        atomic_write_bytes(marker, text.encode("utf-8"))

    def is_moved_out(self, location: str) -> bool:
        return layout.moved_out_marker(self.root, location).exists()

    # -- removing ---------------------------------------------------------------------
    def remove_study(self, location: str) -> None:
        path = resolve(self.root, location)
        self._zips.forget(path)
        # the engine calls this only once a verified copy elsewhere is committed in the
        # index, or for a delete the user confirmed
        remove_tree(path)
        if is_zip(location):
            remove_tree(layout.moved_out_marker(self.root, location))

    def staging_leftovers(self) -> list[str]:
        staging = self.root / STAGING
        if not staging.is_dir():
            return []
        return sorted(f"{STAGING}/{p.name}" for p in staging.iterdir())

    def key(self) -> dict[str, Any]:
        """The key file's fields (raises StorageError when it cannot be read)."""
        return read_key(self.key_path)
