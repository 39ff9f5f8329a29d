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
    staging/<token>.direct          upload marker of a new study being uploaded straight
                                    to its location (names the location)
    staging/<token>[.zip]           a merge in progress (a study already stored here)
    staging/<token>.old             the previous copy, kept aside while a merge publishes
    aside/<staging>                 marker: the aside copy is complete (and where it
                                    belongs)

A new study's objects go straight to its location, which stays unlisted until the
"complete" marker: publishing is writing that marker, and discarding an unpublished
upload deletes the objects at the location its upload marker names. S3 has no
rename, so a merge (a study that grew returns) is uploaded to staging and published
by a server-side copy, then the marker; a half-done merge publish is either finished
by running it again or undone by :meth:`S3Archive.discard_staging`, which puts the
aside copy back.
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
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import urlsplit

import tomlkit

from studyvault.errors import IntegrityError, StorageError, StorageOfflineError
from studyvault.keyfile import FORMAT_VERSION
from studyvault.naming import is_safe_relpath
from studyvault.plugins.folder_archive import layout
from studyvault.plugins.folder_archive.fileset import file_set_items, manifest, write_zip
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
#: suffix of the upload marker of a new study uploaded straight to its location
DIRECT = ".direct"
STAGING = layout.STAGING
LAST_STORED = layout.LAST_STORED
NAMINGS = ("readable", "uid")
SSE_MODES = ("", "AES256", "aws:kms")
VERIFY_MODES = ("checksum", "readback")
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
    :param verify: ``checksum``: an object whose upload the server confirmed with the
        SHA-256 recorded in the index is not read back (the others are);
        ``readback``: every staged object is read back and hashed.
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
    verify: str = "checksum"
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
        if self.verify not in VERIFY_MODES:
            raise ValueError(f"verify must be 'checksum' or 'readback', not {self.verify!r}")
        if "@" in urlsplit(self.endpoint_url).netloc:
            raise ValueError(
                "endpoint_url must not hold credentials: give them through the environment "
                "or an AWS profile"
            )


def _is_direct(staging: str) -> bool:
    return staging.endswith(DIRECT)


def _check(rel: str, what: str = "location") -> str:
    if not is_safe_relpath(rel):
        raise StorageError(f"refusing unsafe {what} {rel!r}")
    return rel


