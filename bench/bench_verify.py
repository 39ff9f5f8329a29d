"""Verify and rebuild benchmark: ``studyvault verify`` against ``sha256sum``, and
``studyvault index rebuild`` of many small studies.

Run it with the project's interpreter::

    .venv/bin/python bench/bench_verify.py [--size-mb 1000] [--small 10000]
        [--archived 1000] [--repeat 3] [--only verify,small,rebuild] [--out DIR] [--keep]

verify
    about ``--size-mb`` MB of sample studies (half ultrasound, 12-55 MB files; half CT,
    about 0.5 MB files) imported into a fresh ``studyvault init`` folder. Times
    ``studyvault verify "Image Center Storage" --json`` (every instance re-read and its
    SHA-256 compared with the index; process start included) against ``sha256sum``
    of the same files (one process, fed by ``xargs``). Goal: within 1.2x. Also shown:
    ``openssl dgst -sha256`` (which, like Python's hashlib, uses the CPU's SHA
    extensions; coreutils' ``sha256sum`` may not) and the engine's ``verify()`` on one
    thread, started with less than the whole command line.
small
    the same comparison over ``--small`` small studies (2-4 files of a few KB): the cost
    per file beyond hashing.
rebuild
    ``studyvault index rebuild --json`` over the ``--small`` studies (the old index kept
    aside each time), and again after ``--archived`` of them were archived to a folder
    archive of UID-named zips (read through the zip reader, SHA-256s from the manifest).

The page cache cannot be dropped without privileges: every command runs once untimed,
then ``--repeat`` times (default 3), interleaved, each after a ``sync``; medians shown.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package
from bench_import import median, sample, studyvault_command, sync  # noqa: E402
from generate import generate  # noqa: E402


def timed(command: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    """Run ``command`` after a ``sync``; return (seconds, stdout)."""
    sync()
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(
            f"bench_verify.py: {' '.join(command)} failed ({done.returncode}):\n"
            f"{done.stdout[-2000:]}{done.stderr[-2000:]}"
        )
    return seconds, done.stdout


def vault(folder: Path, sv: list[str], src: Path) -> dict[str, str]:
    """A fresh vault in ``folder`` with ``src`` imported (stable at once)."""
    shutil.rmtree(folder, ignore_errors=True)
    subprocess.run([*sv, "init", str(folder)], check=True, stdout=subprocess.DEVNULL)
    cfg = folder / "studyvault.toml"
    cfg.write_text(cfg.read_text().replace("stable_age_minutes = 10.0", "stable_age_minutes = 0.0"))
    env = {**os.environ, "STUDYVAULT_CONFIG": str(cfg)}
    started = time.perf_counter()
    subprocess.run(
        [*sv, "import", str(src), "--json"],
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    print(f"imported {src} in {time.perf_counter() - started:.1f} s", flush=True)
    return env


def instance_list(folder: Path, work: Path) -> tuple[Path, int, int]:
    """A NUL-separated list of the image directory's instance files, for ``xargs -0``."""
    files = sorted(p for p in (folder / "images" / "studies").rglob("*") if p.is_file())
    listing = work / "files.lst"
    listing.write_bytes(b"".join(os.fsencode(p) + b"\0" for p in files))
    return listing, len(files), sum(p.stat().st_size for p in files)


def compare(
    label: str, folder: Path, env: dict[str, str], sv: list[str], work: Path, repeat: int
) -> dict[str, float]:
    listing, files, size = instance_list(folder, work)
    sha = ["sh", "-c", f"xargs -0 sha256sum < '{listing}' > /dev/null"]
    # OpenSSL's SHA-256 uses the CPU's SHA extensions, as Python's hashlib does
    ossl = ["sh", "-c", f"xargs -0 openssl dgst -sha256 < '{listing}' > /dev/null"]
    verify = [*sv, "verify", "Image Center Storage", "--json"]
    one_thread = [
        sys.executable,
        "-c",
        "from studyvault.vault import Vault; from studyvault.integrity import verify; "
        "import sys; r = verify(Vault.open(), 'Image Center Storage', workers=1); "
        "sys.exit(0 if r.ok else 1)",
    ]
    runs: dict[str, list[float]] = {
        "sha256sum": [],
        "openssl dgst": [],
        "verify": [],
        "verify (1 thread)": [],
    }
    for command in (sha, ossl, verify, one_thread):
        timed(command, env)  # warm the page cache
    for _ in range(repeat):
        runs["sha256sum"].append(timed(sha, env)[0])
        runs["openssl dgst"].append(timed(ossl, env)[0])
        seconds, out = timed(verify, env)
        report = json.loads(out)
        checked = sum(s["files"] for s in report["storages"])
        if not report["ok"] or checked != files:
            sys.exit(f"bench_verify.py: verify checked {checked} of {files} files: {report}")
        runs["verify"].append(seconds)
        runs["verify (1 thread)"].append(timed(one_thread, env)[0])
    print(f"\n{label}: {files:,} files, {size / 1e6:,.0f} MB; medians of {repeat}")
    result = {}
    for name, values in runs.items():
        s = median(values)
        result[name] = s
        print(
            f"  {name:<20} {s:8.2f} s {files / s:10,.0f} files/s {size / 1e6 / s:9,.1f} MB/s"
            f"   (rounds: {', '.join(f'{v:.2f}' for v in values)})"
        )
    base = result["sha256sum"]
    print(
        f"  ratio verify / sha256sum: {result['verify'] / base:.2f} "
        f"(1 thread: {result['verify (1 thread)'] / base:.2f}); goal 1.2"
    )
    return result


