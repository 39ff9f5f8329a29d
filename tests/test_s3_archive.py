"""The S3 archive against a real S3 server process on loopback (moto's server mode):
the conformance suite, archive -> fetch -> return through the CLI, a killed upload
run again, and an endpoint that is down."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from s3server import CREDENTIALS, S3Server, free_port

from studyvault.errors import IntegrityError, StorageError
from studyvault.fetch import return_due
from studyvault.plugins.s3_archive import S3Archive, S3ArchiveConfig
from studyvault.plugins.s3_archive.bucket import Bucket
from studyvault.storage import Status, Storage
from studyvault.testing import StorageConformance, make_source_study, store
from studyvault.testing.conformance import read_back, verify_staging
from studyvault.testing.dicomgen import make_study
from studyvault.transfer import verify_staged
from studyvault.vault import Vault

BUCKET = "studyvault-tests"


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    server = S3Server()
    server.create_bucket(BUCKET)
    yield server
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def s3_archive(endpoint: str, tmp_path: Path, **options: object) -> S3Archive:
    options.setdefault("prefix", f"t-{uuid.uuid4().hex[:12]}/")
    config = S3ArchiveConfig(
        name="Cloud Archive",
        id=str(uuid.uuid4()),
        path=str(tmp_path / "unused-local-root"),
        bucket=BUCKET,
        endpoint_url=endpoint,
        **options,  # type: ignore[arg-type]
    )
    return S3Archive(config)


class _S3Conformance(StorageConformance):
    naming = "readable"
    zip = False

    @pytest.fixture(autouse=True)
    def _server(self, s3: S3Server) -> None:
        self.endpoint = s3.url

    def make_storage(self, tmp_path: Path, *, min_free_mb: int = 0) -> Storage:
        return s3_archive(
            self.endpoint, tmp_path, min_free_mb=min_free_mb, naming=self.naming, zip=self.zip
        )

    def interrupt_publish(self, monkeypatch: pytest.MonkeyPatch) -> None:
        # a power cut after the new files were copied, before the "complete" marker
        def fail(*args: object) -> None:
            raise OSError("simulated power cut during publish")

        monkeypatch.setattr(S3Archive, "_publish_marker", fail)

    def test_create_refuses_a_folder_holding_other_files(self, tmp_path: Path) -> None:
        storage = self.make_storage(tmp_path)
        assert isinstance(storage, S3Archive)
        storage.bucket.put_bytes("holiday.jpg", b"not ours")
        with pytest.raises(StorageError, match="not empty"):
            storage.create()
        assert storage.bucket.list_keys("") == [("holiday.jpg", 8)]
        assert storage.status() is Status.OFFLINE  # not adopted either


class TestS3ArchiveReadable(_S3Conformance):
    naming, zip = "readable", False


class TestS3ArchiveUidZip(_S3Conformance):
    naming, zip = "uid", True


def test_study_is_a_dicom_file_set_with_marker_and_encryption(s3, tmp_path):
    archive = s3_archive(s3.url, tmp_path, sse="AES256")
    archive.create()
    source = make_source_study(tmp_path / "src", n_instances=3, patient_name="OBJECT^STORE")
    plan = store(archive, source)
    prefix = archive.bucket.prefix
    keys = [rel for rel, _ in archive.bucket.list_keys("")]
    assert "studyvault_archive.key" in keys
    assert f"complete/{plan.location}" in keys
    assert f"{plan.location}/DICOMDIR" in keys and f"{plan.location}/manifest-sha256.txt" in keys
    assert not [k for k in keys if k.startswith("staging/")]
    head = s3.client().head_object(Bucket=BUCKET, Key=f"{prefix}{plan.location}/DICOMDIR")
    assert head["ServerSideEncryption"] == "AES256"
    manifest = archive.bucket.get_bytes(f"{plan.location}/manifest-sha256.txt")
    assert manifest is not None and manifest.decode().count("  DICOM/") == 3
    assert "s3://" in archive.describe() and "SSE AES256" in archive.describe()


@pytest.mark.parametrize("zipped", [False, True])
def test_new_study_is_uploaded_to_its_location_and_listed_only_when_published(s3, tmp_path, zipped):
    archive = s3_archive(s3.url, tmp_path, zip=zipped)
    archive.create()
    source = make_source_study(tmp_path / "src")
    plan = archive.plan_store(source.study, source.instances)
    assert plan.staging.startswith("staging/") and plan.staging.endswith(".direct")
    archive.write_staging(plan, source.study, source.items())
    # the files are at the location, but the "complete" marker is not (a killed run)
    keys = [rel for rel, _ in archive.bucket.list_keys("")]
    assert any(k.startswith(plan.location) for k in keys) and plan.staging in keys
    assert list(archive.iter_studies()) == []
    assert archive.staging_leftovers() == [plan.staging]
    verify_staging(archive, plan, source)
    archive.publish(plan)  # a resumed run publishes it again: nothing changes
    archive.publish(plan)
    assert list(archive.iter_studies()) == [plan.location]
    assert archive.staging_leftovers() == []
    assert set(read_back(archive, plan.location).values()) == source.digests()


def test_killed_direct_upload_is_discarded_by_check_repair(s3, tmp_path):
    archive = s3_archive(s3.url, tmp_path)
    archive.create()
    source = make_source_study(tmp_path / "src")
    plan = archive.plan_store(source.study, source.instances)
    archive.write_staging(plan, source.study, source.items())
    # a fresh process (`check --repair`) knows only the leftover's name
    again = S3Archive(archive.config)
    [leftover] = again.staging_leftovers()
    again.discard_staging(type(plan)(location=leftover, staging=leftover, paths={}))
    assert [rel for rel, _ in archive.bucket.list_keys("")] == ["studyvault_archive.key"]


@pytest.mark.parametrize(("verify", "read_back_files"), [("checksum", 0), ("readback", 4)])
def test_verification_by_checksum_reads_nothing_back(s3, tmp_path, verify, read_back_files):
    archive = s3_archive(s3.url, tmp_path, verify=verify)
    archive.create()
    source = make_source_study(tmp_path / "src", n_instances=4)
    plan = archive.plan_store(source.study, source.instances)
    archive.write_staging(plan, source.study, source.items())
    gets: list[str] = []
    archive.bucket.client.meta.events.register(
        "before-send.s3.GetObject", lambda request, **_: gets.append(request.url)
    )
    verify_staged(archive, plan, source.instances)
    assert len(gets) == read_back_files
    archive.publish(plan)
    assert set(read_back(archive, plan.location).values()) == source.digests()


def test_an_upload_the_server_does_not_confirm_is_read_back(s3, tmp_path, monkeypatch):
    archive = s3_archive(s3.url, tmp_path)
    archive.create()
    source = make_source_study(tmp_path / "src", n_instances=3)
    plan = archive.plan_store(source.study, source.instances)
    # a store whose ETags are not MD5s and that ignores x-amz-checksum-sha256
    original = Bucket.put_bytes

    def unconfirmed(self: Bucket, rel: str, data: bytes, sha256: str | None = None) -> str:
        original(self, rel, data, sha256)
        return ""

    monkeypatch.setattr(Bucket, "put_bytes", unconfirmed)
    archive.write_staging(plan, source.study, source.items())
    assert archive.verified_on_write(plan, source.instances) == set()


def test_an_object_replaced_after_its_upload_is_read_back(s3, tmp_path):
    archive = s3_archive(s3.url, tmp_path)
    archive.create()
    source = make_source_study(tmp_path / "src", n_instances=3)
    plan = archive.plan_store(source.study, source.instances)
    archive.write_staging(plan, source.study, source.items())
    first = source.instances[0]
    key = f"{archive.bucket.prefix}{plan.location}/{plan.paths[first.sop_uid]}"
    body = s3.client().get_object(Bucket=BUCKET, Key=key)["Body"].read()
    damaged = body[:-1] + bytes([body[-1] ^ 1])  # same size, one bit flipped
    s3.client().put_object(Bucket=BUCKET, Key=key, Body=damaged)
    vouched = archive.verified_on_write(plan, source.instances)
    assert vouched == {i.sop_uid for i in source.instances[1:]}
    with pytest.raises(IntegrityError, match="does not match"):
        verify_staged(archive, plan, source.instances)


def test_partial_merge_publish_is_never_listed(s3, tmp_path):
    archive = s3_archive(s3.url, tmp_path)
    archive.create()
    source = make_source_study(tmp_path / "src")
    first = store(archive, source)
    grown = source.with_instance(tmp_path / "grown.dcm")
    plan = archive.plan_store(grown.study, grown.instances)
    assert plan.location == first.location and not plan.staging.endswith(".direct")
    archive.write_staging(plan, grown.study, grown.items())
    verify_staging(archive, plan, grown)
    archive.publish(plan)
    assert list(archive.iter_studies()) == [plan.location]
    assert set(read_back(archive, plan.location).values()) == grown.digests()
    assert archive.staging_leftovers() == []


def test_moved_out_mark_is_kept_until_the_study_is_stored_again(s3, tmp_path):
    archive = s3_archive(s3.url, tmp_path)
    archive.create()
    source = make_source_study(tmp_path / "src")
    plan = store(archive, source)
    archive.mark_moved_out(plan.location)
    assert archive.is_moved_out(plan.location)
    assert list(archive.iter_studies()) == [plan.location]  # still there, left out by rebuild
    store(archive, source)  # the study came back into studyvault
    assert not archive.is_moved_out(plan.location)
    with pytest.raises(StorageError, match="no study"):
        archive.mark_moved_out("studies/elsewhere")


def test_orphan_staging_is_listed_and_discarded(s3, tmp_path):
    archive = s3_archive(s3.url, tmp_path, zip=True)
    archive.create()
    source = make_source_study(tmp_path / "src")
    plan = archive.plan_store(source.study, source.instances)
    archive.write_staging(plan, source.study, source.items())
    assert archive.staging_leftovers() == [plan.staging]
    # what `studyvault check --repair` does with staging no journal entry refers to
    archive.discard_staging(type(plan)(location=plan.staging, staging=plan.staging, paths={}))
    assert archive.staging_leftovers() == []
    assert [rel for rel, _ in archive.bucket.list_keys("")] == ["studyvault_archive.key"]


def test_endpoint_down_is_offline_quickly(tmp_path):
    archive = s3_archive(f"http://127.0.0.1:{free_port()}", tmp_path, connect_timeout_s=1)
    started = time.monotonic()
    assert archive.status() is Status.OFFLINE
    assert time.monotonic() - started < 10
    with pytest.raises(StorageError):
        archive.create()


def test_missing_bucket_is_offline(s3, tmp_path):
    config = S3ArchiveConfig(
        name="Nowhere", id=str(uuid.uuid4()), bucket="no-such-bucket", endpoint_url=s3.url
    )
    assert S3Archive(config).status() is Status.OFFLINE


def test_config_refuses_bad_options(tmp_path):
    with pytest.raises(ValueError, match="sse"):
        S3ArchiveConfig(name="x", bucket="b", sse="rot13")
    with pytest.raises(ValueError, match="naming"):
        S3ArchiveConfig(name="x", bucket="b", naming="short")


# -- through the command line -----------------------------------------------------------


def add_s3_archive(home: Path, endpoint: str, prefix: str) -> None:
    """What docs/s3-archives.md tells an admin to add to studyvault.toml."""
    cfg = home / "studyvault.toml"
    text = cfg.read_text().replace("stable_age_minutes = 10.0", "stable_age_minutes = 0.0")
    text += (
        "\n[[archives]]\n"
        'name = "Cloud Archive"\n'
        'kind = "s3"\n'
        f'id = "{uuid.uuid4()}"\n'
        f'endpoint_url = "{endpoint}"\n'
        f'bucket = "{BUCKET}"\n'
        f'prefix = "{prefix}"\n'
        "min_free_mb = 0\n"
    )
    cfg.write_text(text)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def online_hashes(home: Path) -> list[str]:
    return sorted(sha(p) for p in (home / "images" / "studies").rglob("*.dcm"))


def test_archive_fetch_and_return_through_the_cli(s3, home, run, add_task, tmp_path):
    add_s3_archive(home, s3.url, f"cli-{uuid.uuid4().hex[:8]}")
    files = make_study(tmp_path / "src", n_instances=3, patient_name="CLOUD^ME")
    assert run("import", tmp_path / "src").code == 0
    listed = run("archives", "list", "--json").json()
    [row] = [r for r in listed if r["name"] == "Cloud Archive"]
    assert row["kind"] == "s3" and row["status"] == "Online"
    table = run("archives", "list")
    assert table.code == 0 and f"s3://{BUCKET}/cli-" in table.out
    assert add_task("A", "archive", "--all", to="Cloud Archive").code == 0
    result = run("tasks", "run", "A")
    assert result.code == 0, result.err
    [study] = run("studies", "--json").json()
    assert study["status"] == "archived" and online_hashes(home) == []
    uid = study["study_uid"]

    result = run("study", "fetch", uid)
    assert result.code == 0, result.err
    assert online_hashes(home) == sorted(sha(p) for p in files)
    with Vault.open() as vault:
        results = return_due(vault, today=dt.date.today() + dt.timedelta(days=15))
    assert [r.outcome for r in results] == ["returned"]
    assert online_hashes(home) == []
    [study] = run("studies", "--json").json()
    assert study["status"] == "archived"

    # the bucket alone is enough to rebuild the index
    assert run("index", "rebuild").code == 0
    [study] = run("studies", "--json").json()
    assert study["study_uid"] == uid and study["instances"] == 3

    assert run("archives", "unmount", "Cloud Archive", "--confirm", "UNMOUNT").code == 0
    [row] = [r for r in run("archives", "list", "--json").json() if r["name"] == "Cloud Archive"]
    assert row["status"] == "Unmounted"
    failed = run("study", "fetch", uid)
    assert failed.code == 2 and "unmounted" in failed.err


def test_archive_task_pauses_when_the_endpoint_is_down(home, run, add_task, tmp_path):
    add_s3_archive(home, f"http://127.0.0.1:{free_port()}", "down")
    make_study(tmp_path / "src", n_instances=2)
    assert run("import", tmp_path / "src").code == 0
    [row] = [r for r in run("archives", "list", "--json").json() if r["name"] == "Cloud Archive"]
    assert row["status"] == "Offline"
    add_task("A", "archive", "--all", to="Cloud Archive")
    run("tasks", "run", "A")
    [study] = run("studies", "--json").json()
    assert study["status"] == "online"  # nothing lost, nothing marked archived


#: ``tasks run A`` in a process that SIGKILLs itself at its N-th object upload (argv[1])
KILLED_MID_UPLOAD = """
import os, signal, sys, threading
from studyvault.cli import main
from studyvault.plugins.s3_archive.bucket import Bucket

