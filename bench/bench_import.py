"""Import benchmark: ``studyvault import`` against DCMTK's ``dcmdump`` plus ``cp -r``.

Run it with the project's interpreter::

    .venv/bin/python bench/bench_import.py [--size-mb 1000] [--out DIR] [--keep]
        [--repeat 3] [--cprofile FILE]

It writes sample studies with ``bench/generate.py`` -- half of the bytes in ultrasound
studies (3-6 multi-frame instances of 12-55 MB, no file name extension), half in CT
studies (150-250 instances of about 0.5 MB) -- and then times, on the same files:

reference
    ``dcmdump`` reading the header of every file and nothing more (``+sd +r`` to walk
    the folders, ``-M`` not to load long values, ``+sb 7fe0,0010`` to stop before the
    pixel data, ``+P`` to print only the two UIDs studyvault groups by), plus
    ``cp -r`` of the same folders followed by ``sync``;
studyvault
    ``studyvault import SRC --json`` into a config made by ``studyvault init`` (header
    read, SHA-256, durable write of every file, index commit), process start included.

The page cache cannot be dropped without privileges, so every command runs once
untimed to warm the cache, then ``--repeat`` times (default 3) timed, interleaved, each
timed run starting after a ``sync``; medians are shown. Files/s and MB/s (1 MB =
1,000,000 bytes) are printed for each, and the ratio ``studyvault / (dcmdump + cp)``.
The goal is a ratio of 2 or less. ``--keep`` keeps the work folder; a later run with the
same ``--out`` and ``--size-mb`` reuses its sample.

``--cprofile FILE`` also runs one import under :mod:`cProfile` (untimed) and prints the
functions that take the most time.
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package
from generate import generate  # noqa: E402

#: Typical size of one generated study at scale 1, to choose how many to write.
ULTRASOUND_STUDY_MB = 180
CT_STUDY_MB = 105
#: Below this many MB, one study of each kind is written at a smaller pixel scale.
SMALLEST_FULL_SET_MB = ULTRASOUND_STUDY_MB + CT_STUDY_MB
#: Two attributes and pixel-data cut-off for dcmdump: read headers like studyvault does.
DCMDUMP_ARGS = ["-q", "+sd", "+r", "-M", "+sb", "7fe0,0010", "+P", "0020,000d", "+P", "0008,0018"]


@dataclass(frozen=True)
class Timing:
    """One timed command over the sample files."""

    label: str
    seconds: float
    files: int
    bytes: int

    def line(self) -> str:
        seconds = max(self.seconds, 1e-9)
        return (
            f"{self.label:<22} {self.seconds:8.2f} s {self.files / seconds:10,.0f} files/s "
            f"{self.bytes / 1e6 / seconds:9,.1f} MB/s"
        )


def plan(size_mb: float) -> tuple[int, int, float]:
    """(ultrasound studies, CT studies, pixel scale) for about ``size_mb`` MB in all."""
    if size_mb < SMALLEST_FULL_SET_MB:
        return 1, 1, max(size_mb / SMALLEST_FULL_SET_MB, 0.001)
    half = size_mb / 2
    return max(1, round(half / ULTRASOUND_STUDY_MB)), max(1, round(half / CT_STUDY_MB)), 1.0


def make_sample(src: Path, size_mb: float) -> tuple[int, int]:
    """Write the sample studies into ``src``; return (files, bytes)."""
    ultrasound, ct, scale = plan(size_mb)
    files = size = 0
    for profile, studies in (("ultrasound", ultrasound), ("ct", ct)):
        summary = generate(src / profile, profile, studies, scale, seed=1)
        print(f"generated {summary}", flush=True)
        files += summary.files
        size += summary.bytes
    return files, size


def studyvault_command() -> list[str]:
    """The ``studyvault`` script next to this interpreter (run the bench with .venv's)."""
    script = Path(sys.executable).with_name("studyvault")
    if script.exists():
        return [str(script)]
    found = shutil.which("studyvault")
    if found is None:
        sys.exit("bench_import.py: no studyvault command; run with .venv/bin/python")
    return [found]


def sync() -> None:
    subprocess.run(["sync"], check=True)


def timed(command: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    """Run ``command`` after a ``sync``; return (seconds, stdout). Its progress lines on
    stderr are shown only when it fails."""
    sync()
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"bench_import.py: {' '.join(command)} failed:\n{done.stderr}")
    return seconds, done.stdout


def run_dcmdump(src: Path, files: int) -> float:
    seconds, out = timed(["dcmdump", *DCMDUMP_ARGS, str(src)])
    found = out.count("SOPInstanceUID")
    if found != files:
        sys.exit(f"bench_import.py: dcmdump read {found} SOPInstanceUIDs of {files} files")
    return seconds


def run_cp(src: Path, dst: Path) -> float:
    """``cp -r`` then ``sync``, timed together (studyvault's files are durable too)."""
    shutil.rmtree(dst, ignore_errors=True)
    sync()
    start = time.perf_counter()
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    sync()
    return time.perf_counter() - start


def new_vault(folder: Path, studyvault: list[str]) -> dict[str, str]:
    """``studyvault init`` a fresh folder; return the environment that points at it."""
    shutil.rmtree(folder, ignore_errors=True)
    subprocess.run([*studyvault, "init", str(folder)], check=True, stdout=subprocess.DEVNULL)
    return {**os.environ, "STUDYVAULT_CONFIG": str(folder / "studyvault.toml")}


def run_import(src: Path, folder: Path, studyvault: list[str], files: int) -> float:
    env = new_vault(folder, studyvault)
    seconds, out = timed([*studyvault, "import", str(src), "--json"], env)
    summary = json.loads(out)
    if summary["instances"] != files:
        sys.exit(f"bench_import.py: studyvault imported {summary['instances']} of {files} files")
    return seconds


def profile_import(src: Path, folder: Path, studyvault: list[str], stats: Path) -> None:
    """Run one import under cProfile and print where the time goes."""
    env = new_vault(folder, studyvault)
    sync()
    command = [sys.executable, "-m", "cProfile", "-o", str(stats), studyvault[0]]
    subprocess.run(
        [*command, "import", str(src), "--json"], env=env, check=True, stdout=subprocess.DEVNULL
    )
    print(f"\ncProfile of one import, written to {stats}:")
    report = pstats.Stats(str(stats))
    report.sort_stats("tottime").print_stats(15)
    report.sort_stats("cumulative").print_stats(25)


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def sample(work: Path, size_mb: float) -> tuple[Path, int, int]:
    """The sample under ``work/src``: made now, or kept from an earlier ``--keep`` run
    of the same ``--size-mb``. Returns (folder, files, bytes)."""
    src, marker = work / "src", work / "sample.json"
    if marker.exists() and src.is_dir():
        known = json.loads(marker.read_text())
        if known["size_mb"] == size_mb:
            print(f"reusing the sample in {src}")
            return src, known["files"], known["bytes"]
    if src.exists():
        sys.exit(f"bench_import.py: {src} exists and is not this size's sample; use a new --out")
    work.mkdir(parents=True, exist_ok=True)
    files, size = make_sample(src, size_mb)
    marker.write_text(json.dumps({"size_mb": size_mb, "files": files, "bytes": size}))
    return src, files, size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=float, default=1000, help="sample size (default 1000)")
    parser.add_argument("--out", type=Path, help="work folder (default: a new temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (and sample)")
    parser.add_argument("--repeat", type=int, default=3, help="timed rounds; medians shown")
    parser.add_argument("--cprofile", type=Path, metavar="FILE", help="also profile an import")
    args = parser.parse_args(argv)
    if shutil.which("dcmdump") is None:
        print("bench_import.py: dcmdump not found (install DCMTK)", file=sys.stderr)
        return 2
    studyvault = studyvault_command()
    work = args.out or Path(tempfile.mkdtemp(prefix="studyvault-bench-"))
    try:
        src, files, size = sample(work, args.size_mb)
        sync()
        print(f"sample: {files} files, {size / 1e6:,.1f} MB in {src}; {os.cpu_count()} CPUs")
        # a warm-up round: the same work, untimed, so the timed rounds find a warm cache
        run_dcmdump(src, files)
        run_cp(src, work / "cp")
        run_import(src, work / "vault", studyvault, files)
        rounds: dict[str, list[float]] = {"dump": [], "copy": [], "vault": []}
        for _ in range(max(1, args.repeat)):  # interleaved, so drift hits all alike
            rounds["dump"].append(run_dcmdump(src, files))
            rounds["copy"].append(run_cp(src, work / "cp"))
            rounds["vault"].append(run_import(src, work / "vault", studyvault, files))
        dump = Timing("dcmdump (headers)", median(rounds["dump"]), files, size)
        copy = Timing("cp -r + sync", median(rounds["copy"]), files, size)
        reference = Timing("reference (sum)", dump.seconds + copy.seconds, files, size)
        vault = Timing("studyvault import", median(rounds["vault"]), files, size)
        print(f"median of {len(rounds['vault'])} timed rounds after a warm-up round:")
        for timing in (dump, copy, reference, vault):
            print(timing.line())
        ratio = vault.seconds / reference.seconds
        verdict = "within" if ratio <= 2 else "NOT within"
        print(f"ratio studyvault / (dcmdump + cp): {ratio:.2f} ({verdict} the goal of 2)")
        print("each round (dcmdump s, cp + sync s, studyvault s, ratio):")
        for d, c, v in zip(*rounds.values(), strict=True):
            print(f"  {d:6.2f} {c:6.2f} {v:6.2f} {v / (d + c):6.2f}")
        if args.cprofile:
            profile_import(src, work / "vault", studyvault, args.cprofile)
    finally:
        if args.keep:
            print(f"kept {work}")
        elif args.out is None:
            shutil.rmtree(work, ignore_errors=True)
        else:  # only what this script made in a folder the user named
            for name in ("src", "cp", "vault"):
                shutil.rmtree(work / name, ignore_errors=True)
            (work / "sample.json").unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
