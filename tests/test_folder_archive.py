"""Folder archives: what is on disk, and the `archives` commands."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
import uuid
import zipfile
from pathlib import Path

import msgspec
import pytest
from pydicom import dcmread
from pydicom.fileset import FileSet

from studyvault.errors import StorageError, StorageFullError, StorageOfflineError
from studyvault.plugins.folder_archive import FolderArchive, FolderArchiveConfig
from studyvault.storage import Status
from studyvault.testing.conformance import SourceStudy, make_source_study, read_back, store
from studyvault.testing.dicomgen import make_study
from studyvault.transfer import transfer_study
from studyvault.vault import Vault

needs_tools = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("dcmdump", "sha256sum", "unzip")),
    reason="needs DCMTK's dcmdump, sha256sum and unzip",
)
VARIANTS = [("readable", False), ("uid", False), ("readable", True), ("uid", True)]


def new_archive(tmp_path: Path, naming: str = "readable", zip: bool = False, **kw) -> FolderArchive:
    config = FolderArchiveConfig(
        name="My Study Archive",
        id=str(uuid.uuid4()),
        path=str(tmp_path / "archive"),
        naming=naming,
        zip=zip,
        **kw,
    )
    archive = FolderArchive(config)
    archive.create()
    return archive


def archive_study(study_uid: str, to: str = "My Study Archive", **options: object) -> None:
    """Archive one imported study with the engine's transfer protocol."""
    with Vault.open() as vault:
        source = vault.storage_by_id(next(iter(vault.index.get_study(study_uid).copies)))
        transfer_study(vault, study_uid, source, vault.storage(to), op="archive", **options)


def import_study(run, folder: Path, **attrs: object) -> str:
    paths = make_study(folder, n_instances=attrs.pop("n_instances", 3), n_series=2, **attrs)
    assert run("import", folder).code == 0
    return str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)


def row(run, name: str, *config: object) -> dict:
    rows = run(*config, "archives", "list", "--json").json()
    return next(r for r in rows if r["name"] == name)


def files_outside(tmp_path: Path, *inside: Path) -> set[Path]:
    return {
        p
        for p in tmp_path.rglob("*")
        if p.is_file() and not any(p.is_relative_to(folder) for folder in inside)
    }


def unpacked(archive: FolderArchive, location: str, tmp_path: Path) -> Path:
    """The study folder, or for a zip the folder it unzips to (with `unzip`)."""
    if not location.endswith(".zip"):
        return archive.root / location
    out = tmp_path / "unzipped"
    subprocess.run(["unzip", "-q", str(archive.root / location), "-d", str(out)], check=True)
    return out


def assert_standalone_fileset(folder: Path, source: SourceStudy) -> None:
    """What a viewer, DCMTK and `sha256sum -c` see in one study folder."""
    dump = subprocess.run(["dcmdump", str(folder / "DICOMDIR")], capture_output=True, text=True)
    assert dump.returncode == 0, dump.stderr
    for inst in source.instances:
        assert inst.sop_uid in dump.stdout
    fs = FileSet(dcmread(folder / "DICOMDIR"))
    assert {i.SOPInstanceUID for i in fs} == {i.sop_uid for i in source.instances}
    for instance in fs:
        assert Path(instance.path).is_file()
        assert instance.load().SOPInstanceUID == instance.SOPInstanceUID
    check = subprocess.run(
        ["sha256sum", "-c", "manifest-sha256.txt"], cwd=folder, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.count(": OK") == len(source.instances) + 1  # and the DICOMDIR


# -- what a stored study looks like on disk ---------------------------------------------


@needs_tools
@pytest.mark.parametrize(("naming", "zip"), VARIANTS)
def test_each_archived_study_is_a_standalone_dicom_fileset(tmp_path, naming, zip) -> None:
    archive = new_archive(tmp_path, naming, zip)
    source = make_source_study(tmp_path / "source", n_instances=5, n_series=2)
    plan = store(archive, source)

    uid = source.study.study_uid
    expected = {
        "readable": r"studies/2010/20100101 DOE JOHN [0-9a-f]{8}",
        "uid": re.escape(f"studies/{uid}"),
    }[naming] + (r"\.zip" if zip else "")
    assert re.fullmatch(expected, plan.location), plan.location
    assert_standalone_fileset(unpacked(archive, plan.location, tmp_path), source)
    assert sorted(plan.paths.values()) == [
        "DICOM/S0000001/I0000001",
        "DICOM/S0000001/I0000002",
        "DICOM/S0000001/I0000003",
        "DICOM/S0000002/I0000001",
        "DICOM/S0000002/I0000002",
    ]


@needs_tools
def test_zipped_study_is_stored_uncompressed(tmp_path) -> None:
    archive = new_archive(tmp_path, zip=True)
    plan = store(archive, make_source_study(tmp_path / "source"))
    with zipfile.ZipFile(archive.root / plan.location) as zf:
        names = zf.namelist()
        assert names[0] == "DICOMDIR" and names[-1] == "manifest-sha256.txt"
        assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_STORED}
    assert list(archive.root.joinpath("staging").iterdir()) == []


