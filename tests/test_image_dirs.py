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
