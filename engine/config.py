"""The TOML config file: msgspec Structs to read it, tomlkit to edit it.

Reading validates everything up front: a bad value is a :class:`ConfigError` that
names the file and the field. Commands that change the setup (``image-dirs add`` …)
edit the file with tomlkit, which keeps the admin's comments and ordering, check
the edited text by loading it, and replace the file atomically.
"""

from __future__ import annotations

import os
import re
import tomllib
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import tomlkit

from .errors import ConfigError
from .fsutil import atomic_write_bytes
from .storage import StorageConfig

CONFIG_ENV = "STUDYVAULT_CONFIG"
HOME_ENV = "STUDYVAULT_HOME"
CONFIG_NAME = "studyvault.toml"


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The ``[studyvault]`` table."""

    data_dir: str = "."
    incoming: str = ""
    stable_age_minutes: float = 10.0
    log_file: str = ""
    log_level: str = "INFO"


class ReceiverConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The ``[receiver]`` table: the DICOM C-STORE/C-ECHO listener of ``serve``."""

    ae_title: str = "STUDYVAULT"
    host: str = "0.0.0.0"
    port: int = 11112
    allowed_calling_ae_titles: list[str] = []
    allowed_hosts: list[str] = []
    max_associations: int = 10


class FetchConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The ``[fetch]`` table."""

    keep_days: int = 14


class TaskConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One ``[[tasks]]`` entry: a named storage task."""

    name: str
    action: str
    from_: str = msgspec.field(name="from")
    to: str = ""
    older_than_years: int | None = None
    dates: str = ""
    all: bool = False
    days: list[str] = []
    hours: str = ""
    throttle_ms: int = 200


Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
Positive = Annotated[float, msgspec.Meta(gt=0)]