original, lock, count = Bucket.put_bytes, threading.Lock(), [0]

def put_bytes(self, rel, data, sha256=None):
    with lock:
        count[0] += 1
        if count[0] == int(sys.argv[1]):
            os.kill(os.getpid(), signal.SIGKILL)
    return original(self, rel, data, sha256)

Bucket.put_bytes = put_bytes
main(["tasks", "run", "A"])
"""


@pytest.mark.parametrize(
    "failpoint",
    [
        "journaled:2",
        "put:10",  # study 1 takes 7 PUTs; study 2: its upload marker, then its files
        "staged:2",
        "verified:2",
        "published:2",
    ],
)
def test_killed_upload_then_run_again_lists_no_partial_study(
    s3, home, run, add_task, tmp_path, failpoint
):
    prefix = f"crash-{uuid.uuid4().hex[:8]}"
    add_s3_archive(home, s3.url, prefix)
    hashes = []
    for i in range(4):
        paths = make_study(tmp_path / "src" / str(i), n_instances=2, patient_name=f"KILL^{i}")
        hashes += [sha(p) for p in paths]
    assert run("import", tmp_path / "src").code == 0
    add_task("A", "archive", "--all", to="Cloud Archive")
    if failpoint.startswith("put:"):
        argv = [sys.executable, "-c", KILLED_MID_UPLOAD, failpoint.removeprefix("put:")]
        env = dict(os.environ)
    else:
        argv = [sys.executable, "-m", "studyvault", "tasks", "run", "A"]
        env = {**os.environ, "STUDYVAULT_FAILPOINT": failpoint}
    crashed = subprocess.run(argv, env=env, capture_output=True)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    with Vault.open() as vault:
        archive = vault.storage("Cloud Archive")
        listed = list(archive.iter_studies())
        assert len(listed) in (1, 2)  # the one killed mid-way is listed only once published
        if failpoint.startswith("put:"):  # killed with an upload under way
            assert [n.endswith(".direct") for n in archive.staging_leftovers()] == [True]
            assert len(listed) == 1
        # every instance still has a whole copy somewhere
        online = set(online_hashes(home))
        in_archive = {
            hashlib.sha256(opener().read()).hexdigest()
            for location in listed
            for _, opener in archive.iter_files(location)
        }
        assert set(hashes) <= online | in_archive

    result = run("tasks", "run", "A")
    assert result.code == 0, result.err
    studies = run("studies", "--json").json()
    assert len(studies) == 4 and {s["status"] for s in studies} == {"archived"}
    with Vault.open() as vault:
        archive = vault.storage("Cloud Archive")
        assert archive.staging_leftovers() == []
        assert list(vault.index.iter_journal()) == []
        found = [
            hashlib.sha256(opener().read()).hexdigest()
            for location in archive.iter_studies()
            for _, opener in archive.iter_files(location)
        ]
    assert sorted(found) == sorted(hashes)
    assert online_hashes(home) == []


# -- archives add / mount / unmount for S3 ------------------------------------------------


def cloud_row(run, name: str = "Cloud Archive", *config: object) -> dict:
    rows = run(*config, "archives", "list", "--json").json()
    return next(r for r in rows if r["name"] == name)


def archive_all(run, *config: object) -> None:
    added = run(
        *config,
        "tasks",
        "add",
        "A",
        "--action",
        "archive",
        "--from",
        "Image Center Storage",
        "--to",
        "Cloud Archive",
        "--all",
        "--throttle-ms",
        "0",
    )
    assert added.code == 0, added.err
    result = run(*config, "tasks", "run", "A")
    assert result.code == 0, result.err


def stable_now(home: Path) -> None:
    cfg = home / "studyvault.toml"
    cfg.write_text(cfg.read_text().replace("stable_age_minutes = 10.0", "stable_age_minutes = 0.0"))


def test_add_an_s3_archive_with_the_cli(s3, home, run):
    prefix = f"add-{uuid.uuid4().hex[:8]}"
    result = run(
        "archives",
        "add",
        "Cloud Archive",
        f"s3://{BUCKET}/{prefix}",
        "--endpoint-url",
        s3.url,
        "--sse",
        "AES256",
        "--naming",
        "uid",
        "--option",
        "workers=4",
        "-o",
        "verify=readback",
    )
    assert result.code == 0, result.err
    assert f"s3://{BUCKET}/{prefix}/" in result.out and "SSE AES256" in result.out
    row = cloud_row(run)
    assert (row["kind"], row["status"], row["path"]) == ("s3", "Online", f"s3://{BUCKET}/{prefix}/")
    assert "Cloud Archive" in run("archives", "list").out
    text = (home / "studyvault.toml").read_text()
    assert 'kind = "s3"' in text and "workers = 4" in text and 'verify = "readback"' in text
    assert "testing" not in text  # the credentials stay in the environment
    key = s3.client().get_object(Bucket=BUCKET, Key=f"{prefix}/studyvault_archive.key")
    body = key["Body"].read().decode()
    assert f'id = "{row["id"]}"' in body and 'naming = "uid"' in body

    # the same prefix again, under another name: it is that archive already
    again = run("archives", "add", "Twin", f"s3://{BUCKET}/{prefix}", "--endpoint-url", s3.url)
    assert again.code == 2 and "already" in again.err and len(again.err.splitlines()) == 1


def test_add_s3_archive_with_bucket_and_prefix_options(s3, home, run):
    prefix = f"opt-{uuid.uuid4().hex[:8]}"
    result = run(
        "archives", "add", "Cloud Archive", "--bucket", BUCKET, "--prefix", prefix,
        "--endpoint-url", s3.url, "--zip", "--json",
    )  # fmt: skip
    assert result.code == 0, result.err
    assert result.json()["status"] == "Online" and "zip" in result.json()["description"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--kind", "s3", "--endpoint-url", "{url}"], "--bucket: required"),
        (["s3://no-such-bucket/p", "--endpoint-url", "{url}"], "does not exist"),
        (["s3://{bucket}/p", "--endpoint-url", "{down}", "-o", "connect_timeout_s=1"],
         "cannot be reached"),
        (["s3://{bucket}/p", "--endpoint-url", "{url}", "-o", "aws_secret_access_key=s3cr3t"],
         "credentials are never stored"),
        (["s3://{bucket}/p", "--endpoint-url", "http://AKIA:s3cr3t@127.0.0.1:9"],
         "must not hold credentials"),
        (["s3://{bucket}/p", "--endpoint-url", "{url}", "--sse", "rot13"], "sse must be"),
        (["s3://{bucket}/p", "--endpoint-url", "{url}", "-o", "colour=blue"],
         "not a setting of s3 archives"),
        (["s3://{bucket}/p", "--endpoint-url", "{url}", "-o", "workers=many"], "--workers"),
        (["s3://{bucket}/p", "--bucket", "other", "--endpoint-url", "{url}"], "contradicts"),
        (["{tmp}", "--bucket", "{bucket}"], "not a setting of folder archives"),
    ],
)  # fmt: skip
def test_add_s3_archive_refusals_are_one_line(s3, home, run, tmp_path, args, message):
    before = (home / "studyvault.toml").read_text()
    values = {
        "url": s3.url,
        "bucket": BUCKET,
        "down": f"http://127.0.0.1:{free_port()}",
        "tmp": str(tmp_path / "folder"),
    }
    argv = [a.format(**values) for a in args]
    if argv[0] == str(tmp_path / "folder"):
        argv[1:1] = ["--kind", "folder"]
    result = run("archives", "add", "Cloud Archive", *argv)
    assert result.code == 2, result.out
    assert message in result.err and len(result.err.strip().splitlines()) == 1, result.err
    assert (home / "studyvault.toml").read_text() == before  # nothing half-written
    assert "s3cr3t" not in (home / "studyvault.toml").read_text()


def test_add_refuses_a_prefix_holding_other_objects(s3, home, run):
    prefix = f"busy-{uuid.uuid4().hex[:8]}"
    s3.client().put_object(Bucket=BUCKET, Key=f"{prefix}/holiday.jpg", Body=b"x")
    result = run("archives", "add", "Cloud Archive", f"s3://{BUCKET}/{prefix}",
                 "--endpoint-url", s3.url)  # fmt: skip
    assert result.code == 2 and "not empty" in result.err


def test_unmount_and_mount_an_s3_archive_again(s3, home, run, tmp_path):
    stable_now(home)
    prefix = f"mnt-{uuid.uuid4().hex[:8]}"
    url = f"s3://{BUCKET}/{prefix}"
    assert run("archives", "add", "Cloud Archive", url, "--endpoint-url", s3.url).code == 0
    make_study(tmp_path / "src", n_instances=2, patient_name="MOUNT^ME")
    assert run("import", tmp_path / "src").code == 0
    archive_all(run)

    refused = run("archives", "unmount", "Cloud Archive")
    assert refused.code == 2 and "--confirm UNMOUNT" in refused.err
    result = run("archives", "unmount", "Cloud Archive", "--confirm", "UNMOUNT")
    assert result.code == 0 and f"archives mount {url}/" in result.out
    assert cloud_row(run)["status"] == "Unmounted"
    [study] = run("studies", "--json").json()
    assert study["status"] == "archived"

    # settings not given (the endpoint) are kept from the archive's config entry
    result = run("archives", "mount", f"{url}/")
    assert result.code == 0, result.err
    assert "Mounted archive Cloud Archive" in result.out
    row = cloud_row(run)
    assert (row["status"], row["studies"]) == ("Online", 1)
    assert run("study", "fetch", study["study_uid"]).code == 0


def test_mount_an_unknown_s3_archive_registers_it_and_indexes_its_studies(s3, home, run, tmp_path):
    stable_now(home)
    prefix = f"new-{uuid.uuid4().hex[:8]}"
    url = f"s3://{BUCKET}/{prefix}"
    assert run("archives", "add", "Cloud Archive", url, "--endpoint-url", s3.url).code == 0
    make_study(tmp_path / "src", n_instances=3, patient_name="SECOND^SITE")
    assert run("import", tmp_path / "src").code == 0
    archive_all(run)
    [study] = run("studies", "--json").json()

    other = tmp_path / "other"
    assert run("init", other).code == 0
    config = ("--config", other / "studyvault.toml")
    empty = run(*config, "archives", "mount", f"s3://{BUCKET}/nothing-{uuid.uuid4().hex[:6]}",
                "--endpoint-url", s3.url)  # fmt: skip
    assert empty.code == 2 and "holds no archive key" in empty.err
    down = run(*config, "archives", "mount", url, "--endpoint-url",
               f"http://127.0.0.1:{free_port()}", "-o", "connect_timeout_s=1")  # fmt: skip
    assert down.code == 2 and "cannot be reached" in down.err
    assert len(down.err.strip().splitlines()) == 1
    result = run(*config, "archives", "mount", url, "--endpoint-url", s3.url, "--json")
    assert result.code == 0, result.err
    mounted = result.json()
    assert mounted["registered"] and mounted["studies_indexed"] == 1
    assert mounted["archive"]["name"] == "Cloud Archive"
    assert mounted["archive"]["kind"] == "s3" and mounted["archive"]["status"] == "Online"
    [found] = run(*config, "studies", "--json").json()
    assert (found["study_uid"], found["status"], found["instances"]) == (
        study["study_uid"],
        "archived",
        3,
    )
    text = (other / "studyvault.toml").read_text()
    assert f'endpoint_url = "{s3.url}"' in text and f'prefix = "{prefix}"' in text
