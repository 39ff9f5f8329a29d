"""docs/howto.md runs: every ``sh`` block of every how-to, in order, in a sandbox.

The guide is written for a real server (``/var/lib/studyvault``, ``/srv/disk2``,
``/mnt/archive1``...). The test runs its blocks with bash after moving those paths
into ``tmp_path`` (``/srv/x`` becomes ``<tmp_path>/srv/x``) and the DICOM port 11112
to a free one; nothing else is changed. Between how-tos it checks what the text
says a user will see, with ``studyvault ... --json`` (run in the test's process).

Markers in the guide (HTML comments, invisible when rendered):

- ``<!-- howto: NAME -->`` starts a how-to; its ``sh`` blocks run in order.
- before a block: ``<!-- skip-run: REASON -->`` (not run: it needs root, systemd,
  a disk or a NAS), optionally ``<!-- instead: COMMAND -->`` run in its place;
  ``<!-- exit: N -->`` (the block must exit with N, not 0);
  ``<!-- expect: TEXT -->`` (its output must contain TEXT).

Blocks run one bash process each (``set -eo pipefail``); exported variables and
the working folder carry over to the next block, as in one terminal session.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from test_receiver import free_port

from studyvault.testing.dicomgen import make_study

HOWTO = Path(__file__).parent.parent / "docs" / "howto.md"

# What issue #8 asks the guide to walk through, in the guide's order.
HOWTOS = [
    "receive",
    "add-storage",
    "move-image-dir",
    "archive-old",
    "move-all",
    "move-out",
    "move-archive",
    "delete",
    "network-share",
    "backup",
    "recover-index",
    "recover-disk",
    "recover-disk-no-backup",
]
MAX_SKIPPED_BLOCKS = 10  # root/systemd/NAS lines only; keep the guide runnable

_SERVER_PATHS = re.compile(r"(?<![\w.~/-])/(var/lib/studyvault|srv|mnt|media)(?=[/\s\"']|$)", re.M)
_MARKER = re.compile(r"^\s*<!--\s*([\w-]+):\s*(.*?)\s*-->\s*$")
_FENCE = re.compile(r"^(\s*)```(\w*)\s*$")


@dataclass
class Block:
    howto: str
    line: int
    lang: str
    text: str
    skip: str | None = None
    instead: list[str] = field(default_factory=list)
    exit: int = 0
    expect: list[str] = field(default_factory=list)


def parse_guide(text: str) -> list[Block]:
    """Every fenced block inside a how-to, with the markers just before it."""
    blocks: list[Block] = []
    howto: str | None = None
    markers: list[tuple[str, str]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        marker = _MARKER.match(line)
        fence = _FENCE.match(line)
        if marker and marker.group(1) == "howto":
            howto, markers = marker.group(2), []
        elif marker:
            markers.append((marker.group(1), marker.group(2)))
        elif fence:
            indent, lang = fence.groups()
            body: list[str] = []
            i += 1
            while not lines[i].strip() == "```":
                body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i])
                i += 1
            if howto is not None:
                block = Block(howto, i - len(body), lang, "\n".join(body) + "\n")
                for key, value in markers:
                    if key == "skip-run":
                        block.skip = value
                    elif key == "instead":
                        block.instead.append(value)
                    elif key == "exit":
                        block.exit = int(value)
                    elif key == "expect":
                        block.expect.append(value)
                    else:
                        raise AssertionError(f"howto.md:{i}: unknown marker {key!r}")
                blocks.append(block)
            markers = []
        elif line.strip():
            markers = []
        i += 1
    return blocks


BLOCKS = parse_guide(HOWTO.read_text())


def test_the_guide_has_every_how_to_the_issue_asks_for():
    found = list(dict.fromkeys(b.howto for b in BLOCKS))
    assert found == HOWTOS
    for name in HOWTOS:
        runnable = [b for b in BLOCKS if b.howto == name and b.lang == "sh" and not b.skip]
        assert runnable, f"how-to {name} has no sh block that runs"
    skipped = [b for b in BLOCKS if b.skip]
    assert all(b.lang == "sh" for b in skipped)
    assert len(skipped) <= MAX_SKIPPED_BLOCKS, [f"howto.md:{b.line}" for b in skipped]


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"(?m)^#+ (.+)$", re.sub(r"(?ms)^\s*```.*?^\s*```", "", markdown))
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_the_guides_links_lead_somewhere():
    docs = HOWTO.parent
    for page in ["howto.md", "guide.md"]:
        text = (docs / page).read_text()
        for target, anchor in re.findall(r"\]\(([\w.-]*\.(?:md|service)|)(?:#([\w-]+))?\)", text):
            linked = docs / (target or page)
            assert linked.exists(), f"{page} links to missing {target}"
            if anchor:
                assert anchor in _anchors(linked.read_text()), (
                    f"{page}: no #{anchor} in {linked.name}"
                )


# -- the sandbox ---------------------------------------------------------------------------


TODAY = dt.date.today()  # once, so that a run across midnight stays consistent


def years_ago(years: int) -> str:
    today = TODAY
    try:
        day = today.replace(year=today.year - years)
    except ValueError:  # 29 February
        day = today.replace(year=today.year - years, day=28)
    return day.strftime("%Y%m%d")


@dataclass
class Sandbox:
    root: Path
    port: int
    env: dict[str, str]
    run: Callable[..., Any]  # conftest's in-process ``studyvault ARGS``
    log: list[str] = field(default_factory=list)
    before: Any = None  # the study list before a disaster

    def path(self, server_path: str) -> Path:
        return Path(self.rewrite(server_path))

    def rewrite(self, text: str) -> str:
        text = _SERVER_PATHS.sub(lambda m: f"{self.root}{m.group(0)}", text)
        return re.sub(r"\b11112\b", str(self.port), text)

    @property
    def env_file(self) -> Path:
        return self.root / ".howto-env"

    def bash(self, script: str, *, expect_exit: int = 0, where: str = "") -> str:
        wrapper = (
            "set -eo pipefail\n"
            f"source {self.env_file}\n"
            f"trap 'export -p > {self.env_file}.new; "
            f'echo "cd $(printf %q "$PWD")" >> {self.env_file}.new\' EXIT\n'
            f"{script}"
        )
        result = subprocess.run(
            ["bash", "-c", wrapper],
            env=self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.log.append(f"--- {where}\n$ {script}{result.stdout}{result.stderr}")
        assert result.returncode == expect_exit, (
            f"{where} exited {result.returncode}, expected {expect_exit}\n"
            f"$ {script}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )
        os.replace(f"{self.env_file}.new", self.env_file)
        return result.stdout + result.stderr

    def run_block(self, block: Block) -> None:
        where = f"docs/howto.md:{block.line} ({block.howto})"
        if block.skip:
            for command in block.instead:
                self.bash(self.rewrite(command) + "\n", where=where + " instead")
            return
        out = self.bash(self.rewrite(block.text), expect_exit=block.exit, where=where)
        for text in block.expect:
            assert text in out, f"{where}: output lacks {text!r}:\n{out}"

    def cli(self, *args: str) -> Any:
        """``studyvault ARGS --json``, parsed (run in this process: quicker)."""
        result = self.run(*args, "--json")
        assert result.code == 0, result.err
        return result.json()

    def studies(self) -> dict[str, dict[str, Any]]:
        return {s["patient_name"] + " " + s["study_date"]: s for s in self.cli("studies")}

    def config(self) -> Path:
        return self.path("/var/lib/studyvault/studyvault.toml")


def _tool_path() -> str:
    """DCMTK's storescu/echoscu first (pynetdicom ships its own in the virtual
    environment), then this environment's studyvault, then the rest."""
    venv_bin = os.path.dirname(sys.executable)
    rest = os.environ.get("PATH", "")
    dcmdump = shutil.which("dcmdump", path=rest.replace(venv_bin + os.pathsep, ""))
    assert dcmdump, "DCMTK is missing: run scripts/bootstrap"
    return os.pathsep.join([os.path.dirname(dcmdump), venv_bin, rest])


