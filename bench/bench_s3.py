"""Benchmark: archiving studies to an S3 archive, against a boto3 ``upload_file`` loop.

Run it as a script (it starts its own S3 server, moto's server mode, on loopback)::

    python bench/bench_s3.py [--studies 20] [--instances 30] [--kb 256] [--zip]
                             [--verify checksum|readback] [--workers 16]
                             [--repeat 3] [--endpoint URL --bucket NAME]

With ``--endpoint`` it uses that S3 server instead (MinIO, Ceph RGW; credentials
from the standard AWS sources). For every pass it times:

backend
    what the transfer protocol does for every study: ``plan_store``,
    ``write_staging`` (instances, DICOMDIR, manifest uploaded in parallel straight to
    the study's prefix), the engine's verification (``verify = "checksum"``: the
    server's confirmation of each upload and one listing; ``readback``: every object
    read back and hashed), ``publish`` (the "complete" marker).
reference
    the same files uploaded one after another with boto3's ``upload_file`` to plain
    keys, no read-back, no DICOMDIR: the least any tool must do.

Passes alternate backend and reference; the median of ``--repeat`` is reported with
the ratio backend / reference (the goal is within 1.3x).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from s3server import CREDENTIALS, S3Server  # noqa: E402

from studyvault.plugins.s3_archive import S3Archive, S3ArchiveConfig  # noqa: E402
from studyvault.testing.conformance import SourceStudy, make_source_study  # noqa: E402
from studyvault.transfer import verify_staged  # noqa: E402


def backend(archive: S3Archive, studies: list[SourceStudy]) -> float:
    started = time.perf_counter()
    for source in studies:
        plan = archive.plan_store(source.study, source.instances)
        archive.write_staging(plan, source.study, source.items())
        verify_staged(archive, plan, source.instances)  # what the engine does
        archive.publish(plan)
    return time.perf_counter() - started


def reference(client: object, bucket: str, prefix: str, studies: list[SourceStudy]) -> float:
    started = time.perf_counter()
    for n, source in enumerate(studies):
        for sop_uid, path in source.files.items():
            client.upload_file(str(path), bucket, f"{prefix}{n}/{sop_uid}")  # type: ignore[attr-defined]
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--instances", type=int, default=30)
    parser.add_argument("--kb", type=int, default=256, help="pixel data per instance")
    parser.add_argument("--zip", action="store_true", help="zip objects instead of folders")
    parser.add_argument("--verify", choices=("checksum", "readback"), default="checksum")
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--endpoint", default="")
    parser.add_argument("--bucket", default="studyvault-bench")
    args = parser.parse_args()

    server = None
    if not args.endpoint:
        os.environ.update(CREDENTIALS)
        server = S3Server()
        server.create_bucket(args.bucket)
        args.endpoint = server.url
    try:
        with tempfile.TemporaryDirectory(prefix="studyvault-bench-s3-") as tmp:
            studies = [
                make_source_study(
                    Path(tmp) / f"s{i}",
                    n_instances=args.instances,
                    n_series=3,
                    patient_name=f"BENCH^{i}",
                    pixel_bytes=args.kb * 1024,
                )
                for i in range(args.studies)
            ]
            files = sum(len(s.instances) for s in studies)
            size = sum(s.study.size for s in studies)
            print(
                f"{args.studies} studies, {files} files, {size / 1e6:.1f} MB, "
                f"{'zip' if args.zip else 'one object per file'}, verify {args.verify}, "
                f"endpoint {args.endpoint}"
            )
            times: dict[str, list[float]] = {"backend": [], "reference": []}
            for n in range(args.repeat):
                config = S3ArchiveConfig(
                    name="Bench",
                    id=str(uuid.uuid4()),
                    bucket=args.bucket,
                    endpoint_url=args.endpoint,
                    prefix=f"bench-{uuid.uuid4().hex[:8]}",
                    zip=args.zip,
                    verify=args.verify,
                    workers=args.workers,
                )
                archive = S3Archive(config)
                archive.create()
                times["backend"].append(backend(archive, studies))
                for source in studies:  # the next pass stores them anew
                    source.study.copies.clear()
                client = archive.bucket.client
                times["reference"].append(
                    reference(client, args.bucket, f"ref-{n}-{uuid.uuid4().hex[:6]}/", studies)
                )
            b = statistics.median(times["backend"])
            r = statistics.median(times["reference"])
            print(f"backend   (upload, verify, publish): {b:7.2f} s  {size / b / 1e6:6.1f} MB/s")
            print(f"reference (boto3 upload_file loop): {r:7.2f} s  {size / r / 1e6:6.1f} MB/s")
            rounds = " ".join(
                f"{x / y:.2f}" for x, y in zip(times["backend"], times["reference"], strict=True)
            )
            print(f"ratio backend / reference: {b / r:.2f}x (goal within 1.3x); rounds {rounds}")
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
