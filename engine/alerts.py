"""Alerts: telling an admin, by email and webhook, that something needs them.

A *condition* is a problem that holds now, named by a key such as
``space:Image Center Storage`` (``<kind>:<subject>``); :mod:`studyvault.watch` finds
them. :class:`AlertBook` turns the conditions seen at each check into messages:

- a new condition is sent at once; a change of severity (warning to critical) too;
- a condition that lasts is sent again only after ``[alerts] repeat_minutes``;
- a condition that is gone is sent once more, as *resolved*.

What was sent, and the messages not delivered yet, are kept in
``<data_dir>/alerts-state.json``, so a restart neither repeats nor forgets them. A
delivery that fails is logged and tried again later (after 1, 2, 4 … up to 60 minutes,
for a day); it never stops the service.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import smtplib
import socket
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import Protocol

import msgspec

from .config import Config, EmailChannel, WebhookChannel
from .errors import StudyvaultError
from .fsutil import atomic_write_bytes

log = logging.getLogger(__name__)

STATE_NAME = "alerts-state.json"
#: Retries of a failed delivery: the first after a minute, doubling, at most an hour
#: apart, given up after a day.
RETRY_FIRST = 60.0
RETRY_MAX = 3600.0
GIVE_UP_AFTER = 86400.0


class AlertDeliveryError(StudyvaultError, OSError):
    """A channel could not deliver a message (server unreachable, refused, bad reply)."""


class Condition(msgspec.Struct, kw_only=True):
    """A problem that holds now.

    :param key: ``<kind>:<subject>``, stable while the problem lasts.
    :param severity: ``warning`` or ``critical``.
    :param title: one line naming the storage, task or device, with its numbers.
    :param details: more facts, one per line.
    :param action: what the admin should do.
    """

    key: str
    severity: str
    title: str
    details: list[str] = []
    action: str = ""

    @property
    def kind(self) -> str:
        return self.key.partition(":")[0]


class Alert(msgspec.Struct, kw_only=True):
    """One message, as sent through every channel."""

    event: str  # problem | reminder | resolved | test
    key: str
    severity: str  # warning | critical | info
    title: str
    details: list[str] = []
    action: str = ""
    time: float = 0.0
    host: str = ""

    def subject(self) -> str:
        label = "RESOLVED" if self.event == "resolved" else self.severity.upper()
        still = "still: " if self.event == "reminder" else ""
        return f"[studyvault {self.host}] {label}: {still}{self.title}"

    def body(self) -> str:
        when = dt.datetime.fromtimestamp(self.time).astimezone().strftime("%Y-%m-%d %H:%M %Z")
        lines = [self.title, ""]
        lines += [f"- {line}" for line in self.details]
        if self.details:
            lines.append("")
        if self.action:
            lines += [f"What to do: {self.action}", ""]
        lines.append(f"studyvault on {self.host}, {when} ({self.event}, key {self.key})")
        return "\n".join(lines) + "\n"


class _Active(msgspec.Struct, kw_only=True):
    severity: str
    title: str
    since: float
    last_sent: float


class _Pending(msgspec.Struct, kw_only=True):
    alert: Alert
    channel: str
    attempts: int = 0
    first_try: float = 0.0
    next_try: float = 0.0
    error: str = ""


class AlertState(msgspec.Struct, kw_only=True):
    """``alerts-state.json``: conditions reported and not yet resolved, messages to retry."""

    active: dict[str, _Active] = {}
    outbox: list[_Pending] = []
    first_seen: dict[str, float] = {}  # scheduled task -> when the watch first saw it


_state_decoder = msgspec.json.Decoder(AlertState)


# -- channels ---------------------------------------------------------------------------


class Channel(Protocol):
    name: str

    def describe(self) -> str: ...

    def send(self, alert: Alert) -> None:
        """Deliver ``alert``; raise :class:`AlertDeliveryError` when it cannot."""


class EmailSender:
    """Sends alerts through an SMTP server (``[[alerts.email]]``)."""

    def __init__(self, config: EmailChannel, name: str, base: Path) -> None:
        self.config = config
        self.name = name
        self.base = base

    def describe(self) -> str:
        c = self.config
        return f"email to {', '.join(c.to)} via {c.host}:{c.port} ({c.tls})"

    def _password(self) -> str:
        c = self.config
        if c.password_env:
            value = os.environ.get(c.password_env)
            if value is None:
                raise AlertDeliveryError(
                    f"password_env: the environment variable {c.password_env} is not set"
                )
            return value
        if c.password_file:
            path = Path(c.password_file).expanduser()
            path = path if path.is_absolute() else self.base / path
            try:
                return path.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise AlertDeliveryError(
                    f"password_file: cannot read {path}: {exc.strerror or exc}"
                ) from None
        return ""

    def send(self, alert: Alert) -> None:
        c = self.config
        message = EmailMessage()
        message["Subject"] = alert.subject()
        message["From"] = c.sender
        message["To"] = ", ".join(c.to)
        message["Date"] = format_datetime(dt.datetime.now().astimezone())
        message["Message-ID"] = make_msgid(domain=alert.host or None)
        message["X-Studyvault-Alert"] = f"{alert.event}; {alert.key}"
        message.set_content(alert.body())
        password = self._password() if c.user else ""
        try:
            smtp: smtplib.SMTP
            if c.tls == "ssl":
                smtp = smtplib.SMTP_SSL(
                    c.host, c.port, timeout=c.timeout_s, context=ssl.create_default_context()
                )
            else:
                smtp = smtplib.SMTP(c.host, c.port, timeout=c.timeout_s)
            with smtp:
                if c.tls == "starttls":
                    smtp.starttls(context=ssl.create_default_context())
                if c.user:
                    smtp.login(c.user, password)
                smtp.send_message(message)
        except (smtplib.SMTPException, OSError) as exc:
            raise AlertDeliveryError(f"{c.host}:{c.port}: {_reason(exc)}") from None


class WebhookSender:
    """POSTs alerts as JSON to a URL (``[[alerts.webhook]]``)."""

    def __init__(self, config: WebhookChannel, name: str) -> None:
        self.config = config
        self.name = name

    def describe(self) -> str:
        parts = urllib.parse.urlsplit(self.config.url)
        # the path of a chat webhook is its secret: show the host only
        return f"webhook {parts.scheme}://{parts.netloc}/… ({self.config.format})"

    def payload(self, alert: Alert) -> tuple[str, dict[str, object]]:
        """(URL, JSON body) for this channel's format."""
        c = self.config
        text = alert.body()
        if c.format == "slack":
            return c.url, {"text": f"*{alert.subject()}*\n{text}"}
        if c.format == "teams":
            return c.url, {"title": alert.subject(), "text": text.replace("\n", "\n\n")}
        if c.format == "ntfy":
            parts = urllib.parse.urlsplit(c.url)
            base, _, topic = parts.path.rstrip("/").rpartition("/")
            url = urllib.parse.urlunsplit((parts.scheme, parts.netloc, base + "/", "", ""))
            priority = {"critical": 5, "warning": 4}.get(alert.severity, 3)
            if alert.event == "resolved":
                priority = 3
            return url, {
                "topic": topic,
                "title": alert.subject(),
                "message": text,
                "priority": priority,
                "tags": ["white_check_mark" if alert.event == "resolved" else "warning"],
            }
        return c.url, {
            "source": "studyvault",
            "host": alert.host,
            "event": alert.event,
            "severity": alert.severity,
            "key": alert.key,
            "subject": alert.subject(),
            "title": alert.title,
            "details": alert.details,
            "action": alert.action,
            "time": dt.datetime.fromtimestamp(alert.time, dt.UTC).isoformat(),
            "text": text,
        }

    def send(self, alert: Alert) -> None:
        c = self.config
        url, body = self.payload(alert)
        headers = {"Content-Type": "application/json", "User-Agent": "studyvault-alerts"}
        if c.token_env:
            token = os.environ.get(c.token_env)
            if token is None:
                raise AlertDeliveryError(
                    f"token_env: the environment variable {c.token_env} is not set"
                )
            headers["Authorization"] = f"Bearer {token}"
        request = urllib.request.Request(
            url, data=json.dumps(body).encode(), headers=headers, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=c.timeout_s) as response:
                response.read()
        except urllib.error.HTTPError as exc:
            raise AlertDeliveryError(f"{self.describe()}: HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise AlertDeliveryError(f"{self.describe()}: {_reason(exc)}") from None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc.reason, str):
        exc = exc.reason
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def channels(config: Config) -> list[Channel]:
    """Every configured channel, named as in the config (or ``email 1``, ``webhook 1``)."""
    out: list[Channel] = []
    for i, email in enumerate(config.alerts.email, 1):
        out.append(EmailSender(email, email.name or f"email {i}", config.base))
    for i, hook in enumerate(config.alerts.webhook, 1):
        out.append(WebhookSender(hook, hook.name or f"webhook {i}"))
    return out


class ChannelResult(msgspec.Struct, kw_only=True):
    channel: str
    target: str
    ok: bool
    error: str = ""


def send_test(config: Config, *, now: float | None = None) -> list[ChannelResult]:
    """``studyvault alerts test``: one test message through every channel."""
    alert = Alert(
        event="test",
        key="test:alerts",
        severity="info",
        title="Test message from studyvault",
        details=[f"config {config.path}", "sent by `studyvault alerts test`"],
        action="nothing: this channel works.",
        time=time.time() if now is None else now,
        host=socket.gethostname(),
    )
    results = []
    for channel in channels(config):
        try:
            channel.send(alert)
            results.append(ChannelResult(channel=channel.name, target=channel.describe(), ok=True))
        except AlertDeliveryError as exc:
            results.append(
                ChannelResult(
                    channel=channel.name, target=channel.describe(), ok=False, error=str(exc)
                )
            )
    return results


# -- the book: what was sent, what to send ------------------------------------------------


class AlertBook:
    """Rate limiting, "resolved" messages and retries, kept in a state file.

    :param path: the state file (``<data_dir>/alerts-state.json``).
    :param repeat_seconds: a lasting condition is sent again after this long.
    """

    def __init__(self, path: Path, *, repeat_seconds: float) -> None:
        self.path = Path(path)
        self.repeat_seconds = repeat_seconds
        self.state = self._load()

    def _load(self) -> AlertState:
        try:
            return _state_decoder.decode(self.path.read_bytes())
        except FileNotFoundError:
            return AlertState()
        except (OSError, msgspec.DecodeError) as exc:
            log.error("alerts: cannot read %s (%s); starting afresh", self.path, exc)
            return AlertState()

    def save(self) -> None:
        try:
            atomic_write_bytes(self.path, msgspec.json.encode(self.state))
        except OSError as exc:
            log.error("alerts: cannot write %s: %s", self.path, exc)

    def observe(
        self, conditions: Iterable[Condition], kinds: Iterable[str], *, now: float
    ) -> list[Alert]:
        """The messages due now, given the conditions found by checks of ``kinds``
        (an active condition of a kind not checked this time is left as it is)."""
        host = socket.gethostname()
        checked = set(kinds)
        seen: set[str] = set()
        alerts: list[Alert] = []
        active = self.state.active
        for cond in conditions:
            seen.add(cond.key)
            before = active.get(cond.key)
            if before is None:
                event = "problem"
            elif before.severity != cond.severity:
                event = "problem"  # worse (or better, but still a problem): say so now
            elif now - before.last_sent >= self.repeat_seconds:
                event = "reminder"
            else:
                continue
            active[cond.key] = _Active(
                severity=cond.severity,
                title=cond.title,
                since=before.since if before else now,
                last_sent=now,
            )
            alerts.append(
                Alert(
                    event=event,
                    key=cond.key,
                    severity=cond.severity,
                    title=cond.title,
                    details=cond.details,
                    action=cond.action,
                    time=now,
                    host=host,
                )
            )
        for key in list(active):
            if key in seen or key.partition(":")[0] not in checked:
                continue
            gone = active.pop(key)
            minutes = max(0.0, now - gone.since) / 60
            alerts.append(
                Alert(
                    event="resolved",
                    key=key,
                    severity=gone.severity,
                    title=f"resolved: {gone.title}",
                    details=[f"the problem lasted {_duration(minutes)}"],
                    time=now,
                    host=host,
                )
            )
        return alerts

    def deliver(self, alerts: Iterable[Alert], targets: list[Channel], *, now: float) -> None:
        """Send ``alerts`` through every channel; failures join the outbox (logged,
        never raised). Also retries what is due in the outbox."""
        by_name = {c.name: c for c in targets}
        # messages for channels removed from the config are dropped
        self.state.outbox = [p for p in self.state.outbox if p.channel in by_name]
        for alert in alerts:
            level = logging.INFO if alert.event == "resolved" else logging.WARNING
            log.log(level, "alert: %s", alert.subject())
            for channel in targets:
                self.state.outbox.append(
                    _Pending(alert=alert, channel=channel.name, first_try=now, next_try=now)
                )
        left: list[_Pending] = []
        for pending in self.state.outbox:
            if pending.next_try > now:
                left.append(pending)
                continue
            channel = by_name[pending.channel]
            try:
                channel.send(pending.alert)
            except AlertDeliveryError as exc:
                pending.attempts += 1
                pending.error = str(exc)
                if now - pending.first_try >= GIVE_UP_AFTER:
                    log.error(
                        "alerts: giving up on %r through %s after %d attempts: %s",
                        pending.alert.subject(),
                        channel.name,
                        pending.attempts,
                        exc,
                    )
                    continue
                wait = min(RETRY_FIRST * 2 ** (pending.attempts - 1), RETRY_MAX)
                pending.next_try = now + wait
                log.warning(
                    "alerts: %s could not deliver %r (%s); trying again in %d min",
                    channel.name,
                    pending.alert.subject(),
                    exc,
                    wait // 60,
                )
                left.append(pending)
                continue
            if pending.attempts:
                log.info("alerts: %s delivered %r at last", channel.name, pending.alert.subject())
        self.state.outbox = left


def _duration(minutes: float) -> str:
    if minutes < 90:
        return f"{minutes:.0f} min"
    if minutes < 48 * 60:
        return f"{minutes / 60:.1f} h"
    return f"{minutes / 1440:.1f} days"
