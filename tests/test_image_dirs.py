"""Managing image directories: list, add, remove, incoming, mount."""

from __future__ import annotations

import shutil

from studyvault.testing.dicomgen import make_study


def test_list_shows_name_studies_and_free_space(home, run, tmp_path):
    make_study(tmp_path / "s", n_instances=2)
    run("import", tmp_path / "s")
    result = run("image-dirs", "list")
    assert result.code == 0
    assert "Image Center Storage" in result.out and "Free Space" in result.out
    [row] = run("image-dirs", "list", "--json").json()
    assert row["studies"] == 1 and row["free_bytes"] > 0 and row["status"] == "Online"


def test_add_creates_a_key_file_and_refuses_a_folder_with_other_files(home, run, tmp_path):
    assert run("image-dirs", "add", "Disk 2", tmp_path / "d2").code == 0
    assert (tmp_path / "d2" / "image_directory.key").exists()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "holiday.jpg").write_bytes(b"x")
    result = run("image-dirs", "add", "Disk 3", tmp_path / "busy")
    assert result.code == 2 and "is not empty" in result.err
    assert run("image-dirs", "add", "Disk 2", tmp_path / "other").code == 2  # name taken
    assert run("image-dirs", "add", "Disk 4", tmp_path / "d2").code == 2  # folder taken


def test_remove_refuses_while_the_directory_holds_studies(home, run, tmp_path):
    run("image-dirs", "add", "Disk 2", tmp_path / "d2")
    make_study(tmp_path / "s", n_instances=1)
    run("import", tmp_path / "s", "--to", "Disk 2")
    result = run("image-dirs", "remove", "Disk 2")
    assert result.code == 2 and "still holds 1 studies" in result.err
    assert [r["name"] for r in run("image-dirs", "list", "--json").json()] == [
        "Image Center Storage",
        "Disk 2",
    ]


def test_remove_an_empty_directory_and_switch_incoming(home, run, tmp_path):
    run("image-dirs", "add", "Disk 2", tmp_path / "d2")
    assert run("image-dirs", "incoming", "Disk 2").code == 0
    make_study(tmp_path / "s", n_instances=1)
    run("import", tmp_path / "s")
    rows = {r["name"]: r for r in run("image-dirs", "list", "--json").json()}
    assert rows["Disk 2"]["incoming"] and rows["Disk 2"]["studies"] == 1
    assert run("image-dirs", "remove", "Image Center Storage").code == 0
    assert [r["name"] for r in run("image-dirs", "list", "--json").json()] == ["Disk 2"]
    assert (home / "images" / "image_directory.key").exists()  # folder left on disk


def test_a_moved_image_directory_is_adopted_with_its_studies(home, run, tmp_path):
    run("image-dirs", "add", "Disk 2", tmp_path / "d2")
    make_study(tmp_path / "s", n_instances=3)
    run("import", tmp_path / "s", "--to", "Disk 2")
    (tmp_path / "d2").rename(tmp_path / "d2-moved")
    # a fresh install that knows nothing about the folder adopts it with its studies
    other = tmp_path / "other"
    run("init", other)
    result = run(
        "--config",
        other / "studyvault.toml",
        "image-dirs",
        "add",
        "Old Disk",
        tmp_path / "d2-moved",
    )
    assert result.code == 0, result.err
    studies = run("--config", other / "studyvault.toml", "studies", "--json").json()
    assert len(studies) == 1 and studies[0]["instances"] == 3


def test_remove_refuses_while_a_task_uses_the_directory(home, run, add_task, tmp_path):
    run("image-dirs", "add", "Disk 2", tmp_path / "d2")
    assert add_task("Fill Disk 2", "move", "--all", to="Disk 2", throttle_ms=None).code == 0
    result = run("image-dirs", "remove", "Disk 2")
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1
    assert 'task "Fill Disk 2" uses it' in result.err
    assert 'studyvault tasks remove "Fill Disk 2"' in result.err
    assert run("tasks", "list").code == 0
    assert run("tasks", "remove", "Fill Disk 2").code == 0
    assert run("image-dirs", "remove", "Disk 2").code == 0


def image_dir(run, name: str) -> dict:
    return next(r for r in run("image-dirs", "list", "--json").json() if r["name"] == name)


