"""Receive benchmark: ``studyvault serve`` against DCMTK's ``storescp``, both fed by ``storescu``.

Run it with the project's interpreter::

    .venv/bin/python bench/bench_receive.py [--small 200] [--large 20] [--senders 4]
                                            [--repeat 3] [--out DIR] [--keep]

It writes N small (~50 KB) and N large (~10 MB) CT instances with
:mod:`studyvault.testing.dicomgen`, then times, for each case:

storescp
    ``storescp -od DIR PORT`` (no fork), receiving into a fresh folder. It writes each
    file without fsync.
pynetdicom
    ``bench/pynetdicom_scp.py``: pynetdicom writing each data set as received, nothing
    more (no header reading, hashing, fsync or index). The floor for any receiver on
    pynetdicom, which the design prescribes: its ratio to storescp bounds studyvault's.
studyvault
    ``studyvault serve`` on a fresh config made by ``studyvault init``, receiving into its
    image directory: header read, durable write (fsync of the file and its folder)
    before each Success, index group commits.

Each case is sent by one ``storescu`` and then by ``--senders`` storescu processes at
once, each with its share of the files (a study of its own). Both sides get
``TCP_NODELAY=1``, without which DCMTK waits ~45 ms per object. The time is the wall
time from starting the sender(s) until all have exited (association set-up included,
the receiver's start-up not). Rounds are interleaved and medians shown, with the ratio
studyvault / storescp. The goals are at most 3 for small instances and 1.5 for large.

storescp never fsyncs, while studyvault answers Success only for durable files, so the
files storescp wrote are then made durable too, with ``sync FILE... DIR`` (an fsync of
each, as ``cp -r`` plus ``sync`` in the import benchmark): "+sync" is storescp's time
plus that, a lower bound for any receiver that acknowledges only what is on disk.

studyvault then gets the same files again ("resend"): each is a duplicate, answered
Success without writing, so that time is the network, pynetdicom and header reading
alone, and the difference to the first send is what the durable writes cost.

Every round checks that the receiver got every instance: storescp's files are counted,
studyvault's instances are read from ``studyvault studies --json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pydicom.uid import generate_uid

from studyvault.testing.dicomgen import make_instance

SMALL_BYTES = 50_000
LARGE_BYTES = 10_000_000
AE_TITLE = "STUDYVAULT"


@dataclass(frozen=True)
class Case:
    name: str  # "small" | "large"
    senders: int
    groups: list[list[Path]]  # one list of files per sender

    @property
    def label(self) -> str:
        what = f"{self.name} x{sum(len(g) for g in self.groups)}"
        return f"{what}, {self.senders} sender{'s' if self.senders > 1 else ''}"

    @property
    def files(self) -> int:
        return sum(len(group) for group in self.groups)

    @property
    def bytes(self) -> int:
        return sum(path.stat().st_size for group in self.groups for path in group)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_files(folder: Path, count: int, pixel_bytes: int, groups: int) -> list[list[Path]]:
    """``count`` instances in ``groups`` studies (one per sender), written once."""
    marker = folder / "done.json"
    if marker.exists():
        known = json.loads(marker.read_text())
        if known == {"count": count, "pixel_bytes": pixel_bytes, "groups": groups}:
            return [sorted((folder / f"g{g}").iterdir()) for g in range(groups)]
    shutil.rmtree(folder, ignore_errors=True)
    result = []
    for g in range(groups):
        study = generate_uid()
        paths = []
        for i in range(g, count, groups):
            paths.append(
                make_instance(
                    folder / f"g{g}" / f"i{i:05d}.dcm",
                    study_uid=study,
                    pixel_bytes=pixel_bytes,
                    InstanceNumber=i + 1,
                )
            )
        result.append(paths)
    marker.write_text(json.dumps({"count": count, "pixel_bytes": pixel_bytes, "groups": groups}))
    return result


def environment() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


def wait_for_echo(port: int, process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"bench_receive.py: {what} exited at start-up")
        done = subprocess.run(
            ["echoscu", "-aec", AE_TITLE, "127.0.0.1", str(port)], capture_output=True
        )
        if done.returncode == 0:
            return
        time.sleep(0.1)
    sys.exit(f"bench_receive.py: {what} does not answer C-ECHO on port {port}")


def send(case: Case, port: int) -> float:
    """Send every group with its own storescu, all at once; return the wall time."""
    start = time.perf_counter()
    senders = [
        subprocess.Popen(
            ["storescu", "-aet", f"MODALITY{i}", "-aec", AE_TITLE, "127.0.0.1", str(port)]
            + [str(p) for p in group],
            env=environment(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for i, group in enumerate(case.groups)
    ]
    failed = []
    for sender in senders:
        _, err = sender.communicate()
        if sender.returncode != 0:
            failed.append(err.decode(errors="replace"))
    seconds = time.perf_counter() - start
    if failed:
        sys.exit("bench_receive.py: storescu failed:\n" + "\n".join(failed))
    return seconds


def studyvault_command() -> str:
    script = Path(sys.executable).with_name("studyvault")
    return str(script) if script.exists() else (shutil.which("studyvault") or "studyvault")


def receive_into(case: Case, work: Path, name: str, command: list[str]) -> tuple[float, list[str]]:
    """Start ``command`` (with OUT and PORT in it replaced) as the receiver writing into
    a fresh folder ``work/name``, send the case to it and stop it; return the send's
    seconds and the files it wrote, which must be one per instance."""
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    port = free_port()
    server = subprocess.Popen(
        [str(out) if arg == "OUT" else str(port) if arg == "PORT" else arg for arg in command],
        env=environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_echo(port, server, name)
        seconds = send(case, port)
    finally:
        server.terminate()
        server.wait()
    files = [str(path) for path in out.iterdir()]
    if len(files) != case.files:
        sys.exit(f"bench_receive.py: {name} stored {len(files)} of {case.files} files")
    return seconds, files


def run_pynetdicom(case: Case, work: Path) -> float:
    """Time ``bench/pynetdicom_scp.py`` (pynetdicom writing what it receives, nothing
    more) receiving the case: the floor for any receiver built on pynetdicom."""
    script = Path(__file__).resolve().with_name("pynetdicom_scp.py")
    return receive_into(case, work, "pynetdicom", [sys.executable, str(script), "OUT", "PORT"])[0]


def run_storescp(case: Case, work: Path) -> tuple[float, float]:
    """Time storescp receiving the case, and then ``sync`` of the files it wrote and of
    their folder (storescp itself never fsyncs; studyvault answers only durable files).
    Returns (receive seconds, sync seconds)."""
    # no -aet: storescp accepts any called AE title
    seconds, files = receive_into(case, work, "storescp", ["storescp", "-od", "OUT", "PORT"])
    out = work / "storescp"
    start = time.perf_counter()
    subprocess.run(["sync", *files, str(out)], check=True)  # fsync of each, not the disk
    return seconds, time.perf_counter() - start


def new_vault(folder: Path, port: int) -> dict[str, str]:
    """A fresh ``studyvault init`` whose receiver listens on ``port`` of loopback."""
    shutil.rmtree(folder, ignore_errors=True)
    done = subprocess.run([studyvault_command(), "init", str(folder)], capture_output=True)
    if done.returncode != 0:
        sys.exit(f"bench_receive.py: studyvault init failed: {done.stderr.decode().strip()}")
    config = folder / "studyvault.toml"
    text = config.read_text()
    text = text.replace('host = "0.0.0.0"', 'host = "127.0.0.1"')
    text = text.replace("port = 11112", f"port = {port}")
    text = text.replace("min_free_mb = 1024", "min_free_mb = 100")
    config.write_text(text)
    return {**environment(), "STUDYVAULT_CONFIG": str(config)}


def run_studyvault(case: Case, work: Path) -> tuple[float, float]:
    """Time a first send, then the same files again: the resend stores nothing (every
    instance is a duplicate), so it measures the network, protocol and header reading
    alone; the difference is the cost of durable writes and indexing."""
    port = free_port()
    env = new_vault(work / "vault", port)
    log = open(work / "serve.log", "wb")
    server = subprocess.Popen(
        [studyvault_command(), "serve"], env=env, stdout=subprocess.DEVNULL, stderr=log
    )
    try:
        wait_for_echo(port, server, "studyvault serve")
        seconds = send(case, port)
        resend = send(case, port)
        listed = subprocess.run(
            [studyvault_command(), "studies", "--json"],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
    finally:
        server.terminate()
        server.wait()
        log.close()
    received = sum(study["instances"] for study in json.loads(listed.stdout))
    if received != case.files:
        sys.exit(f"bench_receive.py: studyvault indexed {received} of {case.files} instances")
    return seconds, resend


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=200, help="small instances (default 200)")
    parser.add_argument("--large", type=int, default=20, help="large instances (default 20)")
    parser.add_argument("--senders", type=int, default=4, help="parallel senders (default 4)")
    parser.add_argument("--repeat", type=int, default=3, help="timed rounds; medians shown")
    parser.add_argument("--out", type=Path, help="work folder (default: a new temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv)
    for tool in ("storescu", "storescp", "echoscu"):
        if shutil.which(tool) is None:
            sys.exit(f"bench_receive.py: {tool} is missing (Debian package dcmtk)")
    work = args.out or Path(tempfile.mkdtemp(prefix="bench_receive_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        cases = []
        for name, count, size in (
            ("small", args.small, SMALL_BYTES),
            ("large", args.large, LARGE_BYTES),
        ):
            if count <= 0:
                continue
            for senders in sorted({1, args.senders}):
                groups = make_files(work / f"{name}-{senders}", count, size, senders)
                cases.append(Case(name, senders, groups))
        times: dict[str, dict[str, list[float]]] = {
            c.label: {"dcmtk": [], "synced": [], "pynetdicom": [], "sv": [], "resend": []}
            for c in cases
        }
        for round_ in range(args.repeat):
            for case in cases:
                row = times[case.label]
                received, synced = run_storescp(case, work)
                floor = run_pynetdicom(case, work)
                first, resend = run_studyvault(case, work)
                row["dcmtk"].append(received)
                row["synced"].append(received + synced)
                row["pynetdicom"].append(floor)
                row["sv"].append(first)
                row["resend"].append(resend)
                print(
                    f"round {round_ + 1}: {case.label}: storescp {received:.2f} s "
                    f"(+ sync {synced:.2f} s), pynetdicom {floor:.2f} s, studyvault {first:.2f} s "
                    f"(resend {resend:.2f} s)",
                    flush=True,
                )
        print()
        print(
            f"{'case':<26} {'storescp':>9} {'+sync':>7} {'pynetdicom':>11} {'ratio':>6} "
            f"{'studyvault':>11} {'ratio':>6} "
            f"{'to +sync':>8} {'files/s':>8} {'MB/s':>7} {'resend':>7} {'ratio':>6}"
        )
        for case in cases:
            row = times[case.label]
            dcmtk, synced = median(row["dcmtk"]), median(row["synced"])
            sv, again = median(row["sv"]), median(row["resend"])
            floor = median(row["pynetdicom"])
            print(
                f"{case.label:<26} {dcmtk:8.2f}s {synced:6.2f}s {floor:10.2f}s "
                f"{floor / dcmtk:6.2f} {sv:10.2f}s {sv / dcmtk:6.2f} "
                f"{sv / synced:8.2f} {case.files / sv:8,.0f} {case.bytes / 1e6 / sv:7,.1f} "
                f"{again:6.2f}s {again / dcmtk:6.2f}"
            )
    finally:
        if not args.keep and args.out is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
