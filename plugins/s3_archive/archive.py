"""The S3 archive storage kind: nearline studies in an S3-compatible bucket.

Keys below the archive's prefix::

    studyvault_archive.key          TOML identity object: id, name, kind, naming,
                                    compression, created, format version
    last-stored.txt                 when the newest study was stored (ISO 8601)
    studies/<location>/DICOMDIR     a study: the folder archive's file-set, one object
    studies/<location>/DICOM/...    per file (readable or UID naming, see the folder
    studies/<location>/manifest-sha256.txt   archive's layout) ...
    studies/<location>.zip          ... or one uncompressed zip object
    complete/<location>             "study complete" marker, written LAST by a publish:
                                    only studies with one are listed
    moved-out/<location>            the study was moved out of studyvault
    staging/<token>[.zip]           stores in progress
    staging/<token>.old             the previous copy, kept aside while a merge publishes
    aside/<staging>                 marker: the aside copy is complete (and where it
                                    belongs)

S3 has no rename: a publish is a server-side copy from staging to the study's
location, then the marker; a half-done publish is either finished by running it again
or undone by :meth:`S3Archive.discard_staging`, which puts the aside copy back.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import tempfile
import threading
import time
import tomllib
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import tomlkit

from studyvault.errors import IntegrityError, StorageError, StorageOfflineError
from studyvault.keyfile import FORMAT_VERSION
from studyvault.naming import is_safe_relpath
from studyvault.plugins.folder_archive import layout
from studyvault.plugins.folder_archive.fileset import manifest, write_zip
from studyvault.plugins.folder_archive.layout import DICOMDIR, NOT_INSTANCES, is_zip
from studyvault.plugins.folder_archive.zipread import ZipReader
from studyvault.records import InstanceRecord, StudyRecord
from studyvault.storage import Opener, Role, Status, Storage, StorageConfig, StorePlan

if TYPE_CHECKING:
    from .bucket import Bucket

log = logging.getLogger(__name__)

KEY_NAME = "studyvault_archive.key"
COMPLETE = "complete/"
MOVED_OUT = "moved-out/"
ASIDE = "aside/"
STAGING = layout.STAGING
LAST_STORED = layout.LAST_STORED
NAMINGS = ("readable", "uid")
SSE_MODES = ("", "AES256", "aws:kms")
#: free space reported when no ``capacity_gb`` is configured (1 PiB: "no limit")
UNLIMITED = 1 << 50
#: how long an Online status is trusted before the identity object is read again
STATUS_TTL = 2.0
#: a zip object downloaded this recently is read again without asking for its ETag
TRUST_SECONDS = 30.0


class S3ArchiveConfig(StorageConfig):
    """An ``[[archives]]`` entry of kind ``s3``. No credentials here: they come from
    the standard AWS sources (environment, shared config and credentials files).

    :param endpoint_url: e.g. ``https://minio.example.org:9000``; empty for AWS.
    :param bucket: an existing bucket.
    :param prefix: key prefix of this archive inside the bucket (may be empty).
    :param region: e.g. ``eu-central-1``; empty for the profile's default.
    :param profile: AWS shared-config profile; empty for the default chain.
    :param sse: server-side encryption: ``""``, ``"AES256"`` or ``"aws:kms"``.
    :param sse_kms_key_id: the KMS key for ``aws:kms`` (empty: the bucket's default).
    :param naming: ``readable`` or ``uid``, as for folder archives.
    :param zip: store each new study as one uncompressed zip object.
    :param mounted: false after ``archives unmount``: nothing is stored or fetched.
    :param multipart_threshold_mb: files at least this large are uploaded in parts.
    :param checksum: send each file's SHA-256 with its upload, so the server rejects a
        damaged body (``x-amz-checksum-sha256``); turn off for stores without it.
    :param capacity_gb: free space to report (a quota); 0 reports 1 PiB (no limit).
    :param connect_timeout_s: give up connecting after this long (then: Offline).
    :param max_attempts: attempts per request, retries included.
    :param workers: parallel uploads and copies.
    """

    bucket: str
    endpoint_url: str = ""
    prefix: str = ""
    region: str = ""
    profile: str = ""
    sse: str = ""
    sse_kms_key_id: str = ""
    naming: str = "readable"
    zip: bool = False
    mounted: bool = True
    multipart_threshold_mb: int = 64
    checksum: bool = True
    capacity_gb: int = 0
    connect_timeout_s: float = 3.0
    max_attempts: int = 2
    workers: int = 16

    def __post_init__(self) -> None:
        if self.naming not in NAMINGS:
            msg = f"naming must be 'readable' or 'uid', not {self.naming!r}"
            raise ValueError(msg)
        if self.sse not in SSE_MODES:
            msg = f"sse must be '', 'AES256' or 'aws:kms', not {self.sse!r}"
            raise ValueError(msg)
        if not self.bucket.strip():
            raise ValueError("bucket must not be empty")
        if self.prefix and not is_safe_relpath(self.prefix.strip("/")):
            raise ValueError(f"prefix {self.prefix!r} is not a safe key prefix")
        if self.multipart_threshold_mb < 5:
            raise ValueError("multipart_threshold_mb must be at least 5 (S3's smallest part)")
        if self.workers < 1 or self.max_attempts < 1:
            raise ValueError("workers and max_attempts must be at least 1")


def _check(rel: str, what: str = "location") -> str:
    if not is_safe_relpath(rel):
        raise StorageError(f"refusing unsafe {what} {rel!r}")
    return rel


class S3Archive(Storage):
    """Archived studies in an S3 bucket, each a DICOM file-set (objects or one zip)."""

    kind = "s3"
    role = Role.ARCHIVE
    config_type = S3ArchiveConfig
    settings: S3ArchiveConfig
    id: str

    def __init__(self, config: StorageConfig, base: Path | None = None) -> None:
        super().__init__(config, base)
        if not isinstance(config, S3ArchiveConfig):
            raise StorageError(f"{config.name}: an s3 archive needs an s3 config entry")
        self.settings = config
        prefix = config.prefix.strip("/")
        self.url = f"s3://{config.bucket}/{prefix + '/' if prefix else ''}"
        if not config.path:
            # shown where lists show a folder; never used as a local path
            self.root = Path(self.url)
        self._bucket: Bucket | None = None
        self._online_until = 0.0
        self._zips = _ZipCache()
        self._ahead = _ReadAhead(lambda: self.bucket)

    @property
    def bucket(self) -> Bucket:
        """The bucket, made on first use: boto3 is imported only when an S3 archive is
        used, not by every command that loads the plugins."""
        if self._bucket is None:
            from .bucket import Bucket

            self._bucket = Bucket(self.settings)
        return self._bucket

    # -- identity and state -----------------------------------------------------------
    def _read_key(self) -> dict[str, Any] | None:
        data = self.bucket.get_bytes(KEY_NAME)
        if data is None:
            return None
        try:
            key = tomllib.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise StorageError(f"{self.bucket.url}{KEY_NAME}: unreadable key: {exc}") from None
        if not isinstance(key.get("id"), str) or not key["id"]:
            raise StorageError(f"{self.bucket.url}{KEY_NAME}: key has no id")
        return key

    def create(self) -> str:
        key = self._read_key()
        if key is not None:
            if self.id and key["id"] == self.id:
                return self.id
            raise StorageError(
                f"{self.bucket.url} already holds s3 archive {key.get('name', '?')!r} "
                f"(id {key['id']})"
            )
        if self.bucket.any_object():
            raise StorageError(
                f"{self.bucket.url}: prefix is not empty and has no {KEY_NAME}; "
                "choose an empty or new prefix"
            )
        storage_id = self.id or str(uuid.uuid4())
        doc = tomlkit.document()
        doc.add(tomlkit.comment("studyvault storage key: identifies this archive. Do not edit."))
        doc.add("id", storage_id)
        doc.add("name", self.name)
        doc.add("kind", self.kind)
        doc.add("naming", self.settings.naming)
        doc.add("compression", "zip" if self.settings.zip else "none")
        doc.add("created", dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat())
        doc.add("format_version", FORMAT_VERSION)
        self.bucket.put_bytes(KEY_NAME, tomlkit.dumps(doc).encode("utf-8"))
        self.id = storage_id
        return storage_id

    def status(self) -> Status:
        if not self.settings.mounted:
            return Status.UNMOUNTED
        if time.monotonic() < self._online_until:
            return Status.ONLINE
        try:
            key = self._read_key()
            if key is None and self.id and not self.bucket.any_object():
                # an archive configured by hand in the TOML file: its first use makes it
                self.create()
                key = {"id": self.id}
        except StorageError as exc:
            log.info("%s is offline: %s", self.name, exc)
            return Status.OFFLINE
        if key is None or (self.id and key["id"] != self.id):
            return Status.OFFLINE
        self._online_until = time.monotonic() + STATUS_TTL
        return Status.ONLINE

    def describe(self) -> str:
        where = self.bucket.url
        if self.settings.endpoint_url:
            where += f" at {self.settings.endpoint_url}"
        naming = "UID file naming" if self.settings.naming == "uid" else "readable file naming"
        extras = [naming]
        if self.settings.zip:
            extras.append("zip")
        if self.settings.sse:
            extras.append(f"SSE {self.settings.sse}")
        return f"{where} [{', '.join(extras)}]"

    def free_bytes(self) -> int:
        if not self.settings.mounted:
            return 0
        if self.settings.capacity_gb > 0:
            return self.settings.capacity_gb * 1024**3
        return UNLIMITED

    def last_stored(self) -> float | None:
        try:
            data = self.bucket.get_bytes(LAST_STORED)
            return dt.datetime.fromisoformat(data.decode().strip()).timestamp() if data else None
        except (StorageError, ValueError, UnicodeDecodeError):
            return None

    def _require_online(self) -> None:
        status = self.status()
        if status is not Status.ONLINE:
            raise StorageOfflineError(f"{self.name} is {status.value.lower()}: {self.bucket.url}")

    # -- markers ----------------------------------------------------------------------
    def _marker(self, name: str) -> dict[str, Any] | None:
        data = self.bucket.get_bytes(name)
        if data is None:
            return None
        try:
            return tomllib.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError):
            return {}

    def _put_marker(self, name: str, fields: dict[str, Any]) -> None:
        doc = tomlkit.document()
        for key, value in fields.items():
            doc.add(key, value)
        self.bucket.put_bytes(name, tomlkit.dumps(doc).encode("utf-8"))

    # -- trees: a study folder (objects below a prefix) or one zip object --------------
    def _tree(self, name: str, zipped: bool) -> list[tuple[str, int]]:
        """(path inside the tree, size) of every object of the tree ``name``."""
        if zipped:
            head = self.bucket.head(name)
            return [("", int(head["ContentLength"]))] if head is not None else []
        base = name + "/"
        return [(rel[len(base) :], size) for rel, size in self.bucket.list_keys(base)]

    @staticmethod
    def _join(name: str, path: str) -> str:
        return f"{name}/{path}" if path else name

    def _copy_tree(self, src: str, dst: str, zipped: bool) -> None:
        """Make tree ``dst`` an exact server-side copy of tree ``src``."""
        objects = self._tree(src, zipped)
        if not objects:
            raise StorageError(f"{self.bucket.url}{src}: nothing to copy")
        stale = {path for path, _ in self._tree(dst, zipped)} - {path for path, _ in objects}
        futures = [
            self.bucket.pool.submit(
                self.bucket.copy, self._join(src, path), self._join(dst, path), size
            )
            for path, size in objects
        ]
        _wait(futures)
        self.bucket.delete([self._join(dst, path) for path in sorted(stale)])

    def _delete_tree(self, name: str, zipped: bool) -> None:
        self.bucket.delete([self._join(name, path) for path, _ in self._tree(name, zipped)])

    # -- storing ----------------------------------------------------------------------
    def plan_store(self, study: StudyRecord, instances: list[InstanceRecord]) -> StorePlan:
        return layout.plan_store(study, instances, self.id, self._new_location, layout.ZIP_SUFFIX)

    def _new_location(self, study: StudyRecord) -> str:
        for location in layout.candidates(study, self.settings.naming, self.settings.zip):
            marker = self._marker(COMPLETE + location)
            if marker is None:
                if not self._tree(location, is_zip(location)):
                    return location
            elif marker.get("study_uid") == study.study_uid:
                return location
        raise StorageError(f"{self.name}: every location for study {study.study_uid} is taken")

    def write_staging(
        self,
        plan: StorePlan,
        study: StudyRecord,
        instances: Iterable[tuple[InstanceRecord, Opener]],
    ) -> None:
        pending = list(instances)
        self._require_online()
        # refused before anything is written, so a full archive is left as it was
        self.check_room(sum(inst.size for inst, _ in pending))
        staging = _check(plan.staging, "staging name")
        items = sorted(
            ((inst, opener, plan.paths[inst.sop_uid]) for inst, opener in pending),
            key=lambda item: item[2],
        )
        zipped = is_zip(plan.location)
        self._zips.forget(staging)
        self._ahead.forget(staging)
        self._delete_tree(staging, zipped)  # a killed attempt's objects: start afresh
        try:
            if zipped:
                self._write_zip(staging, study, items)
            else:
                self._write_objects(staging, study, items)
        except BaseException:
            # a half-written staging is never published: clear it for the next attempt
            try:
                self._delete_tree(staging, zipped)
            except StorageError as exc:
                log.warning("%s: cannot clear staging %s: %s", self.name, staging, exc)
            raise

    def _write_objects(
        self, staging: str, study: StudyRecord, items: list[tuple[InstanceRecord, Opener, str]]
    ) -> None:
        bucket = self.bucket
        threshold = self.settings.multipart_threshold_mb * 1024 * 1024
        from studyvault.dicomdir import build_dicomdir  # pydicom loads only when storing

        dicomdir = build_dicomdir(study, [(inst, file_id) for inst, _, file_id in items])
        dicomdir_sha = hashlib.sha256(dicomdir).hexdigest()
        digests = [(DICOMDIR, dicomdir_sha)]
        checksum = self.settings.checksum
        futures = [
            bucket.pool.submit(
                bucket.put_bytes,
                f"{staging}/{DICOMDIR}",
                dicomdir,
                dicomdir_sha if checksum else None,
            )
        ]
        # small files are read here and uploaded by the pool, a bounded number ahead
        window = self.settings.workers * 2
        for inst, opener, file_id in items:
            rel = f"{staging}/{file_id}"
            if inst.size >= threshold:
                with opener() as src:
                    hashing = _Hashing(src)
                    bucket.upload(rel, hashing)
                digest = hashing.digest.hexdigest()
            else:
                with opener() as src:
                    data = src.read()
                digest = hashlib.sha256(data).hexdigest()
                if not inst.sha256 or digest == inst.sha256:
                    futures.append(
                        bucket.pool.submit(
                            bucket.put_bytes, rel, data, digest if checksum else None
                        )
                    )
            if inst.sha256 and digest != inst.sha256:
                raise IntegrityError(
                    f"{self.name}: instance {inst.sop_uid} read {digest[:12]}…, the index "
                    f"records {inst.sha256[:12]}…: the source copy does not match; nothing "
                    "was stored"
                )
            digests.append((file_id, digest))
            if len(futures) >= window:
                _wait(futures[: window // 2])
                futures = futures[window // 2 :]
        text = manifest(digests)
        futures.append(
            bucket.pool.submit(
                bucket.put_bytes,
                f"{staging}/{layout.MANIFEST}",
                text,
                hashlib.sha256(text).hexdigest() if checksum else None,
            )
        )
        _wait(futures)

    def _write_zip(
        self, staging: str, study: StudyRecord, items: list[tuple[InstanceRecord, Opener, str]]
    ) -> None:
        with tempfile.TemporaryDirectory(prefix="studyvault-s3-") as tmp:
            part = Path(tmp) / "study.zip"
            write_zip(part, study, items)  # checks every instance against the index
            with open(part, "rb") as src:
                self.bucket.upload(staging, src)

    def publish(self, plan: StorePlan) -> None:
        location = _check(plan.location)
        staging = _check(plan.staging, "staging name")
        zipped = is_zip(location)
        aside = staging + ".old"
        marker = self._marker(COMPLETE + location)
        staged = self._tree(staging, zipped)
        if marker is not None and (marker.get("staging") == staging or not staged):
            # published already (a resumed run repeats the step): finish the clean-up
            self._cleanup(staging, aside, zipped)
            return
        if not staged:
            raise StorageError(
                f"{self.bucket.url}{staging}: staging is missing and {location} is not published"
            )
        if marker is not None and self._marker(ASIDE + staging) is None:
            # a merge: keep the listed copy aside until the new one stands
            self._copy_tree(location, aside, zipped)
            self._put_marker(ASIDE + staging, {"location": location, **marker})
        study_uid = (marker or {}).get("study_uid") or self._study_uid_in(staging)
        # the location is unlisted while it is replaced; the aside copy (or the source)
        # holds every instance meanwhile
        self.bucket.delete([COMPLETE + location])
        self._zips.forget(location)
        self._copy_tree(staging, location, zipped)
        # the new copy is in studyvault again, even if the old one was moved out
        self.bucket.delete([MOVED_OUT + location])
        stamp = dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()
        self._publish_marker(
            location,
            {
                "study_uid": study_uid,
                "staging": staging,
                "stored": stamp,
            },
        )
        self._cleanup(staging, aside, zipped)
        try:
            self.bucket.put_bytes(LAST_STORED, (stamp + "\n").encode())
        except StorageError as exc:  # shown in lists only
            log.warning("%s: cannot record the last store time: %s", self.name, exc)

    def _publish_marker(self, location: str, fields: dict[str, Any]) -> None:
        """Write the "study complete" marker: the study is listed from now on."""
        self._put_marker(COMPLETE + location, fields)

    def _cleanup(self, staging: str, aside: str, zipped: bool) -> None:
        # the new copy is published (its marker written): staging and the copy kept
        # aside are no longer needed
        self._zips.forget(staging)
        self._ahead.forget(staging)
        self._delete_tree(staging, zipped)
        self._delete_tree(aside, zipped)
        self.bucket.delete([ASIDE + staging])

    def _study_uid_in(self, location: str) -> str:
        try:
            with self.open_file(location, DICOMDIR) as f:
                from pydicom import dcmread

                records = dcmread(f, force=True).DirectoryRecordSequence
            return next(
                str(r.StudyInstanceUID) for r in records if r.DirectoryRecordType == "STUDY"
            )
        except Exception:  # a marker without it still lists the study
            return ""

    def discard_staging(self, plan: StorePlan) -> None:
        staging = _check(plan.staging, "staging name")
        aside_marker = self._marker(ASIDE + staging)
        if aside_marker is not None:
            location = _check(str(aside_marker.get("location", "")))
            zipped = is_zip(location)
            if self._marker(COMPLETE + location) is None:
                # a publish was interrupted after it set the old copy aside: put it back
                self._copy_tree(staging + ".old", location, zipped)
                fields = {k: v for k, v in aside_marker.items() if k != "location"}
                self._publish_marker(location, fields)
                self._zips.forget(location)
        else:
            zipped = is_zip(plan.location) or is_zip(staging)
        self._cleanup(staging, staging + ".old", zipped)

    # -- reading ----------------------------------------------------------------------
    def open_file(self, location: str, path: str) -> IO[bytes]:
        location = _check(location)
        _check(path, "file path")
        if is_zip(location):
            return self._zips.open(self.bucket, location, path)
        if location.startswith(STAGING + "/"):
            # the engine verifies staging by opening every file in turn: read them all
            # back from the bucket in parallel as soon as the first is asked for
            return self._ahead.open(location, path, lambda: self._tree(location, False))
        return self.bucket.open(f"{location}/{path}")

    def iter_studies(self) -> Iterator[str]:
        for rel, _ in self.bucket.list_keys(COMPLETE):
            location = rel[len(COMPLETE) :]
            if is_safe_relpath(location):
                yield location

    def iter_files(self, location: str) -> Iterator[tuple[str, Opener]]:
        location = _check(location)
        if is_zip(location):
            members = self._zips.members(self.bucket, location)
            for name, info in sorted(members.items()):
                if not info.is_dir() and name not in NOT_INSTANCES:
                    yield name, (lambda name=name: self._zips.open(self.bucket, location, name))
            return
        for path, _ in self._tree(location, False):
            if path in NOT_INSTANCES or any(p.startswith(".") for p in path.split("/")):
                continue
            yield path, (lambda rel=f"{location}/{path}": self.bucket.open(rel))

    # -- moved out of studyvault ------------------------------------------------------
    def mark_moved_out(self, location: str) -> None:
        location = _check(location)
        if self._marker(COMPLETE + location) is None:
            raise StorageError(f"{self.name}: no study at {location}")
        stamp = dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()
        self._put_marker(MOVED_OUT + location, {"moved_out": stamp})

    def is_moved_out(self, location: str) -> bool:
        return self.bucket.head(MOVED_OUT + _check(location)) is not None

    # -- removing ---------------------------------------------------------------------
    def remove_study(self, location: str) -> None:
        location = _check(location)
        zipped = is_zip(location)
        self._zips.forget(location)
        # the engine calls this only once a verified copy elsewhere is committed in the
        # index, or for a delete the user confirmed; unlisted first, then the files
        self.bucket.delete([COMPLETE + location])
        self._delete_tree(location, zipped)
        self.bucket.delete([MOVED_OUT + location])

    def staging_leftovers(self) -> list[str]:
        return sorted(set(self.bucket.list_names(STAGING + "/")))

    def key(self) -> dict[str, Any]:
        """The identity object's fields (raises StorageError when it cannot be read)."""
        key = self._read_key()
        if key is None:
            raise StorageError(f"{self.bucket.url}{KEY_NAME}: key not found")
        return key


def _wait(futures: list[Future[Any]]) -> None:
    """Wait for every upload or copy; raise the first failure once all are done."""
    error: BaseException | None = None
    for future in futures:
        try:
            future.result()
        except BaseException as exc:  # noqa: B036 - re-raised below
            error = error or exc
    if error is not None:
        raise error


class _Hashing:
    """A read-only stream that hashes what is read through it."""

    def __init__(self, src: IO[bytes]) -> None:
        self._src = src
        self.digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._src.read(size)
        self.digest.update(data)
        return data


class _ReadAhead:
    """Reads every object of a staged study back from the bucket in parallel, into
    spooled temporary files (memory, then disk), for the verification that follows
    the upload. Every byte handed out came from a GET issued after the upload."""

    def __init__(self, bucket: Callable[[], Bucket], spool_bytes: int = 4 << 20) -> None:
        self._get_bucket = bucket
        self._spool = spool_bytes
        self._lock = threading.Lock()
        self._started: set[str] = set()
        self._pending: dict[str, Future[IO[bytes]]] = {}

    @property
    def _bucket(self) -> Bucket:
        return self._get_bucket()

    def _fetch(self, rel: str) -> IO[bytes]:
        out = tempfile.SpooledTemporaryFile(self._spool)
        try:
            with self._bucket.open(rel) as src:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
        except BaseException:
            out.close()
            raise
        out.seek(0)
        return out

    def open(self, staging: str, path: str, tree: Callable[[], list[tuple[str, int]]]) -> IO[bytes]:
        rel = f"{staging}/{path}"
        with self._lock:
            start = staging not in self._started
            self._started.add(staging)
        if start:
            futures = {
                f"{staging}/{p}": self._bucket.pool.submit(self._fetch, f"{staging}/{p}")
                for p, _ in tree()
                if p not in (path, layout.MANIFEST)
            }
            with self._lock:
                self._pending.update(futures)
        with self._lock:
            future = self._pending.pop(rel, None)
        if future is None:
            return self._bucket.open(rel)
        return future.result()

    def forget(self, staging: str) -> None:
        with self._lock:
            self._started.discard(staging)
            drop = [k for k in self._pending if k.startswith(staging + "/")]
            futures = [self._pending.pop(k) for k in drop]
        for future in futures:
            if not future.cancel():
                try:
                    future.result().close()
                except Exception:  # a failed read-ahead: nothing to close
                    pass


class _ZipCache:
    """Zipped studies are read from a local copy, downloaded once per object version
    (its ETag) and remembered, so verifying every member reads the object once."""

    def __init__(self, size: int = 2) -> None:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._files: OrderedDict[str, tuple[str, Path, float]] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()
        self._reader = ZipReader()

    def _local(self, bucket: Bucket, rel: str) -> Path:
        with self._lock:
            cached = self._files.get(rel)
            fresh = cached is not None and time.monotonic() - cached[2] < TRUST_SECONDS
            if cached is not None and fresh and rel.startswith(STAGING + "/"):
                # a staging zip (a new name each attempt) just downloaded: verifying it
                # opens every member in turn
                self._files.move_to_end(rel)
                return cached[1]
        head = bucket.head(rel)
        if head is None:
            raise StorageError(f"{bucket.url}{rel}: no such object")
        etag = str(head.get("ETag", ""))
        with self._lock:
            cached = self._files.get(rel)
            if cached is not None and cached[0] == etag and cached[1].exists():
                self._files[rel] = (etag, cached[1], time.monotonic())
                self._files.move_to_end(rel)
                return cached[1]
        with self._lock:
            if self._tmp is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="studyvault-s3-zips-")
            folder = self._tmp.name
        path = Path(folder) / f"{uuid.uuid4().hex}.zip"
        with open(path, "wb") as out:
            bucket.download(rel, out)
        with self._lock:
            old = self._files.pop(rel, None)
            self._files[rel] = (etag, path, time.monotonic())
            drop = [old[1]] if old else []
            while len(self._files) > self._size:
                drop.append(self._files.popitem(last=False)[1][1])
        for stale in drop:
            self._reader.forget(stale)
            stale.unlink(missing_ok=True)
        return path

    def members(self, bucket: Bucket, rel: str) -> dict[str, Any]:
        return self._reader.members(self._local(bucket, rel))

    def open(self, bucket: Bucket, rel: str, name: str) -> IO[bytes]:
        return self._reader.open(self._local(bucket, rel), name)

    def forget(self, rel: str) -> None:
        with self._lock:
            cached = self._files.pop(rel, None)
        if cached is not None:
            self._reader.forget(cached[1])
            try:
                os.unlink(cached[1])
            except OSError:
                pass
