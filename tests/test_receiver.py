"""Receiving studies over the DICOM network: ``studyvault serve`` on a free loopback port,
fed by pynetdicom and by DCMTK's storescu, echoscu.

The service runs in its own process, as in production; the tests look at what a user
would: statuses the devices get, ``studyvault studies --json`` from another process, the
files in the image directory, the service's log.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest
import tomlkit
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE, _config
from pynetdicom.sop_class import Verification

from studyvault.config import write_starter
from studyvault.incoming import IncomingStore, recover_received
from studyvault.testing.dicomgen import make_instance, make_study
from studyvault.vault import Vault

AE_TITLE = "STUDYVAULT"
DEVICES = ["MODALITY", "STORESCU", "ECHOSCU", "CARM1", "CARM2", "CARM3", "CARM4"]
SUCCESS, OUT_OF_RESOURCES, DUPLICATE_SOP = 0x0000, 0xA700, 0x0111
COMPRESSED_PIXELS = encapsulate([b"\xff\xd8" + bytes(300) + b"\xff\xd9"])
IMAGE = dict(
    Rows=16,
    Columns=16,
    BitsAllocated=8,
    BitsStored=8,
    HighBit=7,
    SamplesPerPixel=1,
    PixelRepresentation=0,
    PhotometricInterpretation="MONOCHROME2",
)


# -- a `studyvault serve` in its own process ----------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_vault(folder: Path, **changes: Any) -> Path:
    """A starter config in ``folder`` listening on a free loopback port; ``changes`` are
    ``table__key=value`` edits (``image_directories__min_free_mb`` edits the first)."""
    config = write_starter(folder)
    Vault.open(config).close()  # creates the image directory
    doc = tomlkit.parse(config.read_text())
    doc["receiver"]["host"] = "127.0.0.1"
    doc["receiver"]["port"] = free_port()
    doc["receiver"]["allowed_calling_ae_titles"] = DEVICES
    doc["image_directories"][0]["min_free_mb"] = 1
    for name, value in changes.items():
        table, key = name.split("__")
        target = doc[table][0] if table == "image_directories" else doc[table]
        target[key] = value
    config.write_text(tomlkit.dumps(doc))
    return config


@dataclass
class Served:
    """A running ``studyvault serve``."""

    config: Path
    process: subprocess.Popen[bytes]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def folder(self) -> Path:
        return self.config.parent

    @property
    def port(self) -> int:
        return int(tomlkit.parse(self.config.read_text())["receiver"]["port"])  # type: ignore[index,arg-type]

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``studyvault ARGS`` in another process, as an admin would run it."""
        return subprocess.run(
            [sys.executable, "-m", "studyvault", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def studies(self) -> list[dict[str, Any]]:
        """``studyvault studies --json``, run in another process."""
        result = self.cli("studies", "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def instance_counts(self) -> dict[str, int]:
        """Study UID -> instances, read from the index by this process (quicker)."""
        with Vault.open(self.config) as vault:
            return {s.study_uid: s.instance_count for s in vault.index.iter_studies()}

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout)


def serve(config: Path, *, wait: bool = True, grace: float = 1.0) -> Served:
    env = {**os.environ, "STUDYVAULT_CONFIG": str(config), "TCP_NODELAY": "1"}
    log_path = config.parent / f"serve-{time.monotonic_ns()}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "studyvault", "serve", "--grace", str(grace)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    served = Served(config, process, log_path, env)
    if wait:
        deadline = time.monotonic() + 30
        while "receiving as" not in served.log:
            if process.poll() is not None or time.monotonic() > deadline:
                served.stop(signal.SIGKILL)
                pytest.fail(f"studyvault serve did not start:\n{served.log}")
            time.sleep(0.05)
    return served


@pytest.fixture
def served_factory(tmp_path: Path):
    """Start services with ``served_factory(**config_changes)``; all stop at the end."""
    running: list[Served] = []

    def start(name: str = "vault", grace: float = 1.0, **changes: Any) -> Served:
        served = serve(make_vault(tmp_path / name, **changes), grace=grace)
        running.append(served)
        return served

    yield start
    for served in running:
        served.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    """One service shared by the tests that only send to it."""
    service = serve(make_vault(tmp_path_factory.mktemp("shared")))
    yield service
    assert service.stop() == 0, service.log


@pytest.fixture(autouse=True)
def _raw_sending(monkeypatch: pytest.MonkeyPatch) -> None:
    # pynetdicom sends a file's encoded data set as it is, without decoding it
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


# -- sending --------------------------------------------------------------------------------


def send(
    port: int,
    items: Iterable[Path | Dataset],
    *,
    calling: str = "MODALITY",
    called: str = AE_TITLE,
    on_status: Callable[[Path | Dataset, int | None], None] | None = None,
    timeout: float = 5,
) -> list[int | None]:
    """Send ``items`` in one association; the status of each (None: no answer)."""
    items = list(items)
    ae = AE(ae_title=calling)
    # an answer that an aborted association never gets is not waited for long
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    for sop_class, syntax in sorted({_context(item) for item in items}):
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established, "association not accepted"
    # pynetdicom writes command and data set apart: without this, each instance waits
    # for a delayed ACK (~40 ms)
    assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    statuses: list[int | None] = []
    try:
        for item in items:
            if not assoc.is_established:
                statuses.append(None)
                continue
            answer = assoc.send_c_store(item)
            status = int(answer.Status) if answer and "Status" in answer else None
            statuses.append(status)
            if on_status is not None:
                on_status(item, status)
    finally:
        if assoc.is_established:
            assoc.release()
    return statuses


def _context(item: Path | Dataset) -> tuple[str, str]:
    if isinstance(item, Dataset):
        return str(item.SOPClassUID), str(item.file_meta.TransferSyntaxUID)
    meta = read_meta(item)
    return meta["sop_class"], meta["transfer_syntax"]


def read_meta(path: Path) -> dict[str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return {
        "sop_class": str(ds.file_meta.MediaStorageSOPClassUID),
        "sop": str(ds.file_meta.MediaStorageSOPInstanceUID),
        "transfer_syntax": str(ds.file_meta.TransferSyntaxUID),
    }


def data_set_bytes(path: Path) -> bytes:
    """The encoded data set of a PS3.10 file: everything after the file meta group."""
    data = path.read_bytes()
    assert data[128:132] == b"DICM", path
    tag, vr, length, group_length = struct.unpack_from("<I2sHI", data, 132)
    assert (tag, vr, length) == (0x00000002, b"UL", 4), path
    return data[132 + 12 + group_length :]


def stored_file(folder: Path, sop_uid: str) -> Path:
    [found] = list((folder / "images" / "studies").rglob(f"{sop_uid}.dcm"))
    return found


def varied_study(folder: Path) -> list[Path]:
    """One study in the transfer syntaxes devices send: uncompressed in both VRs and
    endiannesses, deflated, and (with placeholder frames: nothing is decoded) JPEG
    baseline, JPEG 2000 and RLE."""
    study = generate_uid()
    paths = []
    for i, syntax in enumerate(
        [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian],
        start=1,
    ):
        paths.append(
            make_instance(
                folder / f"u{i}", study_uid=study, transfer_syntax=syntax, InstanceNumber=i
            )
        )
    paths.append(
        make_instance(
            folder / "deflated", study_uid=study, transfer_syntax=DeflatedExplicitVRLittleEndian
        )
    )
    for syntax in (JPEGBaseline8Bit, JPEG2000Lossless, RLELossless):
        paths.append(
            make_instance(
                folder / f"c{syntax}",
                study_uid=study,
                transfer_syntax=syntax,
                pixel_bytes=0,
                PixelData=COMPRESSED_PIXELS,
                **IMAGE,
            )
        )
    return paths


def assert_arrived(served: Served, paths: list[Path], instances: int | None = None) -> None:
    """Every file is stored with its data set byte for byte, and indexed: its study is
    listed by ``studyvault studies --json`` with ``instances`` instances (by default as
    many as ``paths``)."""
    assert_stored(served, paths)
    study_uid = _study_uid(paths[0])
    [study] = [s for s in served.studies() if s["study_uid"] == study_uid]
    assert study["instances"] == (len(paths) if instances is None else instances)
    assert study["status"] == "online"


def assert_stored(served: Served, paths: list[Path]) -> None:
    """Every file is stored with its data set byte for byte."""
    for path in paths:
        meta = read_meta(path)
        stored = stored_file(served.folder, meta["sop"])
        assert data_set_bytes(stored) == data_set_bytes(path), path
        assert read_meta(stored)["transfer_syntax"] == meta["transfer_syntax"]


def _study_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def storescu(
    port: int, *args: str | Path, calling: str = "STORESCU"
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "storescu",
            "-R",
            "-aet",
            calling,
            "-aec",
            AE_TITLE,
            "127.0.0.1",
            str(port),
            *map(str, args),
        ],
        env={**os.environ, "TCP_NODELAY": "1"},
        capture_output=True,
        text=True,
        timeout=60,
    )


# -- tests ----------------------------------------------------------------------------------


def test_a_study_sent_with_pynetdicom_arrives_byte_identical_and_indexed(served, tmp_path):
    paths = varied_study(tmp_path / "study")

    assert send(served.port, paths) == [SUCCESS] * len(paths)

    assert_arrived(served, paths)
    stored = stored_file(served.folder, read_meta(paths[0])["sop"])
    assert b"MODALITY" in stored.read_bytes()[:400]  # (0002,0016) Source AE Title


def test_the_transfer_syntax_the_device_prefers_is_accepted(served, tmp_path):
    [jpeg] = [p for p in varied_study(tmp_path / "study") if p.name == f"c{JPEGBaseline8Bit}"]
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, [JPEGBaseline8Bit, ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", served.port, ae_title=AE_TITLE)
    try:
        [context] = assoc.accepted_contexts
        answer = assoc.send_c_store(jpeg)
    finally:
        assoc.release()

    assert context.transfer_syntax[0] == JPEGBaseline8Bit
    assert answer.Status == SUCCESS
    assert_stored(served, [jpeg])


def test_a_study_sent_with_storescu_arrives_byte_identical_and_indexed(served, tmp_path, dcmtk):
    paths = varied_study(tmp_path / "study")
    # storescu proposes one compressed transfer syntax per run, and converts a file when
    # the syntax it proposes first is not the file's
    flags = {
        str(ImplicitVRLittleEndian): "-xi",
        str(ExplicitVRBigEndian): "-xb",
        str(DeflatedExplicitVRLittleEndian): "-xd",
        str(JPEGBaseline8Bit): "-xy",
        str(JPEG2000Lossless): "-xv",
        str(RLELossless): "-xr",
    }
    runs: dict[str, list[Path]] = {}
    for path in paths:
        runs.setdefault(flags.get(read_meta(path)["transfer_syntax"], "-x="), []).append(path)

    for flag, files in runs.items():
        result = storescu(served.port, flag, *files)
        assert result.returncode == 0, result.stderr

    deflated = [
        p for p in paths if read_meta(p)["transfer_syntax"] == DeflatedExplicitVRLittleEndian
    ]
    assert_arrived(served, [p for p in paths if p not in deflated], instances=len(paths))
    # DCMTK inflates and deflates again: the same data set, other compressed bytes
    [path] = deflated
    stored = stored_file(served.folder, read_meta(path)["sop"])
    assert pydicom.dcmread(stored) == pydicom.dcmread(path)


def test_echoscu_verifies_the_connection(served, dcmtk):
    result = subprocess.run(
        ["echoscu", "-aet", "ECHOSCU", "-aec", AE_TITLE, "127.0.0.1", str(served.port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr


def test_an_unknown_calling_ae_title_is_rejected_at_association(served, tmp_path, dcmtk):
    ae = AE(ae_title="INTRUDER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", served.port, ae_title=AE_TITLE)
    assert assoc.is_rejected
    [path] = make_study(tmp_path / "study", n_instances=1)

    result = storescu(served.port, path, calling="INTRUDER")

    assert result.returncode != 0
    assert "Calling AE Title Not Recognized" in result.stderr
    assert not list((served.folder / "images" / "studies").rglob(f"{read_meta(path)['sop']}*"))
    assert "refused an association from INTRUDER" in served.log


def test_a_wrong_called_ae_title_is_rejected(served):
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", served.port, ae_title="SOMEONEELSE")
    assert assoc.is_rejected
    assert "called AE title 'SOMEONEELSE' is not 'STUDYVAULT'" in served.log


def test_devices_beyond_max_associations_are_asked_to_come_back(served_factory):
    served = served_factory(receiver__max_associations=1)
    first, second = AE(ae_title="CARM1"), AE(ae_title="CARM2")
    for ae in (first, second):
        ae.add_requested_context(Verification)
    open_one = first.associate("127.0.0.1", served.port, ae_title=AE_TITLE)
    try:
        assert open_one.is_established
        refused = second.associate("127.0.0.1", served.port, ae_title=AE_TITLE)
        assert refused.is_rejected
    finally:
        open_one.release()
    again = second.associate("127.0.0.1", served.port, ae_title=AE_TITLE)
    assert again.is_established
    again.release()
    assert "1 associations are open (max_associations)" in served.log


def test_a_data_set_without_study_uid_cannot_be_understood(served):
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.PatientName = "NO^STUDY"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", served.port, ae_title=AE_TITLE)
    try:
        answer = assoc.send_c_store(ds)
    finally:
        assoc.release()

    assert 0xC000 <= answer.Status <= 0xCFFF
    assert "StudyInstanceUID" in answer.ErrorComment
    assert not list((served.folder / "images" / "studies").rglob(f"{ds.SOPInstanceUID}*"))


def test_a_resent_instance_succeeds_and_is_stored_once(served, tmp_path):
    paths = make_study(tmp_path / "study", n_instances=2)
    assert send(served.port, paths) == [SUCCESS, SUCCESS]

    assert send(served.port, paths) == [SUCCESS, SUCCESS]

    assert served.instance_counts()[_study_uid(paths[0])] == 2


def test_a_conflicting_instance_is_refused_and_the_stored_one_kept(served, tmp_path):
    study, sop = generate_uid(), generate_uid()
    first = make_instance(tmp_path / "first", study_uid=study, sop_uid=sop)
    other = make_instance(tmp_path / "other", study_uid=study, sop_uid=sop, patient_name="X^Y")
    assert send(served.port, [first]) == [SUCCESS]

    assert send(served.port, [other]) == [DUPLICATE_SOP]

    assert data_set_bytes(stored_file(served.folder, sop)) == data_set_bytes(first)
    assert "already stored with different content" in served.log


def test_several_devices_send_at_once(served, tmp_path):
    studies = [make_study(tmp_path / f"s{i}", n_instances=8) for i in range(4)]
    results: dict[int, list[int | None]] = {}

    def device(i: int) -> None:
        results[i] = send(served.port, studies[i], calling=f"CARM{i + 1}")

    threads = [threading.Thread(target=device, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert results == {i: [SUCCESS] * 8 for i in range(4)}
    counts = served.instance_counts()
    for paths in studies:
        assert_stored(served, paths)
        assert counts[_study_uid(paths[0])] == 8


def test_a_full_image_directory_refuses_with_out_of_resources(served_factory, tmp_path):
    served = served_factory(image_directories__min_free_mb=1 << 40)
    paths = make_study(tmp_path / "study", n_instances=2)

    assert send(served.port, paths) == [OUT_OF_RESOURCES, OUT_OF_RESOURCES]

    assert not list((served.folder / "images" / "studies").rglob("*"))
    assert served.instance_counts() == {}
    assert "Image Center Storage is full" in served.log


def test_incoming_moves_to_the_next_image_directory_with_room(served_factory, tmp_path, run):
    config = make_vault(tmp_path / "vault", image_directories__min_free_mb=1 << 40)
    added = run(
        "--config", config, "image-dirs", "add", "Second", tmp_path / "second", "--min-free-mb", "0"
    )
    assert added.code == 0, added.err
    served = serve(config)
    try:
        paths = make_study(tmp_path / "study", n_instances=3)

        assert send(served.port, paths) == [SUCCESS] * 3

        [study] = served.studies()
        assert [c["storage"] for c in study["copies"]] == ["Second"]
        assert len(list((tmp_path / "second" / "studies").rglob("*.dcm"))) == 3
        assert 'incoming = "Second"' in config.read_text()
        assert "new studies now go to image directory Second" in served.log
    finally:
        assert served.stop() == 0


def numbered_study(folder: Path, count: int) -> dict[Path, str]:
    """``count`` small instances of one study: path -> SOPInstanceUID."""
    study, sops = generate_uid(), {}
    for i in range(count):
        sop = generate_uid()
        path = make_instance(folder / f"IM{i}", study_uid=study, sop_uid=sop, pixel_bytes=256)
        sops[path] = sop
    return sops


def test_sigterm_while_receiving_loses_nothing_acknowledged(served_factory, tmp_path):
    served = served_factory(grace=0.2)
    sops = numbered_study(tmp_path / "study", 400)
    paths = list(sops)
    acknowledged: list[str] = []

    def on_status(path: Path | Dataset, status: int | None) -> None:
        if status == SUCCESS:
            acknowledged.append(sops[path])  # type: ignore[index]
            if len(acknowledged) == 40:
                served.process.send_signal(signal.SIGTERM)

    statuses = send(served.port, paths, on_status=on_status, timeout=1)

    assert served.process.wait(30) == 0, served.log
    assert statuses.count(SUCCESS) == len(acknowledged) >= 40
    assert len(acknowledged) < len(paths), "the service should have stopped the transfer"
    assert "stopping (SIGTERM)" in served.log
    with Vault.open(served.config) as vault:
        for sop in acknowledged:
            study = vault.index.study_of_sop(sop)
            assert study is not None, sop
            assert stored_file(served.folder, sop).exists()


def test_sigkill_after_acknowledgement_loses_nothing(served_factory, tmp_path):
    served = served_factory()
    sops = numbered_study(tmp_path / "study", 300)
    paths = list(sops)
    acknowledged: list[str] = []

    def on_status(path: Path | Dataset, status: int | None) -> None:
        if status == SUCCESS:
            acknowledged.append(sops[path])  # type: ignore[index]
            if len(acknowledged) == 60:
                served.process.send_signal(signal.SIGKILL)

    try:
        send(served.port, paths, on_status=on_status, timeout=1)
    except (AssertionError, OSError):
        pass
    served.process.wait(30)

    again = serve(served.config)  # indexes what the killed service had not committed
    try:
        with Vault.open(served.config) as vault:
            for sop in acknowledged:
                assert vault.index.study_of_sop(sop) is not None, sop
    finally:
        assert again.stop() == 0


def test_instances_a_killed_service_did_not_index_are_indexed_by_housekeeping(tmp_path, run):
    config = make_vault(tmp_path / "vault")
    paths = make_study(tmp_path / "study", n_instances=3)
    from studyvault.dicom import read_header

    with Vault.open(config) as vault:
        store = IncomingStore(vault, tmp_path / "vault" / "receiving.log", commit_seconds=3600)
        store.start()
        for path in paths:
            store.store(path.read_bytes(), read_header(path), "network:MODALITY")
        # the process dies here: nothing was committed, the files are durable
        assert vault.index.count_studies() == 0

    result = run("--config", config, "housekeeping", "--json")

    assert result.code == 0, result.err
    assert result.json()["received_recovered"] == 3
    with Vault.open(config) as vault:
        [study] = list(vault.index.iter_studies())
        assert study.instance_count == 3
    assert not (tmp_path / "vault" / "receiving.log").exists()
    with Vault.open(config) as vault:  # nothing is left to do
        assert recover_received(vault, tmp_path / "vault" / "receiving.log") == 0