class EmailChannel(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One ``[[alerts.email]]`` entry: alerts sent through an SMTP server. The password
    is never written in the config: it comes from ``password_env`` or ``password_file``."""

    name: str = ""
    host: str
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 587
    tls: Literal["starttls", "ssl", "none"] = "starttls"
    user: str = ""
    password_env: str = ""
    password_file: str = ""
    sender: str = msgspec.field(name="from")
    to: Annotated[list[str], msgspec.Meta(min_length=1)]
    timeout_s: Positive = 10.0


class WebhookChannel(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One ``[[alerts.webhook]]`` entry: alerts POSTed as JSON to a URL."""

    name: str = ""
    url: str
    format: Literal["json", "slack", "teams", "ntfy"] = "json"
    token_env: str = ""
    timeout_s: Positive = 10.0


class AlertsConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The ``[alerts]`` table: what is watched, and how often a problem is repeated."""

    repeat_minutes: Positive = 240.0
    check_seconds: Positive = 60.0
    free_warning_gb: Annotated[float, msgspec.Meta(ge=0)] = 50.0
    free_critical_gb: Annotated[float, msgspec.Meta(ge=0)] = 10.0
    task_overdue_days: Annotated[int, msgspec.Meta(ge=0)] = 8
    rejected_associations: Annotated[int, msgspec.Meta(ge=0)] = 5
    rejected_window_minutes: Positive = 60.0
    email: list[EmailChannel] = []
    webhook: list[WebhookChannel] = []


class MetricsConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The ``[metrics]`` table: Prometheus metrics and ``/healthz`` of ``serve``."""

    host: str = "127.0.0.1"
    port: Port = 0


class _RawConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    studyvault: Settings = Settings()
    receiver: ReceiverConfig = ReceiverConfig()
    fetch: FetchConfig = FetchConfig()
    alerts: AlertsConfig = AlertsConfig()
    metrics: MetricsConfig = MetricsConfig()
    image_directories: list[dict[str, Any]] = []
    archives: list[dict[str, Any]] = []
    tasks: list[TaskConfig] = []


class Config(msgspec.Struct, kw_only=True):
    """The whole config, with each storage entry decoded by its kind."""

    path: Path
    studyvault: Settings
    receiver: ReceiverConfig
    fetch: FetchConfig
    image_directories: list[StorageConfig]
    archives: list[StorageConfig]
    tasks: list[TaskConfig]
    kinds: dict[str, str] = {}  # storage name -> storage kind name
    alerts: AlertsConfig = AlertsConfig()
    metrics: MetricsConfig = MetricsConfig()

    @property
    def base(self) -> Path:
        """Folder that relative paths in the config are relative to."""
        return self.path.parent

    @property
    def data_dir(self) -> Path:
        path = Path(self.studyvault.data_dir).expanduser()
        return path if path.is_absolute() else self.base / path

    @property
    def index_dir(self) -> Path:
        return self.data_dir / "index"

    def storage_config(self, name: str) -> StorageConfig | None:
        for entry in [*self.image_directories, *self.archives]:
            if entry.name == name:
                return entry
        return None

    def task(self, name: str) -> TaskConfig | None:
        return next((t for t in self.tasks if t.name == name), None)

    def tasks_using(self, storage: str) -> list[TaskConfig]:
        """The tasks whose ``from`` or ``to`` names the storage called ``storage``."""
        return [t for t in self.tasks if storage in (t.from_, t.to)]


_FIELD_RE = re.compile(r" - at `\$(?P<where>[^`]*)`")


def _explain(path: Path, exc: msgspec.ValidationError, prefix: str = "") -> ConfigError:
    text = str(exc)
    match = _FIELD_RE.search(text)
    where = prefix
    if match:
        where += match.group("where").replace("[", "[").lstrip(".")
        text = text[: match.start()]
    where = where.strip(".") or "(top level)"
    return ConfigError(f"{path}: {where}: {text}")


def load_config(path: Path, kinds: Callable[[str], type[Any]] | None = None) -> Config:
    """Read and validate the config at ``path``.

    :param kinds: maps a storage kind name to its :class:`~studyvault.storage.Storage`
        class (from the loaded plugins); needed to decode storage entries.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found (run `studyvault init`)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc}") from None
    return parse_config(text, path, kinds)


def parse_config(text: str, path: Path, kinds: Callable[[str], type[Any]] | None = None) -> Config:
    """Validate config ``text`` (as read from ``path``)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    _refuse_passwords(data, path)
    try:
        raw = msgspec.convert(data, _RawConfig)
    except msgspec.ValidationError as exc:
        raise _explain(path, exc) from None
    if kinds is None:
        from .manager import load_plugins

        kinds = load_plugins().storage_kinds.get
    from .storage import Role

    decoded: dict[str, list[StorageConfig]] = {}
    names: dict[str, str] = {}
    kind_names: dict[str, str] = {}
    for table, role, default_kind in (
        ("image_directories", Role.IMAGE_DIRECTORY, "image_directory"),
        ("archives", Role.ARCHIVE, "folder"),
    ):
        decoded[table] = []
        for i, entry in enumerate(getattr(raw, table)):
            where = f"{table}[{i}]"
            entry = dict(entry)
            kind_name = entry.pop("kind", default_kind)
            try:
                kind = kinds(kind_name)
            except Exception as exc:
                raise ConfigError(f"{path}: {where}.kind: {exc}") from None
            if kind.role != role:
                what = role.value.replace("_", " ")
                raise ConfigError(f"{path}: {where}.kind: {kind_name!r} is not an {what} kind")
            try:
                cfg = msgspec.convert(entry, kind.config_type)
            except msgspec.ValidationError as exc:
                raise _explain(path, exc, f"{where}.") from None
            if not cfg.name.strip():
                raise ConfigError(f"{path}: {where}.name: must not be empty")
            if cfg.name in names:
                raise ConfigError(
                    f"{path}: {where}.name: {cfg.name!r} is already the name of {names[cfg.name]}"
                )
            names[cfg.name] = where
            kind_names[cfg.name] = kind_name
            decoded[table].append(cfg)
    settings = raw.studyvault
    image_names = [c.name for c in decoded["image_directories"]]
    if settings.incoming and settings.incoming not in image_names:
        raise ConfigError(
            f"{path}: studyvault.incoming: {settings.incoming!r} is not an image directory"
        )
    if not settings.incoming and image_names:
        settings = msgspec.structs.replace(settings, incoming=image_names[0])
    task_names: set[str] = set()
    for i, task in enumerate(raw.tasks):
        if task.name in task_names:
            raise ConfigError(f"{path}: tasks[{i}].name: {task.name!r} is defined twice")
        task_names.add(task.name)
    return Config(
        path=path,
        studyvault=settings,
        receiver=raw.receiver,
        fetch=raw.fetch,
        image_directories=decoded["image_directories"],
        archives=decoded["archives"],
        tasks=raw.tasks,
        kinds=kind_names,
        alerts=raw.alerts,
        metrics=raw.metrics,
    )


def _refuse_passwords(data: dict[str, Any], path: Path) -> None:
    """A password in clear in the config is refused with a hint (not just "unknown
    field"): it must come from the environment or a file only the service can read."""
    alerts = data.get("alerts")
    if not isinstance(alerts, dict):
        return
    for table in ("email", "webhook"):
        entries = alerts.get(table)
        for i, entry in enumerate(entries if isinstance(entries, list) else []):
            for key in ("password", "token", "pass", "secret"):
                if isinstance(entry, dict) and key in entry:
                    raise ConfigError(
                        f"{path}: alerts.{table}[{i}].{key}: a secret is never written in "
                        "the config; name an environment variable (password_env, token_env) "
                        "or a file readable only by the service (password_file)"
                    )


# -- editing ------------------------------------------------------------------------


def edit_config(path: Path, change: Callable[[tomlkit.TOMLDocument], None]) -> Config:
    """Apply ``change`` to the config document, validate the result, then replace the
    file atomically. The admin's comments and ordering are kept."""
    path = Path(path)
    doc = tomlkit.parse(path.read_text(encoding="utf-8"))
    change(doc)
    text = tomlkit.dumps(doc)
    config = parse_config(text, path)
    atomic_write_bytes(path, text.encode("utf-8"))
    return config


def append_table(doc: tomlkit.TOMLDocument, array: str, values: dict[str, Any]) -> None:
    """Append a ``[[array]]`` entry with ``values`` (in the given order)."""
    table = tomlkit.table()
    for key, value in values.items():
        if value is not None:
            table.add(key, value)
    if array not in doc:
        aot = tomlkit.aot()
        aot.append(table)
        doc.add(array, aot)
    else:
        doc[array].append(table)


def remove_table(doc: tomlkit.TOMLDocument, array: str, name: str) -> None:
    """Remove the ``[[array]]`` entry whose name is ``name``."""
    items = doc.get(array)
    if items is None:
        return
    for i, item in enumerate(items):
        if item.get("name") == name:
            del items[i]
            if not len(items):
                # tomlkit would write an empty array of tables as `array = []` at the top
                # of the file, which a later append turns into invalid TOML
                del doc[array]
            return


def update_table(doc: tomlkit.TOMLDocument, array: str, name: str, values: dict[str, Any]) -> None:
    """Set keys of the ``[[array]]`` entry whose name is ``name`` (None removes a key)."""
    for item in doc.get(array, []):
        if item.get("name") == name:
            for key, value in values.items():
                if value is None:
                    item.pop(key, None)
                else:
                    item[key] = value
            return


def set_key(doc: tomlkit.TOMLDocument, table: str, key: str, value: Any) -> None:
    if table not in doc:
        doc.add(table, tomlkit.table())
    doc[table][key] = value


# -- where the config lives -----------------------------------------------------------


def default_home() -> Path:
    """``$STUDYVAULT_HOME``, else ``$XDG_DATA_HOME/studyvault`` (~/.local/share/studyvault)."""
    if os.environ.get(HOME_ENV):
        return Path(os.environ[HOME_ENV]).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "studyvault"


def resolve_config_path(option: Path | None) -> tuple[Path, bool]:
    """The config file to use and whether it was named explicitly
    (``--config`` or ``$STUDYVAULT_CONFIG``) rather than the default."""
    if option is not None:
        return Path(option), True
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV]), True
    return default_home() / CONFIG_NAME, False