@needs_tools
def test_study_missing_optional_attributes_still_gets_a_readable_dicomdir(tmp_path) -> None:
    archive = new_archive(tmp_path)
    source = make_source_study(
        tmp_path / "source",
        patient_name="",
        study_date="",
        StudyID=None,
        StudyTime=None,
        SeriesNumber=None,
        InstanceNumber=None,
    )
    plan = store(archive, source)
    assert re.fullmatch(r"studies/unknown-date/unknown-date UNKNOWN [0-9a-f]{8}", plan.location)
    assert_standalone_fileset(archive.root / plan.location, source)


def test_key_file_names_the_archive_and_its_options(tmp_path) -> None:
    archive = new_archive(tmp_path, "uid", True)
    key = tomllib.loads((archive.root / "folder_archive.key").read_text())
    assert key["id"] == archive.id and key["name"] == "My Study Archive"
    assert (key["kind"], key["naming"], key["compression"]) == ("folder", "uid", "zip")
    assert key["format_version"] == 1 and key["created"]
    assert (archive.root / "studies").is_dir()


# -- names from DICOM values --------------------------------------------------------------

HOSTILE_NAMES = [
    "../../x",
    "/",
    "\\",
    "..\\..\\x",
    "A\x00B",
    "\x1b[31mRED\x07\r\n",
    "CON",
    "com1.txt",
    "X" * 300,
    "山田^太郎",
    "Παπαδόπουλος^Γιώργος",
    " . ",
    "",
]


@pytest.mark.filterwarnings("ignore:The PN component length")
def test_hostile_patient_names_stay_inside_the_archive_and_never_collide(tmp_path) -> None:
    archive = new_archive(tmp_path)
    locations = []
    for n, name in enumerate(HOSTILE_NAMES * 2):  # twice: same names, other studies
        source = make_source_study(tmp_path / "source" / str(n), n_instances=1, n_series=1)
        source.study = msgspec.structs.replace(source.study, patient_name=name)
        locations.append(store(archive, source).location)

    assert len(set(locations)) == len(locations)
    year = (archive.root / "studies" / "2010").resolve()
    for location in locations:
        assert (archive.root / location).resolve().parent == year, location
        assert len(location.rsplit("/", 1)[1].encode()) <= 255
    assert sorted(archive.iter_studies()) == sorted(locations)
    assert files_outside(tmp_path, archive.root, tmp_path / "source") == set()


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_hostile_study_uids_stay_inside_an_archive_with_uid_naming(tmp_path) -> None:
    archive = new_archive(tmp_path, "uid")
    locations = []
    for n, uid in enumerate(["../../x", "1.2.3/../../x", "CON", "/etc", "1.2.3 x"]):
        source = make_source_study(tmp_path / "source" / str(n), n_instances=1, study_uid=uid)
        locations.append(store(archive, source).location)
    assert len(set(locations)) == len(locations)
    for location in locations:
        assert (archive.root / location).resolve().parent == (archive.root / "studies").resolve()
    assert files_outside(tmp_path, archive.root, tmp_path / "source") == set()