@pytest.fixture
def sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run, dcmtk) -> Iterator[Sandbox]:
    root = tmp_path
    home = root / "home"
    home.mkdir()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("STUDYVAULT_", "PYTEST_", "COV_")) and k != "TCP_NODELAY"
    }
    env.update(
        PATH=_tool_path(),
        HOME=str(home),
        STUDYVAULT_HOME=str(home / ".local/share/studyvault"),
        STUDYVAULT_CONFIG=str(root / "var/lib/studyvault/studyvault.toml"),
        COLUMNS="200",
        LC_ALL="C.UTF-8",
    )
    assert shutil.which("studyvault", path=env["PATH"]), "studyvault is not installed"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    sb = Sandbox(root, free_port(), env, run)
    sb.env_file.write_text(f"cd {home}\n")
    # Mount points as on a server; a fresh filesystem has lost+found, so the guide must
    # put each storage in a folder on the disk, as it says.
    for mount in ["srv/disk2", "srv/disk3", "mnt/archive1", "mnt/archive2", "mnt/usb",
                  "mnt/nas", "mnt/offsite"]:  # fmt: skip
        (root / mount / "lost+found").mkdir(parents=True)
    (root / "var/lib").mkdir(parents=True)
    # the study a device sends, the old system's export, a patient's CD
    make_study(sb.path("/media/usb/DICOM"), n_instances=3, study_date=years_ago(0),
               patient_name="NOVAK^EVA", patient_id="P500")  # fmt: skip
    export = sb.path("/srv/old-pacs-export")
    for folder, years, name, pid, modality, n in [
        ("a", 12, "MILLER^ANNA", "P100", "CT", 2),
        ("b", 11, "MILLER^ANNA", "P100", "US", 1),
        ("c", 8, "BROWN^PAUL", "P300", "CR", 1),
        ("d", 6, "GARCIA^LUIS", "P400", "MR", 1),
        ("e", 1, "SMITH^JOHN", "P200", "CT", 2),
    ]:
        make_study(export / folder, n_instances=n, study_date=years_ago(years),
                   patient_name=name, patient_id=pid, modality=modality)  # fmt: skip
    make_study(sb.path("/media/cdrom"), n_instances=1, study_date=years_ago(2),
               patient_name="WEBER^TOM", patient_id="P600")  # fmt: skip
    yield sb
    pid_file = sb.path("/var/lib/studyvault/serve.pid")
    if pid_file.exists():  # a failed run left the service it started
        try:
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