def test_a_missing_image_directory_folder_is_offline_and_never_recreated(
    home, run, add_task, tmp_path
):
    run("image-dirs", "add", "Disk 2", tmp_path / "d2")
    make_study(tmp_path / "s", n_instances=1)
    assert run("import", tmp_path / "s", "--to", "Disk 2").code == 0
    (tmp_path / "d2").rename(tmp_path / "d2-unmounted")  # the disk is not mounted

    assert image_dir(run, "Disk 2")["status"] == "Offline"
    assert "Offline" in run("image-dirs", "list").out
    make_study(tmp_path / "new", n_instances=1)
    refused = run("import", tmp_path / "new", "--to", "Disk 2")
    assert refused.code == 2 and "Disk 2 is offline" in refused.err
    add_task(
        "Empty Disk 2",
        "move",
        "--all",
        source="Disk 2",
        to="Image Center Storage",
        throttle_ms=None,
    )
    ran = run("tasks", "run", "Empty Disk 2")
    assert ran.code == 2 and "Disk 2 is offline" in ran.err
    assert len(ran.err.strip().splitlines()) == 1
    assert not (tmp_path / "d2").exists()  # no empty look-alike on the wrong disk

    (tmp_path / "d2-unmounted").rename(tmp_path / "d2")  # mounted again
    assert image_dir(run, "Disk 2")["status"] == "Online"
    assert run("tasks", "run", "Empty Disk 2").code == 0


def test_a_missing_default_image_directory_is_offline_too(home, run, tmp_path):
    (home / "images").rename(tmp_path / "elsewhere")
    assert image_dir(run, "Image Center Storage")["status"] == "Offline"
    assert not (home / "images").exists()


def test_received_studies_skip_an_offline_incoming_directory(home, tmp_path, caplog):
    from studyvault.dicom import read_header
    from studyvault.incoming import IncomingStore
    from studyvault.vault import Vault

    with Vault.open() as vault:
        from studyvault.admin import add_image_directory, set_incoming

        add_image_directory(vault, "Disk 2", tmp_path / "d2", min_free_mb=1)
        set_incoming(vault, "Disk 2")
    (tmp_path / "d2").rename(tmp_path / "d2-unmounted")
    paths = make_study(tmp_path / "s", n_instances=2)
    with Vault.open() as vault:
        store = IncomingStore(vault, home / "receiving.log", persist_switch=False)
        store.start()
        try:
            for path in paths:
                store.store(path.read_bytes(), read_header(path), "network:CARM1")
        finally:
            store.close()
        [study] = list(vault.index.iter_studies())
        assert [vault.storage_name(s) for s in study.copies] == ["Image Center Storage"]
    assert "new studies now go to image directory Image Center Storage" in caplog.text
    assert "Disk 2 is offline" in caplog.text
    assert not (tmp_path / "d2").exists()


# -- image-dirs mount ---------------------------------------------------------------------


def disk2_with_a_study(run, tmp_path, n_instances: int = 2) -> None:
    assert run("image-dirs", "add", "Disk 2", tmp_path / "d2").code == 0
    make_study(tmp_path / "s", n_instances=n_instances, patient_name="MOUNT^ME")
    assert run("import", tmp_path / "s", "--to", "Disk 2").code == 0


def test_a_moved_image_directory_is_mounted_at_its_new_path(home, run, tmp_path):
    disk2_with_a_study(run, tmp_path)
    config = home / "studyvault.toml"
    config.write_text(config.read_text() + "# keep me: a note of the admin\n")
    shutil.copytree(tmp_path / "d2", tmp_path / "d3", symlinks=True)
    (tmp_path / "d2").rename(tmp_path / "d2.old")  # the old copy is out of the way

    result = run("image-dirs", "mount", tmp_path / "d3")
    assert result.code == 0, result.err
    assert f"Mounted image directory Disk 2 at {tmp_path / 'd3'} (Online)" in result.out
    assert f"it was at {tmp_path / 'd2'}" in result.out
    row = image_dir(run, "Disk 2")
    assert row["path"] == str(tmp_path / "d3") and row["status"] == "Online"
    assert row["studies"] == 1
    assert "# keep me: a note of the admin" in config.read_text()
    assert run("verify", "Disk 2").code == 0
    assert run("check").code == 0
    [study] = run("studies", "--json").json()
    assert study["copies"][0]["storage"] == "Disk 2" and study["instances"] == 2
    # mounting it again where it is changes nothing
    again = run("image-dirs", "mount", tmp_path / "d3", "--json")
    assert again.code == 0 and again.json()["outcome"] == "unchanged"


