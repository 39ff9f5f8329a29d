"""Storage task benchmark: ``studyvault tasks run`` against ``cp -r`` + ``sync``.

Run it with the project's interpreter::

    .venv/bin/python bench/bench_task.py [--size-mb 1500] [--small 2000]
        [--memory 1000,10000] [--big] [--only throughput,overhead,memory]
        [--repeat 1] [--out DIR] [--keep] [--cprofile DIR]

Every part imports sample studies (``bench/generate.py``) into a fresh config made by
``studyvault init`` with ``stable_age_minutes = 0.0`` (so just-imported studies count
as stable), adds a task ``--all --throttle-ms 0`` that takes every study out of the
image directory, and times ``studyvault tasks run NAME --json`` (process start
included). The task archives to a folder archive (``studyvault archives add``); while
that command does not exist yet, it moves the studies to a second image directory
instead, and says so. Either way each study goes through the whole safe transfer:
journal, staged copy with fsync, SHA-256 read-back, atomic publish, index commit,
removal of the source.

throughput
    about ``--size-mb`` MB (default 1500), half ultrasound studies (multi-frame,
    12-55 MB files), half CT studies (about 0.5 MB files). Reference: ``cp -r`` of the
    same files (the image directory's ``studies`` folder) to a new folder on the same
    filesystem, then ``sync``. Goal: the task within 1.5x of the reference.
overhead
    ``--small`` tiny studies (default 2000; 2-4 files of a few KB each), timed like the
    above. ``(task seconds - cp/sync seconds) / studies`` is the cost of one study
    beyond copying its bytes; the task's user and system CPU per study are shown too.
    Goal: under 5 ms per study apart from I/O.
memory
    peak resident memory of ``tasks run`` over ``--memory`` counts of small studies
    (default 1,000 and 10,000; ``--big`` adds 100,000: 21 minutes on tmpfs, much
    longer on a disk). Goal: flat. Measured with ``/usr/bin/time -v`` when present,
    else the child's rusage.

``--repeat N`` runs the throughput and overhead parts N times (each round a fresh
import, then ``cp`` and the task, interleaved) and shows medians: the disk of a shared
machine is noisy.

``--cprofile DIR`` also runs the throughput and overhead tasks once more under
:mod:`cProfile` (untimed, each on a fresh import), writes ``DIR/throughput.prof`` and
``DIR/overhead.prof``, and prints the functions that take the most time, with the
share spent waiting on the disk (fsync, LMDB commits, unlink, ...).

``--out /dev/shm/NAME`` runs everything on tmpfs, where fsync costs nothing: the
overhead part then measures the per-study cost apart from I/O.

At the start it measures the disk's fsync latency (a 4 KB file written and fsynced,
200 times): durable per-study work is a number of such waits, so this says how much of
the per-study overhead is the disk and not the code.
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package
from bench_import import make_sample, studyvault_command, sync  # noqa: E402
from generate import generate  # noqa: E402

TASK = "Bench"
DESTINATION = "Bench Destination"
TIME_V = Path("/usr/bin/time")
#: Built-ins that block on the disk, for the share of a profile spent waiting on it.
DISK_CALLS = (
    "posix.fsync",
    "posix.fdatasync",
    "'__exit__' of 'Transaction' objects",  # LMDB commit: msync/fdatasync
    "'commit' of 'Transaction' objects",
    "posix.unlink",
    "posix.rmdir",
    "posix.mkdir",
    "posix.replace",
    "posix.rename",
    "io.open",
    "posix.open",
    "'read' of '_io.BufferedReader' objects",
    "'readinto' of '_io.BufferedReader' objects",
    "'write' of '_io.BufferedWriter' objects",
    "posix.write",
    "posix.read",
)


@dataclass(frozen=True)
class Run:
    """One measured ``studyvault tasks run``."""

    seconds: float
    user: float
    system: float
    peak_rss_kb: int
    result: dict[str, object]
    #: peaks of RssAnon (heap) and RssFile + RssShmem (mapped files: code, the LMDB
    #: index map) sampled from /proc every 50 ms; 0 where /proc is missing
    peak_anon_kb: int = 0
    peak_file_kb: int = 0


class Bench:
    """A work folder and the commands the parts share."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.studyvault = studyvault_command()
        probe = subprocess.run(
            [*self.studyvault, "archives", "--help"], capture_output=True, text=True
        )
        self.has_archives = probe.returncode == 0
        self.startup_cpu = self._startup_cpu()

    def _startup_cpu(self) -> tuple[float, float]:
        """(user, system) CPU seconds of a command that starts studyvault and opens a vault."""
        env, _, _ = self.vault("vault-startup", None)
        report = self.work / "time-v.txt"
        command = [*self.studyvault, "tasks", "show", TASK]
        if TIME_V.exists():
            command = [str(TIME_V), "-v", "-o", str(report), *command]
        else:
            command = [sys.executable, "-c", _RUSAGE_WRAPPER, str(report), *command]
        subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
        user, system, _ = _read_usage(report.read_text())
        shutil.rmtree(self.work / "vault-startup")
        return user, system

    def cpu_line(self, run: Run, studies: int) -> None:
        user = max(run.user - self.startup_cpu[0], 0.0)
        system = max(run.system - self.startup_cpu[1], 0.0)
        print(
            f"  task CPU beyond start-up: {user:.2f} s user + {system:.2f} s system = "
            f"{user / studies * 1000:.2f} + {system / studies * 1000:.2f} ms per study; "
            f"the rest of the wall time waits (on the disk, or on other threads)",
            flush=True,
        )

    def destination_words(self) -> str:
        if self.has_archives:
            return f"archive task to a folder archive ({DESTINATION!r})"
        return (
            "move task to a second image directory: `studyvault archives` is not "
            "available yet, so there is no folder archive to archive to"
        )

    def cli(self, env: dict[str, str], *args: str) -> str:
        done = subprocess.run([*self.studyvault, *args], env=env, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"bench_task.py: studyvault {' '.join(args)} failed:\n{done.stderr}")
        return done.stdout

    def vault(self, name: str, src: Path | None) -> tuple[dict[str, str], Path, dict[str, int]]:
        """A fresh config with ``src`` (if any) imported and the task added.

        :returns: its environment, its image directory's ``studies`` folder, and the
            import summary.
        """
        folder = self.work / name
        shutil.rmtree(folder, ignore_errors=True)
        subprocess.run(
            [*self.studyvault, "init", str(folder)], check=True, stdout=subprocess.DEVNULL
        )
        config = folder / "studyvault.toml"
        text, count = re.subn(
            r"(?m)^stable_age_minutes = .*$", "stable_age_minutes = 0.0", config.read_text()
        )
        if count != 1:
            sys.exit(f"bench_task.py: no stable_age_minutes line in {config}")
        config.write_text(text)
        env = {**os.environ, "STUDYVAULT_CONFIG": str(config)}
        summary: dict[str, int] = {}
        if src is not None:
            started = time.perf_counter()
            summary = json.loads(self.cli(env, "import", str(src), "--json"))
            print(
                f"  imported {summary['studies']:,} studies, {summary['instances']:,} files, "
                f"{summary['bytes'] / 1e6:,.1f} MB in {time.perf_counter() - started:.1f} s",
                flush=True,
            )
        target = str(folder / "destination")
        if self.has_archives:
            self.cli(env, "archives", "add", DESTINATION, target)
            action = "archive"
        else:
            self.cli(env, "image-dirs", "add", DESTINATION, target)
            action = "move"
        self.cli(
            env, "tasks", "add", TASK, "--action", action,
            "--from", "Image Center Storage", "--to", DESTINATION,
            "--all", "--throttle-ms", "0",
        )  # fmt: skip
        return env, folder / "images" / "studies", summary

    def run_task(self, env: dict[str, str], studies: int) -> Run:
        """``tasks run`` after a ``sync``: wall time, CPU, peak RSS; checks the result."""
        command = [*self.studyvault, "tasks", "run", TASK, "--json"]
        report = self.work / "time-v.txt"
        if TIME_V.exists():
            command = [str(TIME_V), "-v", "-o", str(report), *command]
        else:
            command = [sys.executable, "-c", _RUSAGE_WRAPPER, str(report), *command]
        sync()
        start = time.perf_counter()
        proc = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        peaks = {"RssAnon": 0, "RssFile": 0}
        sampler = threading.Thread(target=_sample_rss, args=(proc, peaks), daemon=True)
        sampler.start()
        stdout, stderr = proc.communicate()
        seconds = time.perf_counter() - start
        sampler.join()
        if proc.returncode != 0:
            sys.exit(f"bench_task.py: tasks run failed ({proc.returncode}):\n{stderr}")
        result = json.loads(stdout)
        if result["outcome"] != "completed" or result["done"] != studies or result["errors"]:
            sys.exit(f"bench_task.py: the task did not finish cleanly: {result}")
        user, system, rss = _read_usage(report.read_text())
        return Run(seconds, user, system, rss, result, peaks["RssAnon"], peaks["RssFile"])