def test_a_location_taken_by_another_study_gets_a_longer_suffix(tmp_path) -> None:
    archive = new_archive(tmp_path)
    first = make_source_study(tmp_path / "a")
    second = make_source_study(tmp_path / "b")
    taken = archive.plan_store(second.study, second.instances).location
    # another study already sits where the second one would go (a short-id collision)
    shutil.copytree(archive.root / store(archive, first).location, archive.root / taken)

    plan = store(archive, second)
    assert plan.location != taken
    assert plan.location.startswith(taken) and len(plan.location) == len(taken) + 4
    assert set(read_back(archive, plan.location).values()) == second.digests()
    assert set(read_back(archive, taken).values()) == first.digests()


# -- refusals -----------------------------------------------------------------------------


def test_a_zip_slip_member_is_refused_and_never_extracted(tmp_path) -> None:
    archive = new_archive(tmp_path)
    evil = archive.root / "studies" / "2010" / "20100101 EVIL 00000000.zip"
    evil.parent.mkdir(parents=True)
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("DICOMDIR", b"")
        zf.writestr("../../escaped.dcm", b"DICM")
    location = "studies/2010/20100101 EVIL 00000000.zip"
    assert location in archive.iter_studies()

    with pytest.raises(StorageError, match=r"EVIL 00000000\.zip.*'\.\./\.\./escaped\.dcm'"):
        list(archive.iter_files(location))
    with pytest.raises(StorageError, match="escaped"):
        archive.open_file(location, "../../escaped.dcm")
    with pytest.raises(StorageError):
        archive.open_file(location, "DICOMDIR")  # the whole zip is refused
    assert files_outside(tmp_path, archive.root) == set()


def test_a_store_that_would_eat_into_the_reserve_is_refused_before_writing(tmp_path) -> None:
    archive = new_archive(tmp_path, min_free_mb=1 << 40)
    source = make_source_study(tmp_path / "source")
    before = sorted(archive.root.rglob("*"))
    plan = archive.plan_store(source.study, source.instances)
    with pytest.raises(StorageFullError, match="My Study Archive is full"):
        archive.write_staging(plan, source.study, source.items())
    assert sorted(archive.root.rglob("*")) == before


def test_an_unmounted_archive_stores_nothing(tmp_path) -> None:
    archive = new_archive(tmp_path)
    unmounted = FolderArchive(msgspec.structs.replace(archive.settings, mounted=False))
    assert unmounted.status() is Status.UNMOUNTED
    source = make_source_study(tmp_path / "source")
    plan = unmounted.plan_store(source.study, source.instances)
    with pytest.raises(StorageOfflineError, match="unmounted"):
        unmounted.write_staging(plan, source.study, source.items())


# -- moved out of studyvault --------------------------------------------------------------


@pytest.mark.parametrize("zip", [False, True])
def test_a_moved_out_mark_stays_beside_the_study_until_it_is_stored_again(tmp_path, zip) -> None:
    archive = new_archive(tmp_path, zip=zip)
    source = make_source_study(tmp_path / "source")
    plan = store(archive, source)
    assert not archive.is_moved_out(plan.location)
    archive.mark_moved_out(plan.location)
    assert archive.is_moved_out(plan.location)
    assert list(archive.iter_studies()) == [plan.location]  # the marker is not a study
    assert set(read_back(archive, plan.location).values()) == source.digests()

    store(archive, source)  # the study came back into studyvault and was archived again
    assert not archive.is_moved_out(plan.location)
    archive.mark_moved_out(plan.location)
    archive.remove_study(plan.location)
    assert list((archive.root / "studies" / "2010").iterdir()) == []


# -- the archives commands ----------------------------------------------------------------