def test_mount_refuses_two_live_copies_of_one_image_directory(home, run, tmp_path):
    disk2_with_a_study(run, tmp_path)
    shutil.copytree(tmp_path / "d2", tmp_path / "d3", symlinks=True)
    result = run("image-dirs", "mount", tmp_path / "d3")
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1
    assert "two live copies of one image directory" in result.err
    assert f"Disk 2 is still at {tmp_path / 'd2'}" in result.err
    assert image_dir(run, "Disk 2")["path"] == str(tmp_path / "d2")


def test_mount_refuses_a_folder_without_an_image_directory_key(home, run, tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.jpg").write_bytes(b"x")
    result = run("image-dirs", "mount", tmp_path / "photos")
    assert result.code == 2 and "holds no image_directory.key" in result.err
    assert len(result.err.strip().splitlines()) == 1
    missing = run("image-dirs", "mount", tmp_path / "nowhere")
    assert missing.code == 2 and "no such folder" in missing.err
    assert not (tmp_path / "nowhere").exists()


def test_mount_refuses_an_archive(home, run, tmp_path):
    assert run("archives", "add", "Archive", tmp_path / "arch").code == 0
    result = run("image-dirs", "mount", tmp_path / "arch")
    assert result.code == 2 and "is a folder archive, not an image directory" in result.err
    assert "studyvault archives mount" in result.err
    # an image directory key that carries an archive's id
    archive_id = run("archives", "list", "--json").json()[0]["id"]
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "image_directory.key").write_text(f'id = "{archive_id}"\n')
    odd = run("image-dirs", "mount", tmp_path / "odd")
    assert odd.code == 2 and "holds the key of archive 'Archive'" in odd.err
    assert len(run("image-dirs", "list", "--json").json()) == 1


def test_an_unknown_image_directory_is_added_and_indexed(home, run, tmp_path):
    other = tmp_path / "other"
    assert run("init", other).code == 0
    cfg = other / "studyvault.toml"
    make_study(tmp_path / "s", n_instances=3)
    assert run("--config", cfg, "image-dirs", "add", "Their Disk", tmp_path / "theirs").code == 0
    assert run("--config", cfg, "import", tmp_path / "s", "--to", "Their Disk").code == 0

    result = run("image-dirs", "mount", tmp_path / "theirs", "--name", "Old Disk")
    assert result.code == 0, result.err
    assert "Added image directory Old Disk" in result.out and "indexed 1 studies" in result.out
    assert image_dir(run, "Old Disk")["studies"] == 1
    [study] = run("studies", "--json").json()
    assert study["instances"] == 3 and study["copies"][0]["storage"] == "Old Disk"
    assert run("verify", "Old Disk").code == 0


def test_an_empty_folder_replaces_a_dead_image_directory_by_name(home, run, tmp_path):
    disk2_with_a_study(run, tmp_path)
    shutil.rmtree(tmp_path / "d2")  # the disk died
    assert image_dir(run, "Disk 2")["status"] == "Offline"
    # without --name an empty folder is not an image directory
    assert run("image-dirs", "mount", tmp_path / "new").code == 2
    # an Online image directory is not replaced by an empty folder
    online = run("image-dirs", "mount", tmp_path / "new", "--name", "Image Center Storage")
    assert online.code == 2 and "is Online at" in online.err

    result = run("image-dirs", "mount", tmp_path / "new", "--name", "Disk 2")
    assert result.code == 0, result.err
    assert "The index still lists 1 studies in it" in result.out
    row = image_dir(run, "Disk 2")
    assert row["status"] == "Online" and row["path"] == str(tmp_path / "new")
    assert (tmp_path / "new" / "image_directory.key").exists()
    assert "missing-study: Disk 2" in run("check").out