def _sample_rss(proc: subprocess.Popen[str], peaks: dict[str, int]) -> None:
    """Keep the peaks (KB) of the studyvault process's heap (RssAnon) and mapped files
    (RssFile + RssShmem: on tmpfs the index map counts as shared memory) while it runs.

    ``proc`` is ``/usr/bin/time`` or the rusage wrapper; studyvault is its child.
    """
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    while proc.poll() is None:
        try:
            pids = children.read_text().split()
            lines = Path(f"/proc/{pids[0]}/status").read_text().splitlines() if pids else []
        except (OSError, IndexError):
            lines = []
        now = {"RssAnon": 0, "RssFile": 0}
        for line in lines:
            field, _, value = line.partition(":")
            if field in ("RssAnon", "RssFile", "RssShmem"):
                now["RssAnon" if field == "RssAnon" else "RssFile"] += int(value.split()[0])
        for key, kb in now.items():
            peaks[key] = max(peaks[key], kb)
        time.sleep(0.05)


_RUSAGE_WRAPPER = """
import resource, subprocess, sys
code = subprocess.run(sys.argv[2:]).returncode
u = resource.getrusage(resource.RUSAGE_CHILDREN)
open(sys.argv[1], "w").write(
    f"User time (seconds): {u.ru_utime}\\nSystem time (seconds): {u.ru_stime}\\n"
    f"Maximum resident set size (kbytes): {u.ru_maxrss}\\n")
sys.exit(code)
"""