def test_add_creates_the_archive_and_lists_it(home, run, tmp_path) -> None:
    result = run("archives", "add", "My Study Archive", tmp_path / "arch")
    assert result.code == 0, result.err
    assert (tmp_path / "arch" / "folder_archive.key").is_file()
    result = run("archives", "add", "Zipped", tmp_path / "zipped", "--naming", "uid", "--zip")
    assert result.code == 0, result.err

    first = row(run, "My Study Archive")
    assert first["description"] == f"{tmp_path / 'arch'} [readable file naming]"
    assert (first["status"], first["studies"], first["last_stored"]) == ("Online", 0, "never")
    assert first["free_bytes"] > 0 and first["kind"] == "folder"
    assert row(run, "Zipped")["description"].endswith("zipped [UID file naming, zip]")
    table = run("archives", "list").out
    for heading in ("Name", "Type", "Description", "Status", "Studies", "Free Space", "Last"):
        assert heading in table
    assert "Folder" in table and "never" in table

    added = run("archives", "add", "Third", tmp_path / "third", "--json").json()
    assert added["name"] == "Third" and added["status"] == "Online"


def test_add_refuses_bad_folders_names_and_options(home, run, tmp_path) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "holiday.jpg").write_bytes(b"x")
    result = run("archives", "add", "A", busy)
    assert result.code == 2 and "is not empty" in result.err and len(result.err.splitlines()) == 1
    assert list(busy.iterdir()) == [busy / "holiday.jpg"]

    assert run("archives", "add", "A", tmp_path / "a").code == 0
    assert "already the folder of 'A'" in run("archives", "add", "B", tmp_path / "a").err
    new_archive(tmp_path / "elsewhere")  # an archive this install does not know yet
    assert "archives mount" in run("archives", "add", "B", tmp_path / "elsewhere/archive").err
    assert "already the name" in run("archives", "add", "A", tmp_path / "other").err
    bad = run("archives", "add", "C", tmp_path / "c", "--naming", "dates")
    assert bad.code == 2 and "--naming" in bad.err and not (tmp_path / "c").exists()


def test_archived_studies_are_counted_with_the_last_store_time(home, run, tmp_path) -> None:
    run("archives", "add", "My Study Archive", tmp_path / "arch")
    uid = import_study(run, tmp_path / "in")
    archive_study(uid)
    listed = row(run, "My Study Archive")
    assert listed["studies"] == 1 and listed["last_stored"] != "never"
    [study] = run("studies", "--json").json()
    assert study["status"] == "archived"
    assert re.fullmatch(
        r"studies/2010/20100101 DOE JOHN [0-9a-f]{8}", study["copies"][0]["location"]
    )


def test_unmount_move_and_mount_at_the_new_place(home, run, tmp_path) -> None:
    run("archives", "add", "My Study Archive", tmp_path / "arch", "--zip")
    uid = import_study(run, tmp_path / "in")
    archive_study(uid)

    refused = run("archives", "unmount", "My Study Archive")
    assert refused.code == 2 and "--confirm UNMOUNT" in refused.err
    assert row(run, "My Study Archive")["status"] == "Online"
    assert run("archives", "unmount", "My Study Archive", "--confirm", "UNMOUNT").code == 0
    assert row(run, "My Study Archive")["status"] == "Unmounted"
    assert run("studies", "--json").json()[0]["status"] == "archived"

    (tmp_path / "arch").rename(tmp_path / "moved")
    result = run("archives", "mount", tmp_path / "moved")
    assert result.code == 0, result.err
    assert "Mounted archive My Study Archive" in result.out
    listed = row(run, "My Study Archive")
    assert (listed["status"], listed["studies"]) == ("Online", 1)
    assert listed["path"] == str(tmp_path / "moved")
    with Vault.open() as vault:  # the study reads back whole from its new place
        archive, study = vault.storage("My Study Archive"), vault.index.get_study(uid)
        recorded = {i.paths[archive.id]: i.sha256 for i in vault.index.instances(uid)}
        assert read_back(archive, study.copies[archive.id]) == recorded


def test_a_vanished_folder_shows_offline_and_comes_back_online(home, run, tmp_path) -> None:
    run("archives", "add", "Network Share", tmp_path / "share")
    (tmp_path / "share").rename(tmp_path / "gone")
    assert row(run, "Network Share")["status"] == "Offline"
    assert "Offline" in run("archives", "list").out
    (tmp_path / "gone").rename(tmp_path / "share")
    assert row(run, "Network Share")["status"] == "Online"


