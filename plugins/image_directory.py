"""The built-in image directory: online storage for live studies.

Layout below the root (private to studyvault)::

    image_directory.key              TOML: id, name, created, format version
    studies/<hh>/<StudyUID>/<SOPUID>.dcm
    staging/<token>/                 transfers in progress (same filesystem)

``<hh>`` is two hex digits of the study UID's SHA-1, to keep folders small. A UID that
is not plain digits and dots is replaced by a hash, so no value from a DICOM file is
ever used raw as a path.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import IO

from studyvault import hookimpl
from studyvault.errors import StorageError, StorageOfflineError
from studyvault.fsutil import (
    atomic_write_bytes,
    copy_plain,
    fsync_dir,
    fsync_files,
    publish_folder,
    recover_folder,
    remove_tree,
    temp_name,
    write_unsynced,
)
from studyvault.keyfile import folder_is_empty, read_key, write_key
from studyvault.records import InstanceRecord, StudyRecord
from studyvault.storage import OnlineStorage, Opener, Status, StorageConfig, StorePlan

KEY_NAME = "image_directory.key"
_FLUSHER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="studyvault-flush")
#: Threads that unlink a moved study's files: freeing a large file's blocks happens
#: outside the folder's lock, so unlinks in parallel free a study about twice as fast.
_UNLINKERS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="studyvault-unlink")
_UID_RE = re.compile(r"^[0-9][0-9.]{0,63}$")


def uid_component(uid: str) -> str:
    """A file-name-safe form of a UID: itself when it is digits and dots, else a hash."""
    if _UID_RE.match(uid) and ".." not in uid:
        return uid
    return "x" + hashlib.sha256(uid.encode("utf-8", "surrogateescape")).hexdigest()[:40]


class ImageDirectory(OnlineStorage):
    """A folder holding live studies."""

    kind = "image_directory"

    def __init__(self, config: StorageConfig, base: Path | None = None) -> None:
        super().__init__(config, base)
        self._dirty: set[Path] = set()
        self._unsynced: list[tuple[Path, Path]] = []  # (temp file, final path)
        self._unsynced_lock = threading.Lock()  # import stores files from two threads

    # -- identity -------------------------------------------------------------------
    @property
    def key_path(self) -> Path:
        return self.root / KEY_NAME

    def create(self) -> str:
        if self.key_path.exists():
            return read_key(self.key_path)["id"]
        if not folder_is_empty(self.root):
            raise StorageError(
                f"{self.root}: folder is not empty and has no {KEY_NAME}; "
                "choose an empty or new folder"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "studies").mkdir(exist_ok=True)
        new_id = write_key(
            self.key_path, {"name": self.name, "kind": self.kind}, new_id=self.id or None
        )
        fsync_dir(self.root)
        return new_id

    def status(self) -> Status:
        try:
            key = read_key(self.key_path)
        except StorageError:
            return Status.OFFLINE
        if self.id and key["id"] != self.id:
            return Status.OFFLINE
        return Status.ONLINE

    def _require_key(self) -> None:
        """Refuse to write when the key file is gone: the disk went away (unmounted) and
        new folders would land on whatever disk holds the mount point."""
        if not self.key_path.is_file():
            raise StorageOfflineError(
                f"{self.name} is offline: {self.key_path} is missing (is its disk mounted?)"
            )

    # -- ingest ---------------------------------------------------------------------
    def ingested_path(self, study_uid: str, sop_uid: str) -> tuple[str, str]:
        return self._location(study_uid), uid_component(sop_uid) + ".dcm"

    def _location(self, study_uid: str) -> str:
        shard = hashlib.sha1(study_uid.encode("utf-8", "surrogateescape")).hexdigest()[:2]
        return f"studies/{shard}/{uid_component(study_uid)}"

    def ingest(
        self, study_uid: str, sop_uid: str, src: IO[bytes] | bytes
    ) -> tuple[str, str, int, str]:
        location, path = self.ingested_path(study_uid, sop_uid)
        folder = self.root / location
        if not folder.is_dir():
            self._require_key()
            folder.mkdir(parents=True, exist_ok=True)
            with self._unsynced_lock:
                self._dirty.update({folder.parent, folder.parent.parent})
        final = folder / path
        tmp = temp_name(final)
        size, digest = write_unsynced(tmp, src)
        with self._unsynced_lock:
            self._unsynced.append((tmp, final))
            self._dirty.add(folder)
        return location, path, size, digest

    def flush(self) -> None:
        self._sync(self._take())

    def flush_async(self) -> Future[None]:
        # the group is taken here, in the caller's thread, so files ingested from now
        # on belong to the next flush
        return _FLUSHER.submit(self._sync, self._take())

    def _take(self) -> tuple[list[tuple[Path, Path]], set[Path]]:
        with self._unsynced_lock:
            pending, self._unsynced = self._unsynced, []
            dirty, self._dirty = self._dirty, set()
        return pending, dirty

    def _sync(self, group: tuple[list[tuple[Path, Path]], set[Path]]) -> None:
        # The group's files were written under temporary names; fsync them together (far
        # faster than one by one), then give them their names and make the folders
        # durable, deepest first. Nothing is indexed before this returns.
        pending, dirty = group
        fsync_files([tmp for tmp, _ in pending])
        for tmp, final in pending:
            os.replace(tmp, final)
        for folder in sorted(dirty, key=lambda p: len(p.parts), reverse=True):
            if folder.exists():
                fsync_dir(folder)

    # -- transfers ------------------------------------------------------------------
    def plan_store(self, study: StudyRecord, instances: list[InstanceRecord]) -> StorePlan:
        return StorePlan(
            location=self._location(study.study_uid),
            staging=f"staging/{uuid.uuid4().hex}",
            paths={i.sop_uid: uid_component(i.sop_uid) + ".dcm" for i in instances},
        )

    def write_staging(
        self,
        plan: StorePlan,
        study: StudyRecord,
        instances: Iterable[tuple[InstanceRecord, Opener]],
    ) -> None:
        staging = self.root / plan.staging
        remove_tree(staging)
        self._require_key()
        staging.mkdir(parents=True)
        written = []
        for inst, opener in instances:
            target = staging / plan.paths[inst.sop_uid]
            # not hashed here: the engine re-reads the staged copy against the index
            with opener() as src, open(target, "wb") as out:
                copy_plain(src, out)
            written.append(target)
        fsync_files(written)
        fsync_dir(staging)
        fsync_dir(staging.parent)

    def publish(self, plan: StorePlan) -> None:
        publish_folder(
            self.root / plan.staging, self.root / plan.location, self.root / (plan.staging + ".old")
        )

    def discard_staging(self, plan: StorePlan) -> None:
        recover_folder(
            self.root / plan.staging, self.root / plan.location, self.root / (plan.staging + ".old")
        )

    # -- reading --------------------------------------------------------------------
    def open_file(self, location: str, path: str) -> IO[bytes]:
        return open(self.root / location / path, "rb")

    def iter_studies(self) -> Iterator[str]:
        studies = self.root / "studies"
        if not studies.is_dir():
            return
        for shard in sorted(studies.iterdir()):
            if shard.is_dir():
                for study in sorted(shard.iterdir()):
                    if study.is_dir():
                        yield f"studies/{shard.name}/{study.name}"

    def iter_files(self, location: str) -> Iterator[tuple[str, Opener]]:
        # plain strings and an unbuffered open: verify and rebuild call this for every
        # file, and pathlib's parsing per file was a third of verify's time on small files
        with os.scandir(self.root / location) as entries:
            found = [e for e in entries if not e.name.startswith(".") and e.is_file()]
        for entry in sorted(found, key=lambda e: e.name):
            yield entry.name, partial(open, entry.path, "rb", buffering=0)

    def staging_leftovers(self) -> list[str]:
        staging = self.root / "staging"
        return sorted(f"staging/{p.name}" for p in staging.iterdir()) if staging.is_dir() else []

    # -- notes ----------------------------------------------------------------------
    def write_note(self, location: str, name: str, text: str) -> None:
        atomic_write_bytes(self.root / location / f".{name}", text.encode("utf-8"))

    def read_note(self, location: str, name: str) -> str | None:
        try:
            return (self.root / location / f".{name}").read_text(encoding="utf-8")
        except FileNotFoundError:
            return None

    # -- removing -------------------------------------------------------------------
    def remove_study(self, location: str) -> None:
        folder = self.root / location
        remove_tree(folder)

    def remove_instances(self, location: str, paths: list[str]) -> bool:
        folder = self.root / location
        files = [os.path.join(folder, path) for path in paths]
        if len(files) > 1:
            list(_UNLINKERS.map(_unlink, files))  # the first error, if any, is raised
        elif files:
            _unlink(files[0])
        _unlink(os.path.join(folder, ".studyvault-fetched.toml"))
        try:
            folder.rmdir()  # only when nothing else arrived meanwhile
        except FileNotFoundError:
            return True
        except OSError:
            fsync_dir(folder)
            return False
        fsync_dir(folder.parent)
        return True


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


@hookimpl
def studyvault_register_storage_kinds(register):  # type: ignore[no-untyped-def]
    register(ImageDirectory)
