"""The plugin system: built-ins load like third-party plugins; names are unique."""

from __future__ import annotations

import pytest

from studyvault import Role, hookimpl
from studyvault.errors import PluginError
from studyvault.manager import PluginHost


def test_plugins_lists_builtins_with_their_distribution(run):
    result = run("plugins", "--json")
    assert result.code == 0, result.err
    plugins = {p["name"]: p for p in result.json()}
    assert plugins["image_directory"]["distribution"] == "studyvault"
    assert plugins["image_directory"]["storage_kinds"] == ["image_directory"]
    assert "studyvault_register_storage_kinds" in plugins["image_directory"]["hooks"]
    table = run("plugins")
    assert "image_directory" in table.out


def test_a_plugin_can_be_blocked_by_environment_variable(run, monkeypatch):
    monkeypatch.setenv("STUDYVAULT_BLOCK_PLUGINS", "image_directory")
    names = [p["name"] for p in run("plugins", "--json").json()]
    assert "image_directory" not in names


def test_loading_is_explicit_and_idempotent():
    import studyvault.manager as manager

    manager.reset_plugins()
    assert manager._host is None  # importing studyvault loaded nothing
    first = manager.load_plugins()
    assert manager.load_plugins() is first


def test_a_kind_registered_twice_names_both_plugins():
    from studyvault.plugins.image_directory import ImageDirectory

    class Impostor:
        @hookimpl
        def studyvault_register_storage_kinds(self, register):
            register(ImageDirectory)

    with pytest.raises(PluginError) as info:
        PluginHost([Impostor()])
    message = str(info.value)
    assert "storage kind 'image_directory' is registered by both" in message
    assert "'image_directory'" in message and "Impostor" in message


def test_a_misspelled_hook_fails_loudly():
    class Typo:
        @hookimpl
        def studyvault_register_storage_kind(self, register):  # missing "s"
            pass

    with pytest.raises(PluginError, match="studyvault_register_storage_kind"):
        PluginHost([Typo()])


def test_a_third_party_kind_registers_through_the_public_api():
    from studyvault.plugins.image_directory import ImageDirectory

    class RamDisk(ImageDirectory):
        kind = "ramdisk"

    class Plugin:
        @hookimpl
        def studyvault_register_storage_kinds(self, register):
            register(RamDisk)

    host = PluginHost([Plugin()])
    assert host.storage_kinds.get("ramdisk") is RamDisk
    assert host.storage_kinds.get("ramdisk").role is Role.IMAGE_DIRECTORY
    assert "ramdisk" in {k for info in host.describe() for k in info.storage_kinds}