def starter_config(image_dir_id: str | None = None) -> str:
    """The starter config: every setting with its default and a one-line comment."""
    from importlib.resources import files

    template = files("studyvault").joinpath("starter.toml").read_text(encoding="utf-8")
    return template.replace("@IMAGE_DIR_ID@", image_dir_id or str(uuid.uuid4()))


def write_starter(folder: Path) -> Path:
    """Create ``folder`` with a starter config and its image directory; refuse to
    overwrite an existing config.

    The image directory's folder and key are made here, before the config names it:
    studyvault never creates the folder of an image directory the config already has
    (a missing one is Offline: an unmounted disk must not be replaced by an empty
    folder on the system disk).
    """
    from .manager import load_plugins

    folder = Path(folder)
    path = folder / CONFIG_NAME
    if path.exists():
        raise ConfigError(f"{path}: a config file is already there; not overwriting it")
    folder.mkdir(parents=True, exist_ok=True)
    kinds = load_plugins().storage_kinds
    text = starter_config()
    config = parse_config(text, path, kinds.get)
    for entry in config.image_directories:
        storage = kinds.get(config.kinds[entry.name])(entry, config.base)
        storage_id = storage.create()
        if storage_id != entry.id:  # the folder already is an image directory: keep its id
            text = starter_config(storage_id)
            parse_config(text, path, kinds.get)
    atomic_write_bytes(path, text.encode("utf-8"))
    return path