class S3Archive(Storage):
    """Archived studies in an S3 bucket, each a DICOM file-set (objects or one zip)."""

    kind = "s3"
    role = Role.ARCHIVE
    config_type = S3ArchiveConfig
    url_scheme = "s3"
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
        self._direct: dict[str, str] = {}  # upload marker -> location (direct uploads)
        # staging -> file ID -> (SHA-256, ETag) of the uploads the server confirmed
        self._confirmed: dict[str, dict[str, tuple[str, str]]] = {}
        self._vouched: dict[str, set[str]] = {}  # upload target -> files not read back
        self._empty: set[str] = set()  # direct plans whose location was just found empty
        self._uploads: dict[str, str] = {}  # direct uploads written here -> study UID

    @classmethod
    def config_from_options(cls, where: str, options: Mapping[str, Any]) -> dict[str, Any]:
        """``s3://bucket/prefix`` (or ``--bucket``/``--prefix``) plus the other settings."""
        fields = dict(options)
        if where:
            parts = urlsplit(where)
            if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
                raise ValueError(f"{where}: an S3 archive is named s3://BUCKET[/PREFIX]")
            for field, value in (("bucket", parts.netloc), ("prefix", parts.path.strip("/"))):
                given = str(fields.get(field, value)).strip("/")
                if given != value:
                    raise ValueError(f"--{field} {given!r} contradicts {where}")
                fields[field] = value
        return fields

    def where(self) -> str:
        return self.url

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
        unpublished: list[str] = []

        def new_location(study: StudyRecord) -> str:
            location, published = self._new_location(study)
            if not published:
                unpublished.append(location)
            return location

        plan = layout.plan_store(study, instances, self.id, new_location, layout.ZIP_SUFFIX)
        if unpublished:
            # a new study is uploaded straight to its location, unlisted until its
            # "complete" marker: no server-side copy; staging names an upload marker
            plan.staging = plan.staging.removesuffix(layout.ZIP_SUFFIX) + DIRECT
            self._empty.add(plan.staging)  # its location was found empty just now
        return plan

    def _new_location(self, study: StudyRecord) -> tuple[str, bool]:
        """A free location for ``study`` (or the one it is published at) and whether a
        copy of it is published there."""
        for location in layout.candidates(study, self.settings.naming, self.settings.zip):
            marker = self._marker(COMPLETE + location)
            if marker is None:
                if not self._tree(location, is_zip(location)):
                    return location, False
            elif marker.get("study_uid") == study.study_uid:
                return location, True
        raise StorageError(f"{self.name}: every location for study {study.study_uid} is taken")

    def _target(self, staging: str) -> str:
        """Where the objects of staging ``staging`` are: below the staging name itself,
        or, for a direct upload, at the location its upload marker names."""
        if not _is_direct(staging):
            return staging
        location = self._direct.get(staging)
        if location is None:
            marker = self._marker(staging) or {}
            location = str(marker.get("location", ""))
            if not location.startswith(layout.STUDIES + "/"):
                raise StorageError(f"{self.bucket.url}{staging}: upload marker names no location")
            self._direct[staging] = _check(location)
        return location

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
        staging = _check(plan.staging, "staging name")
        zipped = is_zip(plan.location)
        # a location plan_store has just found empty and unlisted needs no clearing
        empty = staging in self._empty
        self._empty.discard(staging)
        if _is_direct(staging):
            location = _check(plan.location)
            if not empty and self._marker(COMPLETE + location) is not None:
                raise StorageError(f"{self.name}: {location} was published meanwhile")
            # written first, so a killed upload is found again (`check`, discard_staging)
            self._put_marker(staging, {"location": location, "study_uid": study.study_uid})
            self._direct[staging] = location
        target = self._target(staging)
        self._confirmed.pop(staging, None)
        self._uploads.pop(staging, None)
        self._zips.forget(target)
        self._ahead.forget(target)
        if not empty:
            # a killed attempt's objects (never published: the source holds the study)
            self._delete_tree(target, zipped)
        try:
            if zipped:
                self._write_zip(target, study, items)
            else:
                self._confirmed[staging] = self._write_objects(target, study, items)
            if _is_direct(staging):
                self._uploads[staging] = study.study_uid
        except BaseException:
            # a half-written staging is never published: clear it for the next attempt
            try:
                self._delete_tree(target, zipped)
            except StorageError as exc:
                log.warning("%s: cannot clear staging %s: %s", self.name, staging, exc)
            raise

    def _write_objects(
        self, target: str, study: StudyRecord, items: list[tuple[InstanceRecord, Opener, str]]
    ) -> dict[str, tuple[str, str]]:
        """Upload every file below ``target``; return file ID -> (SHA-256, ETag) of each
        instance the server confirmed it stored byte for byte."""
        bucket = self.bucket
        threshold = self.settings.multipart_threshold_mb * 1024 * 1024
        from studyvault.dicomdir import build_dicomdir  # pydicom loads only when storing

        dicomdir = build_dicomdir(study, [(inst, file_id) for inst, _, file_id in items])
        dicomdir_sha = hashlib.sha256(dicomdir).hexdigest()
        digests = [(DICOMDIR, dicomdir_sha)]
        checksum = self.settings.checksum
        confirmed: dict[str, tuple[str, str]] = {}
        futures: list[Future[Any]] = [
            bucket.pool.submit(
                bucket.put_bytes,
                f"{target}/{DICOMDIR}",
                dicomdir,
                dicomdir_sha if checksum else None,
            )
        ]

        def put(rel: str, file_id: str, data: bytes, digest: str) -> None:
            etag = bucket.put_bytes(rel, data, digest if checksum else None)
            if etag:
                confirmed[file_id] = (digest, etag)

        # small files are read here and uploaded by the pool, a bounded number ahead
        window = self.settings.workers * 2
        for inst, opener, file_id in items:
            rel = f"{target}/{file_id}"
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
                    futures.append(bucket.pool.submit(put, rel, file_id, data, digest))
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
                f"{target}/{layout.MANIFEST}",
                text,
                hashlib.sha256(text).hexdigest() if checksum else None,
            )
        )
        _wait(futures)
        return confirmed

    def _write_zip(
        self, target: str, study: StudyRecord, items: list[tuple[InstanceRecord, Opener, str]]
    ) -> None:
        with tempfile.TemporaryDirectory(prefix="studyvault-s3-") as tmp:
            part = Path(tmp) / "study.zip"
            write_zip(part, study, items)  # checks every instance against the index
            with open(part, "rb") as src:
                self.bucket.upload(target, src)

    def verified_on_write(self, plan: StorePlan, instances: list[InstanceRecord]) -> set[str]:
        """With ``verify = "checksum"``: the instances whose upload the server confirmed
        (ETag = MD5 of the bytes sent, or the SHA-256 echoed) and whose SHA-256, computed
        from those bytes, is the one the index records; one listing then checks that each
        is still that object (same ETag) with its size. The others are read back by the
        engine."""
        confirmed = self._confirmed.pop(plan.staging, None)
        if self.settings.verify != "checksum" or not confirmed:
            return set()
        target = self._target(plan.staging)
        base = target + "/"
        listed = {
            rel[len(base) :]: (size, etag) for rel, size, etag in self.bucket.list_objects(base)
        }
        vouched = set()
        for inst in instances:
            path = plan.paths.get(inst.sop_uid, "")
            digest, etag = confirmed.get(path, ("", ""))
            if digest == inst.sha256 and listed.get(path) == (inst.size, etag):
                vouched.add(inst.sop_uid)
        self._vouched[target] = {plan.paths[uid] for uid in vouched}
        return vouched

    def publish(self, plan: StorePlan) -> None:
        location = _check(plan.location)
        staging = _check(plan.staging, "staging name")
        zipped = is_zip(location)
        if _is_direct(staging):
            self._publish_direct(location, staging, zipped)
            return
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
        self._publish_marker(location, {"study_uid": study_uid, "staging": staging})
        self._cleanup(staging, aside, zipped)
        self._record_last_stored()

    def _publish_direct(self, location: str, staging: str, zipped: bool) -> None:
        """Publish a direct upload: its objects are at ``location`` already; the
        "complete" marker lists it."""
        verified_here = self._uploads.pop(staging, None)
        if verified_here is not None:
            # written and verified by this object just now (its caches are forgotten
            # once published): nothing to look up
            self._publish_marker(location, {"study_uid": verified_here, "staging": staging})
            self._record_last_stored()
        elif self._marker(COMPLETE + location) is None:
            if not self._tree(location, zipped):
                raise StorageError(
                    f"{self.bucket.url}{location}: the upload is missing and it is not published"
                )
            upload = self._marker(staging) or {}
            study_uid = str(upload.get("study_uid", "")) or self._study_uid_in(location)
            self._publish_marker(location, {"study_uid": study_uid, "staging": staging})
            self._record_last_stored()
        # published (its marker written): the upload marker is no longer needed
        self.bucket.delete([staging])
        self._forget(staging, location)

    def _publish_marker(self, location: str, fields: dict[str, Any]) -> None:
        """Write the "study complete" marker: the study is listed from now on."""
        self._put_marker(COMPLETE + location, {"stored": _now(), **fields})

    def _record_last_stored(self) -> None:
        try:
            self.bucket.put_bytes(LAST_STORED, (_now() + "\n").encode())
        except StorageError as exc:  # shown in lists only
            log.warning("%s: cannot record the last store time: %s", self.name, exc)

    def _forget(self, staging: str, target: str) -> None:
        self._direct.pop(staging, None)
        self._uploads.pop(staging, None)
        self._empty.discard(staging)
        self._confirmed.pop(staging, None)
        self._vouched.pop(target, None)
        self._zips.forget(target)
        self._ahead.forget(target)

    def _cleanup(self, staging: str, aside: str, zipped: bool) -> None:
        # the new copy is published (its marker written): staging and the copy kept
        # aside are no longer needed
        self._forget(staging, staging)
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
        if _is_direct(staging):
            upload = self._marker(staging)
            location = str((upload or {}).get("location", ""))
            if not location and plan.location != staging:
                location = plan.location
            if location.startswith(layout.STUDIES + "/") and is_safe_relpath(location):
                if self._marker(COMPLETE + location) is None:
                    # never published: the study is whole in its source (journal phase
                    # "started"), these objects are an unverified upload
                    self._delete_tree(location, is_zip(location))
                self._forget(staging, location)
            self.bucket.delete([staging])
            return
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
        staged = location.startswith(STAGING + "/")
        if staged:
            location = self._target(location)
        if is_zip(location):
            # verifying a staged zip opens every member in turn: trust the copy just
            # downloaded instead of asking for its ETag each time
            return self._zips.open(self.bucket, location, path, trust=staged)
        if staged:
            # the engine verifies staging by opening every file it has not verified in
            # turn: read them all back in parallel as soon as the first is asked for
            skip = self._vouched.get(location, set())
            return self._ahead.open(
                location,
                path,
                lambda: [(p, n) for p, n in self._tree(location, False) if p not in skip],
            )
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


def _now() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()


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
                if p != path and p not in NOT_INSTANCES  # the engine reads instances only
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

    def _local(self, bucket: Bucket, rel: str, trust: bool = False) -> Path:
        with self._lock:
            cached = self._files.get(rel)
            fresh = cached is not None and time.monotonic() - cached[2] < TRUST_SECONDS
            if cached is not None and fresh and (trust or rel.startswith(STAGING + "/")):
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

    def open(self, bucket: Bucket, rel: str, name: str, trust: bool = False) -> IO[bytes]:
        return self._reader.open(self._local(bucket, rel, trust), name)

    def forget(self, rel: str) -> None:
        with self._lock:
            cached = self._files.pop(rel, None)
        if cached is not None:
            self._reader.forget(cached[1])
            try:
                os.unlink(cached[1])
            except OSError:
                pass