# -- what each how-to leaves behind, as a user would see it -----------------------------


def set_config(sb: Sandbox, table: str, key: str, value: str) -> None:
    text = sb.config().read_text()
    new = re.sub(rf"(?m)^({key} = ).*$", rf"\g<1>{value}", text, count=1)
    assert new != text and f"[{table}]" in text
    sb.config().write_text(new)


def before_archive_old(sb: Sandbox) -> None:
    # The studies were imported seconds ago; the guide's tasks should not wait the
    # default ten minutes of stable_age_minutes for them.
    set_config(sb, "studyvault", "stable_age_minutes", "0.0")


def after_receive(sb: Sandbox) -> None:
    studies = sb.studies()
    assert len(studies) == 6
    received = studies["NOVAK^EVA " + _iso(years_ago(0))]
    assert received["instances"] == 3 and received["status"] == "online"
    assert {c["storage"] for s in studies.values() for c in s["copies"]} == {"Image Center Storage"}
    assert not sb.path("/var/lib/studyvault/serve.pid").exists()
    assert "received 3 instances" in sb.path("/var/lib/studyvault/serve.log").read_text()
    status = sb.cli("status")
    assert status["running"] is False


def after_add_storage(sb: Sandbox) -> None:
    dirs = {d["name"]: d for d in sb.cli("image-dirs", "list")}
    assert dirs["Disk 2"]["incoming"] and dirs["Disk 2"]["studies"] == 1
    assert sb.studies()["WEBER^TOM " + _iso(years_ago(2))]["copies"][0]["storage"] == "Disk 2"
    assert (sb.path("/srv/disk2/studyvault") / "image_directory.key").exists()