def test_mounting_an_unknown_archive_registers_it_and_indexes_its_studies(
    home, run, tmp_path
) -> None:
    run("archives", "add", "My Study Archive", tmp_path / "arch")
    kept = import_study(run, tmp_path / "in1")
    gone = import_study(run, tmp_path / "in2", patient_name="ROE^JANE")
    archive_study(kept)
    archive_study(gone, keep_in_list=False)  # moved out of studyvault into the archive
    assert [s["study_uid"] for s in run("studies", "--json").json()] == [kept]

    other = tmp_path / "other"
    run("init", other)
    config = ("--config", other / "studyvault.toml")
    run(*config, "archives", "add", "My Study Archive", tmp_path / "other-arch")
    result = run(*config, "archives", "mount", tmp_path / "arch", "--json")
    assert result.code == 0, result.err
    mounted = result.json()
    assert mounted["registered"] and mounted["studies_indexed"] == 1 and mounted["moved_out"] == 1
    assert mounted["archive"]["name"] == "My Study Archive (2)"
    [study] = run(*config, "studies", "--json").json()
    assert (study["study_uid"], study["status"], study["instances"]) == (kept, "archived", 3)


def test_mount_refuses_a_folder_that_is_not_an_archive(home, run, tmp_path) -> None:
    (tmp_path / "plain").mkdir()
    result = run("archives", "mount", tmp_path / "plain")
    assert result.code == 2 and "holds no folder_archive.key" in result.err
    assert "no such folder" in run("archives", "mount", tmp_path / "nowhere").err
    assert "image directory" in run("archives", "mount", home / "images").err
    assert run("archives", "list", "--json").json() == []


def test_remove_refuses_while_studies_are_archived_there(home, run, tmp_path) -> None:
    run("archives", "add", "My Study Archive", tmp_path / "arch")
    run("archives", "add", "Spare", tmp_path / "spare")
    archive_study(import_study(run, tmp_path / "in"))
    result = run("archives", "remove", "My Study Archive")
    assert result.code == 2 and "still holds 1 archived studies" in result.err
    assert run("archives", "remove", "Spare").code == 0
    assert [r["name"] for r in run("archives", "list", "--json").json()] == ["My Study Archive"]
    assert (tmp_path / "spare" / "folder_archive.key").exists()  # left on disk
    assert "image directory" in run("archives", "remove", "Image Center Storage").err


def test_a_bad_naming_in_the_config_names_the_field(home, run, tmp_path) -> None:
    run("archives", "add", "My Study Archive", tmp_path / "arch")
    path = home / "studyvault.toml"
    path.write_text(path.read_text().replace('naming = "readable"', 'naming = "dates"'))
    result = run("archives", "list")
    assert result.code == 2
    assert "archives[0]" in result.err and "naming must be 'readable' or 'uid'" in result.err


def test_remove_refuses_while_a_task_uses_the_archive(home, run, add_task, tmp_path) -> None:
    run("archives", "add", "A", tmp_path / "a")
    add_task("T", "archive", "--all", to="A", throttle_ms=None)
    result = run("archives", "remove", "A")
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1
    assert 'task "T" uses it' in result.err and 'studyvault tasks remove "T"' in result.err
    assert run("tasks", "list").code == 0
    assert [r["name"] for r in run("archives", "list", "--json").json()] == ["A"]
    assert run("tasks", "remove", "T").code == 0
    assert run("archives", "remove", "A").code == 0


def test_an_unmounted_archive_shows_no_last_store_time(home, run, tmp_path) -> None:
    run("archives", "add", "My Study Archive", tmp_path / "arch")
    archive_study(import_study(run, tmp_path / "in"))
    assert run("archives", "unmount", "My Study Archive", "--confirm", "UNMOUNT").code == 0
    [line] = [x for x in run("archives", "list").out.splitlines() if "My Study Archive" in x]
    cells = [c.strip() for c in line.strip("│ ").split("│")]
    assert cells[3] == "Unmounted" and cells[5:] == ["-", "-"]
