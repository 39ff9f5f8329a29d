"""Benchmark: storing studies into a folder archive, against copying them by hand.

Run it as a script::

    python bench/bench_archive.py [--studies 60] [--scale 0.1] [--profile mixed]
                                  [--repeat 3] [--work DIR]

It generates sample studies with ``bench/generate.py`` (not timed), lays each study
out under PS3.10 file IDs (``DICOM/S0000001/I0000001`` …, so DCMTK accepts the tree;
not timed) and builds the index records an import would hold. Then, for each archive
variant (readable or UID naming, folder or zip), it times:

backend
    what the transfer protocol does for every study: ``plan_store``,
    ``write_staging`` (files, DICOMDIR, manifest; every file and folder fsynced),
    reading every staged file back to check its SHA-256, ``publish``.
reference
    the same result by hand, study by study: ``cp -r`` + ``dcmmkdir +r`` + ``sync``;
    for zip, ``dcmmkdir +r`` (DICOMDIR only) + ``zip -0 -r`` (stored, no
    compression) + ``sync``.

Both sides read the same source files, hot in the page cache; ``sync`` runs before
every timed pass so no pass pays for the previous one's writes. Each pass is repeated
``--repeat`` times, alternating backend and reference; the median is reported.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import generate  # noqa: E402

from studyvault.dicom import read_header  # noqa: E402
from studyvault.naming import assign_file_ids  # noqa: E402
from studyvault.plugins.folder_archive import FolderArchive, FolderArchiveConfig  # noqa: E402
from studyvault.records import (  # noqa: E402
    InstanceRecord,
    StudyRecord,
    header_to_instance,
    header_to_study,
)

VARIANTS = (("readable", False), ("uid", False), ("readable", True), ("uid", True))


@dataclass
class Study:
    """One source study: its folder (PS3.10 layout) and its index records."""

    folder: Path
    record: StudyRecord
    instances: list[InstanceRecord]
    files: dict[str, Path]


def prepare(generated: Path, src: Path) -> list[Study]:
    """Lay each generated study out under PS3.10 file IDs in ``src``; build records."""
    studies = []
    for folder in sorted(p for p in generated.iterdir() if p.is_dir()):
        paths = sorted(p for p in folder.rglob("*") if p.is_file())
        headers = [read_header(p) for p in paths]
        records = []
        for path, header in zip(paths, headers, strict=True):
            data = path.read_bytes()
            digest = hashlib.sha256(data).hexdigest()
            records.append(header_to_instance(header, size=len(data), sha256=digest, received=0))
        study = header_to_study(headers[0])
        study.size = sum(r.size for r in records)
        study.instance_count = len(records)
        by_sop = {r.sop_uid: p for r, p in zip(records, paths, strict=True)}
        files = {}
        for inst, file_id in assign_file_ids(records):
            target = src / folder.name / file_id
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(by_sop[inst.sop_uid], target)
            files[inst.sop_uid] = target
        studies.append(Study(src / folder.name, study, records, files))
    return studies


def run_backend(studies: list[Study], out: Path, naming: str, zipped: bool) -> float:
    """Store every study through the folder archive backend; return seconds."""
    config = FolderArchiveConfig(
        name="bench", id=str(uuid.uuid4()), path=str(out), naming=naming, zip=zipped
    )
    archive = FolderArchive(config)
    archive.create()
    os.sync()
    started = time.perf_counter()
    for study in studies:
        plan = archive.plan_store(study.record, study.instances)
        items = [(i, (lambda p=study.files[i.sop_uid]: open(p, "rb"))) for i in study.instances]
        archive.write_staging(plan, study.record, items)
        for inst in study.instances:
            with archive.open_file(plan.staging, plan.paths[inst.sop_uid]) as f:
                if hashlib.file_digest(f, "sha256").hexdigest() != inst.sha256:
                    raise SystemExit(f"staged copy of {inst.sop_uid} does not match")
        archive.publish(plan)
    return time.perf_counter() - started


def run_reference(studies: list[Study], out: Path, zipped: bool) -> float:
    """Do the same by hand with cp, dcmmkdir, zip and sync; return seconds."""
    out.mkdir()
    work = out / ".work"
    work.mkdir()
    os.sync()
    started = time.perf_counter()
    for study in studies:
        if not zipped:
            target = out / study.folder.name
            subprocess.run(["cp", "-r", str(study.folder), str(target)], check=True)
            subprocess.run(["dcmmkdir", "-q", "+r"], cwd=target, check=True)
        else:
            tree = work / study.folder.name
            tree.mkdir()
            subprocess.run(
                ["dcmmkdir", "-q", "+r", "+id", str(study.folder), "+D", str(tree / "DICOMDIR")],
                check=True,
            )
            (tree / "DICOM").symlink_to(study.folder / "DICOM")  # zip follows it: no copy
            zip_path = out / f"{study.folder.name}.zip"
            subprocess.run(["zip", "-q", "-0", "-r", str(zip_path), "."], cwd=tree, check=True)
        subprocess.run(["sync"], check=True)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=60)
    parser.add_argument("--scale", type=float, default=0.1)
    parser.add_argument("--profile", default="mixed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    args = parser.parse_args(argv)
    for tool in ("cp", "dcmmkdir", "zip", "sync"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed")

    work = Path(tempfile.mkdtemp(prefix="bench-archive-", dir=args.work))
    try:
        summary = generate(work / "gen", args.profile, args.studies, args.scale, args.seed)
        print(f"generated {summary}", flush=True)
        studies = prepare(work / "gen", work / "src")
        size = sum(s.record.size for s in studies)
        files = sum(len(s.instances) for s in studies)
        print(f"{len(studies)} studies, {files} files, {size / 1e6:.0f} MB per pass\n")
        print(
            f"{'variant':<14} {'backend s':>10} {'reference s':>12} {'ratio':>6} {'MB/s':>7}"
            "  ratio of each round"
        )
        for naming, zipped in VARIANTS:
            ours, theirs = [], []
            for n in range(args.repeat):
                ours.append(run_backend(studies, work / f"out-{n}", naming, zipped))
                theirs.append(run_reference(studies, work / f"ref-{n}", zipped))
                shutil.rmtree(work / f"out-{n}")
                shutil.rmtree(work / f"ref-{n}")
            a, b = statistics.median(ours), statistics.median(theirs)
            name = f"{naming}{' zip' if zipped else ''}"
            rounds = " ".join(f"{x / y:.2f}" for x, y in zip(ours, theirs, strict=True))
            print(
                f"{name:<14} {a:>10.2f} {b:>12.2f} {a / b:>6.2f} {size / 1e6 / a:>7.0f}  {rounds}",
                flush=True,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
