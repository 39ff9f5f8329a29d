"""Managing image directories: list, add, remove, incoming."""

from __future__ import annotations

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


def test_remove_refuses_while_a_task_uses_the_directory(home, run, tmp_path):
    run("image-dirs", "add", "Disk 2", tmp_path / "d2")
    assert run(
        "tasks", "add", "Fill Disk 2", "--action", "move",
        "--from", "Image Center Storage", "--to", "Disk 2", "--all",
    ).code == 0  # fmt: skip
    result = run("image-dirs", "remove", "Disk 2")
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1
    assert 'task "Fill Disk 2" uses it' in result.err
    assert 'studyvault tasks remove "Fill Disk 2"' in result.err
    assert run("tasks", "list").code == 0
    assert run("tasks", "remove", "Fill Disk 2").code == 0
    assert run("image-dirs", "remove", "Disk 2").code == 0


def image_dir(run, name: str) -> dict:
    return next(r for r in run("image-dirs", "list", "--json").json() if r["name"] == name)


def test_a_missing_image_directory_folder_is_offline_and_never_recreated(home, run, tmp_path):
    run("image-dirs", "add", "Disk 2", tmp_path / "d2")
    make_study(tmp_path / "s", n_instances=1)
    assert run("import", tmp_path / "s", "--to", "Disk 2").code == 0
    (tmp_path / "d2").rename(tmp_path / "d2-unmounted")  # the disk is not mounted

    assert image_dir(run, "Disk 2")["status"] == "Offline"
    assert "Offline" in run("image-dirs", "list").out
    make_study(tmp_path / "new", n_instances=1)
    refused = run("import", tmp_path / "new", "--to", "Disk 2")
    assert refused.code == 2 and "Disk 2 is offline" in refused.err
    run(
        "tasks", "add", "Empty Disk 2", "--action", "move",
        "--from", "Disk 2", "--to", "Image Center Storage", "--all",
    )  # fmt: skip
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
