"""Loading plugins: the plugin manager and the registries of storage kinds and actions.

Loading is explicit (:func:`load_plugins`) and idempotent; importing studyvault loads
nothing. Built-in plugins are found through the same ``studyvault`` entry-point group
as third-party ones. ``STUDYVAULT_BLOCK_PLUGINS=name1,name2`` blocks plugins by their
entry-point name.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import Any, Generic, TypeVar

import msgspec
import pluggy

from . import hookspecs
from .errors import PluginError, UnknownActionError

log = logging.getLogger(__name__)

BLOCK_ENV = "STUDYVAULT_BLOCK_PLUGINS"

T = TypeVar("T")


class Registry(Generic[T]):
    """Classes registered by plugins under a unique name.

    :param what: what the registry holds, for messages ("storage kind", "action").
    :param attr: the class variable that names a class (``kind`` or ``name``).
    """

    def __init__(self, what: str, attr: str) -> None:
        self.what = what
        self.attr = attr
        self._items: dict[str, tuple[type[T], str]] = {}

    def registrar(self, plugin: str) -> Any:
        """The ``register`` callable handed to one plugin's registration hook."""

        def register(cls: type[T]) -> None:
            name = getattr(cls, self.attr, None)
            if not isinstance(name, str) or not name:
                message = f"plugin {plugin!r} registered {cls!r} without a {self.attr!r} name"
                raise PluginError(message)
            if name in self._items:
                other = self._items[name][1]
                message = f"{self.what} {name!r} is registered by both {other!r} and {plugin!r}"
                raise PluginError(message)
            self._items[name] = (cls, plugin)

        return register

    def get(self, name: str) -> type[T]:
        try:
            return self._items[name][0]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "none"
            message = f"unknown {self.what} {name!r} (known: {known})"
            if self.what == "action":
                raise UnknownActionError(message) from None
            raise PluginError(message) from None

    def plugin_of(self, name: str) -> str:
        return self._items[name][1]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterable[type[T]]:
        return iter(cls for cls, _ in self._items.values())


class PluginInfo(msgspec.Struct, kw_only=True):
    """One loaded plugin, as ``studyvault plugins`` shows it."""

    name: str
    distribution: str
    version: str
    hooks: list[str]
    storage_kinds: list[str]
    actions: list[str]


class PluginHost:
    """The plugin manager and what the plugins registered."""

    def __init__(self, extra: Iterable[object] = (), *, entry_points: bool = True) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.blocked = sorted(
            {n.strip() for n in os.environ.get(BLOCK_ENV, "").split(",") if n.strip()}
        )
        for name in self.blocked:
            self.pm.set_blocked(name)
        try:
            if entry_points:
                self.pm.load_setuptools_entrypoints(hookspecs.PROJECT)
            for plugin in extra:
                self.pm.register(plugin, name=_plugin_name(plugin))
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"plugin {exc.plugin!r} is invalid: {exc}") from exc
        except ImportError as exc:
            raise PluginError(f"a studyvault plugin failed to import: {exc}") from exc
        from .actions import Action
        from .storage import Storage

        self.storage_kinds: Registry[Storage] = Registry("storage kind", "kind")
        self.actions: Registry[Action] = Registry("action", "name")
        self._collect("studyvault_register_storage_kinds", self.storage_kinds)
        self._collect("studyvault_register_actions", self.actions)

    def _collect(self, hook_name: str, registry: Registry[Any]) -> None:
        caller = getattr(self.pm.hook, hook_name)
        for impl in caller.get_hookimpls():
            plugin_name = impl.plugin_name
            impl.function(register=registry.registrar(plugin_name))

    @property
    def hook(self) -> Any:
        return self.pm.hook

    def notify(self, event: str, **kwargs: Any) -> None:
        """Call an event hook; a failing plugin is logged, never fatal."""
        try:
            getattr(self.pm.hook, f"studyvault_{event}")(**kwargs)
        except Exception:  # a plugin's bug must not undo a committed operation
            log.exception("plugin hook studyvault_%s failed", event)

    def describe(self) -> list[PluginInfo]:
        dists = {id(plugin): dist for plugin, dist in self.pm.list_plugin_distinfo()}
        infos = []
        for name, plugin in self.pm.list_name_plugin():
            if plugin is None:
                continue
            dist = dists.get(id(plugin))
            callers = self.pm.get_hookcallers(plugin) or []
            infos.append(
                PluginInfo(
                    name=name,
                    distribution=dist.project_name if dist else "(not installed)",
                    version=dist.version if dist else "",
                    hooks=sorted(c.name for c in callers),
                    storage_kinds=[
                        k
                        for k in self.storage_kinds.names()
                        if self.storage_kinds.plugin_of(k) == name
                    ],
                    actions=[a for a in self.actions.names() if self.actions.plugin_of(a) == name],
                )
            )
        return sorted(infos, key=lambda i: i.name)


def _plugin_name(plugin: object) -> str:
    """A readable name for a plugin registered in code (a module or an object)."""
    name = getattr(plugin, "__name__", None) or type(plugin).__qualname__
    return str(name)


_host: PluginHost | None = None


def load_plugins() -> PluginHost:
    """Load every plugin once (later calls return the same host)."""
    global _host
    if _host is None:
        _host = PluginHost()
    return _host


def reset_plugins() -> None:
    """Forget the loaded plugins (tests; a changed block list)."""
    global _host
    _host = None