def after_move_image_dir(sb: Sandbox) -> None:
    disk2 = next(d for d in sb.cli("image-dirs", "list") if d["name"] == "Disk 2")
    assert disk2["path"] == str(sb.path("/srv/disk3/studyvault"))
    assert disk2["status"] == "Online" and disk2["studies"] == 1
    assert not sb.path("/srv/disk2/studyvault").exists()
    assert list(sb.path("/srv/disk3/studyvault/studies").rglob("*.dcm"))


def after_archive_old(sb: Sandbox) -> None:
    archived = {k for k, s in sb.studies().items() if s["status"] == "archived"}
    assert archived == {
        "MILLER^ANNA " + _iso(years_ago(12)),
        "MILLER^ANNA " + _iso(years_ago(11)),
        "BROWN^PAUL " + _iso(years_ago(8)),
    }
    [task] = sb.cli("tasks", "list")
    assert task["schedule"] == "SaSu:10:00pm-4:00am"
    assert task["status"] == "Completed 3/3 studies [0 errors]"
    shown = sb.cli("tasks", "show", "Archive Old Studies")["config"]
    assert shown["throttle_ms"] == 200 and shown["older_than_years"] == 7
    dicomdirs = list(sb.path("/mnt/archive1/archive/studies").glob("*/*/DICOMDIR"))
    assert len(dicomdirs) == 3


def after_move_all(sb: Sandbox) -> None:
    assert [d["name"] for d in sb.cli("image-dirs", "list")] == ["Disk 2"]
    online = [s for s in sb.studies().values() if s["status"] == "online"]
    assert len(online) == 4 and all(s["copies"][0]["storage"] == "Disk 2" for s in online)
    assert not sb.path("/var/lib/studyvault/images").exists()
    [task] = sb.cli("tasks", "list")
    assert "from S:Disk 2" in task["description"]


def after_move_out(sb: Sandbox) -> None:
    studies = sb.studies()
    assert "GARCIA^LUIS " + _iso(years_ago(6)) not in studies and len(studies) == 6
    assert [a["name"] for a in sb.cli("archives", "list")] == ["My Study Archive"]
    [marker] = sb.path("/mnt/usb/hand-over/studies").rglob(".studyvault-moved-out")
    assert (marker.parent / "DICOMDIR").exists()
    assert [e["op"] for e in sb.cli("audit")].count("move-out") == 1


def after_move_archive(sb: Sandbox) -> None:
    [archive] = sb.cli("archives", "list")
    assert archive["status"] == "Online" and archive["studies"] == 3
    assert archive["path"] == str(sb.path("/mnt/archive2/archive"))
    assert not sb.path("/mnt/archive1/archive").exists()
    assert len([s for s in sb.studies().values() if s["status"] == "archived"]) == 3


def after_delete(sb: Sandbox) -> None:
    studies = sb.studies()
    assert len(studies) == 4
    assert not any(k.startswith("MILLER^ANNA") for k in studies)
    deleted = [e for e in sb.cli("audit") if e["op"] == "delete"]
    assert len(deleted) == 2 and {e["patient_name"] for e in deleted} == {"MILLER^ANNA"}


def after_network_share(sb: Sandbox) -> None:
    nas = next(a for a in sb.cli("archives", "list") if a["name"] == "NAS Archive")
    assert nas["status"] == "Online"
    assert (sb.path("/mnt/nas/studyarchive") / "folder_archive.key").exists()