def _read_usage(text: str) -> tuple[float, float, int]:
    """(user s, system s, peak RSS KB) from ``/usr/bin/time -v`` output."""

    def field(label: str) -> str:
        found = re.search(rf"{re.escape(label)}: *([0-9.]+)", text)
        if found is None:
            sys.exit(f"bench_task.py: no {label!r} in the time report:\n{text}")
        return found.group(1)

    return (
        float(field("User time (seconds)")),
        float(field("System time (seconds)")),
        int(field("Maximum resident set size (kbytes)")),
    )


def fsync_latency(work: Path, rounds: int = 200) -> float:
    """Median seconds to write 4 KB to a new file and fsync it, in ``work``."""
    probe = work / "fsync-probe"
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, bytes(4096))
            os.fsync(fd)
        finally:
            os.close(fd)
        times.append(time.perf_counter() - start)
        probe.unlink()
    return sorted(times)[len(times) // 2]


def run_cp(src: Path, dst: Path) -> float:
    """``cp -r`` then ``sync``, timed together (the task's copies are durable too)."""
    shutil.rmtree(dst, ignore_errors=True)
    sync()
    start = time.perf_counter()
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    sync()
    seconds = time.perf_counter() - start
    shutil.rmtree(dst)
    sync()
    return seconds


def small_sample(bench: Bench, studies: int, seed: int) -> Path:
    src = bench.work / f"small-{studies}"
    shutil.rmtree(src, ignore_errors=True)
    summary = generate(src, "small", studies, 1.0, seed=seed)
    print(f"  generated {summary}", flush=True)
    return src


def rounds(
    bench: Bench, name: str, src: Path, studies: int, repeat: int
) -> tuple[list[float], list[Run], dict[str, int]]:
    """``repeat`` rounds of: fresh import of ``src``, ``cp -r`` + ``sync`` of the image
    directory's files, then the task over them. Returns the cp times, the task runs and
    the import summary."""
    copies: list[float] = []
    runs: list[Run] = []
    summary: dict[str, int] = {}
    for number in range(1, repeat + 1):
        env, studies_dir, summary = bench.vault(name, src)
        copy = run_cp(studies_dir, bench.work / "cp")
        run = bench.run_task(env, studies or summary["studies"])
        copies.append(copy)
        runs.append(run)
        if repeat > 1:
            print(
                f"  round {number}: cp -r + sync {copy:.2f} s, tasks run {run.seconds:.2f} s",
                flush=True,
            )
        shutil.rmtree(bench.work / name)
    return copies, runs, summary


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def throughput(bench: Bench, size_mb: float, repeat: int, cprofile: Path | None) -> None:
    print(f"\n== throughput: about {size_mb:,.0f} MB of ultrasound and CT studies", flush=True)
    src = bench.work / "large"
    shutil.rmtree(src, ignore_errors=True)
    make_sample(src, size_mb)
    copies, runs, summary = rounds(bench, "vault-large", src, 0, repeat)
    copy, task = median(copies), median([r.seconds for r in runs])
    mb, studies = summary["bytes"] / 1e6, summary["studies"]
    label = f" (median of {repeat} rounds)" if repeat > 1 else ""
    print(f"  cp -r + sync        {copy:8.2f} s {mb / copy:8.1f} MB/s{label}")
    print(f"  tasks run           {task:8.2f} s {mb / task:8.1f} MB/s{label}")
    ratio = task / copy
    verdict = "within" if ratio <= 1.5 else "NOT within"
    print(f"  ratio task / cp: {ratio:.2f} ({verdict} the goal of 1.5)", flush=True)
    if repeat > 1:
        each = ", ".join(f"{r.seconds / c:.2f}" for c, r in zip(copies, runs, strict=True))
        print(f"  ratio of each round: {each}")
    bench.cpu_line(runs[-1], studies)
    if cprofile is not None:
        env, _, _ = bench.vault("vault-large", src)
        profile_task(env, cprofile / "throughput.prof", studies, summary["instances"])
        shutil.rmtree(bench.work / "vault-large")
    shutil.rmtree(src)


def overhead(bench: Bench, studies: int, repeat: int, cprofile: Path | None) -> None:
    print(f"\n== per-study overhead: {studies:,} small studies", flush=True)
    src = small_sample(bench, studies, seed=2)
    copies, runs, summary = rounds(bench, "vault-small", src, studies, repeat)
    copy, task = median(copies), median([r.seconds for r in runs])
    label = f" (median of {repeat} rounds)" if repeat > 1 else ""
    print(f"  cp -r + sync        {copy:8.2f} s {summary['instances'] / copy:8,.0f} files/s{label}")
    print(f"  tasks run           {task:8.2f} s {studies / task:8,.0f} studies/s{label}")
    each = (task - copy) / studies * 1000
    verdict = "under" if each < 5 else "NOT under"
    print(f"  overhead (task - cp) / studies: {each:.2f} ms per study ({verdict} 5 ms)")
    bench.cpu_line(runs[-1], studies)
    if cprofile is not None:
        env, _, _ = bench.vault("vault-small", src)
        profile_task(env, cprofile / "overhead.prof", studies, summary["instances"])
        shutil.rmtree(bench.work / "vault-small")
    shutil.rmtree(src)


def profile_task(env: dict[str, str], stats: Path, studies: int, files: int) -> None:
    """Run the task once under cProfile and print where its time goes."""
    sync()
    command = [sys.executable, "-m", "cProfile", "-o", str(stats), *studyvault_command()]
    subprocess.run(
        [*command, "tasks", "run", TASK, "--json"],
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    report = pstats.Stats(str(stats))
    entries = report.stats  # type: ignore[attr-defined]
    total = sum(tt for (_, _, tt, _, _) in entries.values())
    print(f"\n  cProfile of one run ({stats}): {total:.2f} s profiled, top functions by own time:")
    ranked = sorted(entries.items(), key=lambda item: item[1][2], reverse=True)
    for (file, line, func), (_, ncalls, tt, _, _) in ranked[:15]:
        where = func if file == "~" else f"{Path(file).name}:{line}({func})"
        print(f"    {tt / total:6.1%} {tt:7.2f} s {ncalls:8,d} calls  {where}")
    disk = sum(
        tt
        for (file, _, func), (_, _, tt, _, _) in entries.items()
        if file == "~" and any(name in func for name in DISK_CALLS)
    )
    rest = total - disk

    def calls(name: str) -> int:
        return sum(
            n for (f, _, func), (_, n, _, _, _) in entries.items() if f == "~" and name in func
        )

    print(
        f"  waiting on the disk (fsync, LMDB commit, unlink, open, read/write...): "
        f"{disk:.2f} s = {disk / total:.0%}; everything else {rest:.2f} s = "
        f"{rest / studies * 1000:.2f} ms per study (with the profiler's own overhead)"
    )
    fsyncs, transactions = calls("posix.fsync"), calls("'__exit__' of 'Transaction' objects")
    print(
        f"  per study: {fsyncs / studies:.1f} os.fsync calls ({files / studies:.1f} files), "
        f"{transactions / studies:.1f} LMDB transactions"
    )
    print("  cumulative, studyvault's own functions:")
    report.sort_stats("cumulative").print_stats(r"/(engine|plugins)/", 25)


def memory(bench: Bench, counts: list[int]) -> None:
    print(f"\n== memory: peak RSS of tasks run over {', '.join(f'{n:,}' for n in counts)} "
          "small studies", flush=True)  # fmt: skip
    rows = []
    for studies in counts:
        src = small_sample(bench, studies, seed=3)
        env, _, _ = bench.vault("vault-memory", src)
        shutil.rmtree(src)
        run = bench.run_task(env, studies)
        rows.append((studies, run))
        index = bench.work / "vault-memory" / "index" / "data.mdb"
        print(
            f"  {studies:>8,} studies: peak RSS {run.peak_rss_kb / 1024:7.1f} MiB "
            f"(sampled peaks: heap {run.peak_anon_kb / 1024:.1f} MiB, mapped files "
            f"{run.peak_file_kb / 1024:.1f} MiB; index file {index.stat().st_size / 2**20:.1f} "
            f"MiB), {run.seconds:.1f} s ({run.seconds / studies * 1000:.1f} ms per study)",
            flush=True,
        )
        shutil.rmtree(bench.work / "vault-memory")
    (first, a), (last, b) = rows[0], rows[-1]
    print(
        f"  {first:,} -> {last:,} studies: peak RSS {(b.peak_rss_kb - a.peak_rss_kb) / 1024:+.1f}"
        f" MiB, of which heap {(b.peak_anon_kb - a.peak_anon_kb) / 1024:+.1f} MiB and mapped "
        f"files {(b.peak_file_kb - a.peak_file_kb) / 1024:+.1f} MiB (LMDB's memory map of the "
        "index: page cache, shared and reclaimable)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=float, default=1500, help="throughput sample MB")
    parser.add_argument("--small", type=int, default=2000, help="studies for the overhead part")
    parser.add_argument(
        "--memory", default="1000,10000", help="small-study counts for the memory part"
    )
    parser.add_argument("--big", action="store_true", help="memory part also at 100,000")
    parser.add_argument(
        "--repeat", type=int, default=1, help="rounds of throughput and overhead; medians shown"
    )
    parser.add_argument(
        "--only", default="throughput,overhead,memory", help="parts to run, comma-separated"
    )
    parser.add_argument("--out", type=Path, help="work folder (default: a new temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument(
        "--cprofile", type=Path, metavar="DIR", help="also profile the tasks, stats into DIR"
    )
    args = parser.parse_args(argv)
    parts = {p.strip() for p in args.only.split(",") if p.strip()}
    unknown = parts - {"throughput", "overhead", "memory"}
    if unknown:
        parser.error(f"--only: unknown part {', '.join(sorted(unknown))}")
    counts = [int(n) for n in args.memory.split(",") if n.strip()]
    if args.big:
        counts.append(100_000)
    work = args.out or Path(tempfile.mkdtemp(prefix="studyvault-bench-task-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        bench = Bench(work)
        print(f"work folder {work}; {os.cpu_count()} CPUs; {bench.destination_words()}")
        user, system = bench.startup_cpu
        print(f"studyvault start-up: {user:.2f} s user + {system:.2f} s system CPU")
        print(f"fsync latency of this disk: {fsync_latency(work) * 1000:.2f} ms (median of 200)")
        if args.cprofile is not None:
            args.cprofile.mkdir(parents=True, exist_ok=True)
        if "throughput" in parts:
            throughput(bench, args.size_mb, args.repeat, args.cprofile)
        if "overhead" in parts:
            overhead(bench, args.small, args.repeat, args.cprofile)
        if "memory" in parts and counts:
            memory(bench, counts)
    finally:
        if args.keep:
            print(f"kept {work}")
        elif args.out is None:
            shutil.rmtree(work, ignore_errors=True)
        else:  # only what this script made in a folder the user named
            for name in os.listdir(work):
                if name.startswith(("vault-", "small-", "large", "cp", "time-v")):
                    path = work / name
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