def rebuild(label: str, env: dict[str, str], sv: list[str], folder: Path, repeat: int) -> None:
    command = [*sv, "index", "rebuild", "--json"]
    timed(command, env)
    values = []
    summary = {}
    for _ in range(repeat):
        seconds, out = timed(command, env)
        summary = json.loads(out)
        values.append(seconds)
        for old in folder.glob("index.replaced-*"):
            shutil.rmtree(old)  # the bench's own copies, not needed
    s = median(values)
    studies, instances = summary["studies"], summary["instances"]
    print(f"\n{label}: {studies:,} studies, {instances:,} instances; medians of {repeat}")
    rounds = ", ".join(f"{v:.2f}" for v in values)
    print(
        f"  index rebuild        {s:8.2f} s {studies / s:10,.0f} studies/s "
        f"{instances / s:9,.0f} instances/s   (rounds: {rounds})"
    )
    for storage in summary["storages"]:
        print(
            f"    {storage['name']}: {storage['studies']} studies, {storage['instances']} instances"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=float, default=1000, help="verify sample (MB)")
    parser.add_argument("--small", type=int, default=10000, help="small studies (default 10000)")
    parser.add_argument(
        "--archived", type=int, default=1000, help="small studies archived as zips for the rebuild"
    )
    parser.add_argument("--repeat", type=int, default=3, help="timed rounds; medians shown")
    parser.add_argument("--only", default="verify,small,rebuild", help="parts to run")
    parser.add_argument("--out", type=Path, help="work folder (default: a new temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv)
    parts = set(args.only.split(","))
    work = args.out or Path(tempfile.mkdtemp(prefix="bench-verify-"))
    work.mkdir(parents=True, exist_ok=True)
    sv = studyvault_command()
    print(f"work folder {work}; {os.cpu_count()} CPUs", flush=True)
    try:
        if "verify" in parts:
            src, _, _ = sample(work / "big", args.size_mb)
            env = vault(work / "big-vault", sv, src)
            compare("verify, large files", work / "big-vault", env, sv, work, args.repeat)
        if parts & {"small", "rebuild"}:
            small = work / "small-src"
            if not small.exists():
                print(f"generated {generate(small, 'small', args.small, seed=2)}", flush=True)
            folder = work / "small-vault"
            env = vault(folder, sv, small)
            if "small" in parts:
                compare("verify, small files", folder, env, sv, work, args.repeat)
            if "rebuild" in parts:
                rebuild("rebuild, image directory", env, sv, folder, args.repeat)
                if args.archived:
                    subprocess.run(
                        [
                            *sv,
                            "archives",
                            "add",
                            "Zips",
                            str(work / "zips"),
                            "--naming",
                            "uid",
                            "--zip",
                        ],
                        env=env,
                        check=True,
                        stdout=subprocess.DEVNULL,
                    )
                    oldest = sorted(
                        s["study_date"] or "0000-00-00"
                        for s in json.loads(timed([*sv, "studies", "--json"], env)[1])
                    )[args.archived - 1]
                    subprocess.run(
                        [
                            *sv,
                            "tasks",
                            "add",
                            "Z",
                            "--action",
                            "archive",
                            "--from",
                            "Image Center Storage",
                            "--to",
                            "Zips",
                            "--dates",
                            f"1900-01-01..{oldest}",
                            "--throttle-ms",
                            "0",
                        ],
                        env=env,
                        check=True,
                        stdout=subprocess.DEVNULL,
                    )
                    started = time.perf_counter()
                    subprocess.run(
                        [*sv, "tasks", "run", "Z"],
                        env=env,
                        check=True,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                    print(f"archived in {time.perf_counter() - started:.1f} s", flush=True)
                    rebuild("rebuild, image directory + zip archive", env, sv, folder, args.repeat)
    finally:
        if not args.keep and args.out is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