def after_backup(sb: Sandbox) -> None:
    offsite = sb.path("/mnt/offsite/studyvault")
    names = {p.name for p in offsite.iterdir()}
    assert names == {"home.tar", "disk2.tar", "archive.tar", "nas-archive.tar"}
    assert not sb.path("/srv/restore-test").exists()


def before_recover_index(sb: Sandbox) -> None:
    sb.before = sb.cli("studies")
    shutil.rmtree(sb.path("/var/lib/studyvault/index"))  # the disaster


def after_recover_index(sb: Sandbox) -> None:
    assert sb.cli("studies") == sb.before
    assert not list(sb.path("/var/lib/studyvault").glob("index.replaced-*"))


def before_recover_disk(sb: Sandbox) -> None:
    sb.before = sb.cli("studies")
    shutil.rmtree(sb.path("/srv/disk3/studyvault"))  # the disk died; a new one is mounted


def after_recover_disk(sb: Sandbox) -> None:
    assert sb.cli("studies") == sb.before
    assert sb.run("verify").code == 0


def before_recover_disk_no_backup(sb: Sandbox) -> None:
    # a study fetched from the archive is on Disk 2 too when it dies
    archived = next(s for s in sb.studies().values() if s["status"] == "archived")
    assert sb.run("study", "fetch", archived["study_uid"]).code == 0
    shutil.rmtree(sb.path("/srv/disk3/studyvault"))  # the disk died; no backup this time


def after_recover_disk_no_backup(sb: Sandbox) -> None:
    [left] = sb.studies().values()
    assert left["patient_name"] == "BROWN^PAUL" and left["status"] == "archived"
    assert [c["storage"] for c in left["copies"]] == ["My Study Archive"]
    disk2 = next(d for d in sb.cli("image-dirs", "list") if d["name"] == "Disk 2")
    assert disk2["status"] == "Online" and disk2["studies"] == 0 and disk2["incoming"]
    assert disk2["path"] == str(sb.path("/srv/disk3/studyvault"))
    forgotten = [e for e in sb.cli("audit") if e["op"] == "forget"]
    assert len(forgotten) == 4 and {e["source"] for e in forgotten} == {"Disk 2"}
    assert sb.run("check").code == 0 and sb.run("verify").code == 0


def _iso(yyyymmdd: str) -> str:
    return f"{yyyymmdd[:4]}-{yyyymmdd[4:6]}-{yyyymmdd[6:]}"


BEFORE: dict[str, Callable[[Sandbox], None]] = {
    "archive-old": before_archive_old,
    "recover-index": before_recover_index,
    "recover-disk": before_recover_disk,
    "recover-disk-no-backup": before_recover_disk_no_backup,
}
AFTER: dict[str, Callable[[Sandbox], None]] = {
    "receive": after_receive,
    "add-storage": after_add_storage,
    "move-image-dir": after_move_image_dir,
    "archive-old": after_archive_old,
    "move-all": after_move_all,
    "move-out": after_move_out,
    "move-archive": after_move_archive,
    "delete": after_delete,
    "network-share": after_network_share,
    "backup": after_backup,
    "recover-index": after_recover_index,
    "recover-disk": after_recover_disk,
    "recover-disk-no-backup": after_recover_disk_no_backup,
}


def test_every_how_to_runs_in_order_and_does_what_it_says(sandbox: Sandbox):
    assert set(AFTER) == set(HOWTOS)
    for name in HOWTOS:
        if name in BEFORE:
            BEFORE[name](sandbox)
        for block in BLOCKS:
            if block.howto == name and block.lang == "sh":
                sandbox.run_block(block)
        try:
            AFTER[name](sandbox)
        except AssertionError as exc:
            ran = "\n".join(sandbox.log[-4:])
            raise AssertionError(f"after how-to {name}: {exc}\nlast blocks run:\n{ran}") from exc
