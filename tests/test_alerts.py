"""Alerts by email and webhook: each problem is told once, repeated only after
``repeat_minutes``, and once more when resolved; ``alerts test``; failures are retried.

Messages go to real sinks on loopback: an SMTP server (aiosmtpd) and an HTTP server.
Time is injected (``check(now=...)``): nothing sleeps.
"""

from __future__ import annotations

import email
import email.policy
import json
import logging
import os
import socket
import threading
from collections.abc import Iterator
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import tomlkit
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from studyvault.alerts import Alert
from studyvault.testing.dicomgen import make_study
from studyvault.vault import Vault
from studyvault.watch import AlertWatcher

pytestmark = pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")

T0 = 1_750_000_000.0  # a fixed "now"
MINUTE = 60.0
SMTP_USER, SMTP_PASSWORD = "pacs", "s3cret-from-env"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- sinks ---------------------------------------------------------------------------------


class SmtpSink:
    """An SMTP server on loopback that requires a login and keeps every message."""

    def __init__(self) -> None:
        self.messages: list[EmailMessage] = []
        self.envelopes: list[tuple[str, list[str]]] = []
        self.port = free_port()

        sink = self

        class Handler:
            async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
                msg = email.message_from_bytes(envelope.content, policy=email.policy.default)
                sink.messages.append(msg)  # type: ignore[arg-type]
                sink.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))
                return "250 OK"

        def authenticate(server: Any, session: Any, envelope: Any, mechanism: str, data: Any):
            ok = isinstance(data, LoginPassword) and (data.login, data.password) == (
                SMTP_USER.encode(),
                SMTP_PASSWORD.encode(),
            )
            return AuthResult(success=ok)

        self.controller = Controller(
            Handler(),
            hostname="127.0.0.1",
            port=self.port,
            authenticator=authenticate,
            auth_require_tls=False,
            auth_required=True,
        )

    def subjects(self) -> list[str]:
        return [str(m["Subject"]) for m in self.messages]

    def bodies(self) -> list[str]:
        return [m.get_content() for m in self.messages]  # type: ignore[attr-defined]


class HttpSink:
    """An HTTP server on loopback keeping every POSTed JSON body (answers ``status``)."""

    def __init__(self, port: int = 0) -> None:
        self.posts: list[dict[str, Any]] = []
        self.paths: list[str] = []
        self.headers: list[dict[str, str]] = []
        self.status = 200
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length))
                sink.paths.append(self.path)
                sink.headers.append(dict(self.headers))
                sink.posts.append(body)
                self.send_response(sink.status)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/T000/B000/secret"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def smtp() -> Iterator[SmtpSink]:
    sink = SmtpSink()
    sink.controller.start()
    yield sink
    sink.controller.stop()


@pytest.fixture
def hook() -> Iterator[HttpSink]:
    sink = HttpSink()
    yield sink
    sink.close()


# -- set-up -----------------------------------------------------------------------------


def configure(config: Path, **alerts: Any) -> None:
    """Set ``[alerts]`` keys (``email``/``webhook`` are lists of tables)."""
    doc = tomlkit.parse(config.read_text())
    table = doc["alerts"]
    for key, value in alerts.items():
        if key in ("email", "webhook"):
            aot = tomlkit.aot()
            for entry in value:
                aot.append(tomlkit.item(entry))
            table[key] = aot  # type: ignore[index]
        else:
            table[key] = value  # type: ignore[index]
    config.write_text(tomlkit.dumps(doc))


@pytest.fixture
def alerting(home: Path, smtp: SmtpSink, hook: HttpSink, monkeypatch) -> Path:
    """The vault at ``home`` with one email and one webhook channel, and thresholds that
    nothing on the test machine meets (tests lower or raise them)."""
    monkeypatch.setenv("TEST_SMTP_PASSWORD", SMTP_PASSWORD)
    configure(
        home / "studyvault.toml",
        free_warning_gb=0.0,
        free_critical_gb=0.0,
        email=[
            {
                "name": "admins",
                "host": "127.0.0.1",
                "port": smtp.port,
                "tls": "none",
                "user": SMTP_USER,
                "password_env": "TEST_SMTP_PASSWORD",
                "from": "pacs@clinic.example",
                "to": ["it@clinic.example", "boss@clinic.example"],
            }
        ],
        webhook=[{"name": "chat", "url": hook.url}],
    )
    return home / "studyvault.toml"


def check(now: float) -> list[Alert]:
    """One check by a fresh watcher on a fresh vault (as after a service restart: only
    the state file carries what was sent)."""
    with Vault.open() as vault:
        return AlertWatcher(vault).check(now=now)


def assert_one_each(smtp: SmtpSink, hook: HttpSink, count: int) -> None:
    assert len(smtp.messages) == count, smtp.subjects()
    assert len(hook.posts) == count, [p["subject"] for p in hook.posts]


# -- each kind of problem ------------------------------------------------------------------


def test_low_free_space_warns_then_escalates_then_resolves(alerting, smtp, hook):
    configure(alerting, free_warning_gb=1e9)  # every disk is below a billion GB
    check(T0)
    assert_one_each(smtp, hook, 1)
    [msg] = smtp.messages
    assert "WARNING: Image directory 'Image Center Storage' has" in msg["Subject"]
    assert "GB free (warning below 1000000000.0 GB)" in msg["Subject"]
    assert smtp.envelopes[0] == (
        "pacs@clinic.example",
        ["it@clinic.example", "boss@clinic.example"],
    )
    body = msg.get_content()
    assert "reserve (min_free_mb): 1.07 GB" in body
    assert "What to do: archive or move old studies" in body
    post = hook.posts[0]
    assert (post["event"], post["severity"], post["key"]) == (
        "problem",
        "warning",
        "space:Image Center Storage",
    )
    assert post["title"] in post["subject"] and post["action"].startswith("archive or move")

    check(T0 + MINUTE)  # the same problem: not repeated
    assert_one_each(smtp, hook, 1)

    configure(alerting, free_critical_gb=1e9)
    check(T0 + 2 * MINUTE)  # worse: told at once
    assert_one_each(smtp, hook, 2)
    assert "CRITICAL: Image directory 'Image Center Storage'" in smtp.subjects()[1]

    configure(alerting, free_warning_gb=0.0, free_critical_gb=0.0)
    check(T0 + 3 * MINUTE)
    assert_one_each(smtp, hook, 3)
    assert "RESOLVED: resolved: Image directory 'Image Center Storage' has" in smtp.subjects()[2]
    assert hook.posts[2]["event"] == "resolved"
    assert "the problem lasted 3 min" in smtp.bodies()[2]

    check(T0 + 4 * MINUTE)  # resolved once only
    assert_one_each(smtp, hook, 3)


def test_a_lasting_problem_is_repeated_after_repeat_minutes_only(alerting, smtp, hook):
    configure(alerting, free_warning_gb=1e9, repeat_minutes=30.0)
    check(T0)
    check(T0 + 10 * MINUTE)
    check(T0 + 29 * MINUTE)
    assert_one_each(smtp, hook, 1)
    check(T0 + 30 * MINUTE)
    assert_one_each(smtp, hook, 2)
    assert "WARNING: still: Image directory" in smtp.subjects()[1]
    assert hook.posts[1]["event"] == "reminder"
    check(T0 + 45 * MINUTE)
    assert_one_each(smtp, hook, 2)


def test_an_archive_going_offline_is_reported_and_its_return_resolves_it(
    alerting, smtp, hook, run, add_task, tmp_path
):
    assert run("archives", "add", "My Study Archive", tmp_path / "share").code == 0
    check(T0)
    assert_one_each(smtp, hook, 0)

    (tmp_path / "share").rename(tmp_path / "share-gone")  # the network share went away
    check(T0 + MINUTE)
    check(T0 + 2 * MINUTE)
    assert_one_each(smtp, hook, 1)
    subject = smtp.subjects()[0]
    assert "CRITICAL: Archive 'My Study Archive' is offline" in subject
    body = smtp.bodies()[0]
    assert str(tmp_path / "share") in body and "no study is marked lost" in body
    assert "What to do: check the disk or network share of My Study Archive" in body

    (tmp_path / "share-gone").rename(tmp_path / "share")
    check(T0 + 3 * MINUTE)
    assert_one_each(smtp, hook, 2)
    assert "RESOLVED: resolved: Archive 'My Study Archive' is offline" in smtp.subjects()[1]


def archive_task(run, add_task, tmp_path: Path, *, min_free_mb: int) -> None:
    config = Path(os.environ["STUDYVAULT_CONFIG"])
    doc = tomlkit.parse(config.read_text())
    doc["studyvault"]["stable_age_minutes"] = 0.0  # type: ignore[index]
    config.write_text(tomlkit.dumps(doc))
    study = make_study(tmp_path / "incoming", n_instances=2, patient_name="ROE^JANE")
    assert run("import", study[0].parent).code == 0
    args = ["--min-free-mb", str(min_free_mb)]
    assert run("archives", "add", "My Study Archive", tmp_path / "arch", *args).code == 0
    result = add_task("Archive Old Studies", "archive", "--all", to="My Study Archive")
    assert result.code == 0, result.err


def events(smtp: SmtpSink, hook: HttpSink) -> list[tuple[str, str]]:
    """(event, key) of each message, the same by email and by webhook."""
    mailed = [tuple(str(m["X-Studyvault-Alert"]).split("; ", 1)) for m in smtp.messages]
    posted = [(p["event"], p["key"]) for p in hook.posts]
    assert mailed == posted
    return posted  # type: ignore[return-value]


def test_a_task_stopped_by_a_full_archive_is_reported_until_a_run_completes(
    alerting, smtp, hook, run, add_task, tmp_path
):
    archive_task(run, add_task, tmp_path, min_free_mb=10**9)
    assert run("tasks", "run", "Archive Old Studies").code == 1
    check(T0)
    check(T0 + MINUTE)
    # the archive is below its reserve, and the task stopped on it: one message each
    assert sorted(events(smtp, hook)) == [
        ("problem", "space:My Study Archive"),
        ("problem", "task:Archive Old Studies"),
    ]
    [mail] = [m for m in smtp.messages if "task:" in str(m["X-Studyvault-Alert"])]
    subject, body = str(mail["Subject"]), mail.get_content()
    assert "CRITICAL: Task 'Archive Old Studies': Stopped at 0/1 studies [1 errors]" in subject
    assert "My Study Archive is full" in subject
    assert "studies done: 0 of 1, errors: 1" in body
    assert "What to do: free space on the destination or add another archive" in body
    assert "studyvault tasks run 'Archive Old Studies'" in body

    doc = tomlkit.parse(alerting.read_text())
    doc["archives"][0]["min_free_mb"] = 0  # type: ignore[index]
    alerting.write_text(tomlkit.dumps(doc))
    assert run("tasks", "run", "Archive Old Studies").code == 0
    check(T0 + 2 * MINUTE)
    assert sorted(events(smtp, hook)[2:]) == [
        ("resolved", "space:My Study Archive"),
        ("resolved", "task:Archive Old Studies"),
    ]


def test_a_verify_that_finds_changed_or_missing_files_is_reported(
    alerting, smtp, hook, run, add_task, tmp_path
):
    paths = make_study(tmp_path / "incoming", n_instances=3, patient_name="ROE^JANE")
    assert run("import", paths[0].parent).code == 0
    assert run("verify").code == 0
    check(T0)
    assert_one_each(smtp, hook, 0)

    stored = sorted(p for p in (alerting.parent / "images").rglob("*") if p.is_file()
                    and p.name != "image_directory.key")  # fmt: skip
    dicom = [p for p in stored if p.read_bytes()[128:132] == b"DICM"]
    assert len(dicom) == 3
    original, removed = dicom[0].read_bytes(), dicom[1].read_bytes()
    dicom[0].write_bytes(original[:-4] + b"XXXX")  # ransomware, bit rot
    dicom[1].unlink()
    assert run("verify").code == 1
    check(T0 + MINUTE)
    check(T0 + 2 * MINUTE)
    assert_one_each(smtp, hook, 1)
    subject, body = smtp.subjects()[0], smtp.bodies()[0]
    assert "CRITICAL: Verify of 'Image Center Storage' found 1 studies with missing" in subject
    assert "missing files: 1, changed: 1, unreadable: 0" in body
    assert "(ROE JANE)" in body
    assert "studyvault verify 'Image Center Storage'" in body

    dicom[0].write_bytes(original)  # restored from the backup
    dicom[1].write_bytes(removed)
    assert run("verify").code == 0
    check(T0 + 3 * MINUTE)
    assert_one_each(smtp, hook, 2)
    assert "RESOLVED: resolved: Verify of 'Image Center Storage'" in smtp.subjects()[1]


def test_a_scheduled_task_that_has_not_succeeded_for_days_is_overdue(
    alerting, smtp, hook, run, add_task, tmp_path
):
    configure(alerting, task_overdue_days=7)
    archive_task(run, add_task, tmp_path, min_free_mb=0)
    doc = tomlkit.parse(alerting.read_text())
    doc["tasks"][0]["days"] = ["Sa", "Su"]  # type: ignore[index]
    doc["tasks"][0]["hours"] = "22:00-04:00"  # type: ignore[index]
    alerting.write_text(tomlkit.dumps(doc))
    check(T0)  # first seen now
    check(T0 + 7 * 86400 - MINUTE)
    assert_one_each(smtp, hook, 0)

    check(T0 + 7 * 86400 + MINUTE)
    assert_one_each(smtp, hook, 1)
    subject, body = smtp.subjects()[0], smtp.bodies()[0]
    assert "WARNING: Task 'Archive Old Studies' has not completed without errors for 7 days" in (
        subject
    )
    assert "last success: never" in body and "schedule: Sa, Su 22:00-04:00" in body

    assert run("tasks", "run", "Archive Old Studies").code == 0  # succeeds now
    check(T0 + 7 * 86400 + 2 * MINUTE)
    assert_one_each(smtp, hook, 2)
    assert "RESOLVED" in smtp.subjects()[1]


# -- delivery ----------------------------------------------------------------------------


def test_a_failed_delivery_is_logged_and_retried_later(home, caplog, tmp_path):
    port = free_port()  # nothing listens there yet
    configure(
        home / "studyvault.toml",
        free_warning_gb=1e9,
        free_critical_gb=0.0,
        webhook=[{"name": "pager", "url": f"http://127.0.0.1:{port}/notify"}],
    )
    with caplog.at_level(logging.WARNING, logger="studyvault.alerts"):
        [alert] = check(T0)  # no exception
    assert alert.event == "problem"
    assert "pager could not deliver" in caplog.text and "trying again in 1 min" in caplog.text

    sink = HttpSink(port)
    try:
        check(T0 + 30)  # not due yet
        assert sink.posts == []
        check(T0 + MINUTE)
        assert len(sink.posts) == 1
        assert sink.posts[0]["title"].startswith("Image directory 'Image Center Storage' has")
        check(T0 + 2 * MINUTE)
        assert len(sink.posts) == 1  # delivered once
    finally:
        sink.close()


def test_a_server_error_is_retried_with_a_growing_wait(home, hook, caplog):
    configure(home / "studyvault.toml", free_warning_gb=1e9, free_critical_gb=0.0,
              webhook=[{"url": hook.url}])  # fmt: skip
    hook.status = 500
    check(T0)
    check(T0 + MINUTE)  # second attempt fails too: next in 2 minutes
    assert len(hook.posts) == 2
    assert "HTTP 500" in caplog.text and "trying again in 2 min" in caplog.text
    hook.status = 200
    check(T0 + 2 * MINUTE)
    assert len(hook.posts) == 2
    check(T0 + 3 * MINUTE)
    assert len(hook.posts) == 3
    check(T0 + 10 * MINUTE)
    assert len(hook.posts) == 3


# -- alerts test, formats, config -----------------------------------------------------------


def test_alerts_test_sends_through_every_channel_and_reports_each(alerting, run, smtp, hook):
    doc = tomlkit.parse(alerting.read_text())
    doc["alerts"]["webhook"].append(  # type: ignore[index,union-attr]
        {"name": "down", "url": f"http://127.0.0.1:{free_port()}/x", "timeout_s": 2.0}
    )
    alerting.write_text(tomlkit.dumps(doc))
    result = run("alerts", "test")
    assert result.code == 1
    lines = result.out.splitlines()
    assert lines[0] == (
        f"admins: email to it@clinic.example, boss@clinic.example via 127.0.0.1:{smtp.port} "
        "(none): sent"
    )
    assert lines[1] == f"chat: webhook http://127.0.0.1:{hook.port}/… (json): sent"
    assert lines[2].startswith("down: webhook http://127.0.0.1:") and "FAILED:" in lines[2]
    assert "refused" in lines[2].lower()
    assert_one_each(smtp, hook, 1)
    assert "INFO: Test message from studyvault" in smtp.subjects()[0]
    assert hook.posts[0]["event"] == "test"

    as_json = run("alerts", "test", "--json").json()
    assert [(r["channel"], r["ok"]) for r in as_json] == [  # type: ignore[union-attr]
        ("admins", True),
        ("chat", True),
        ("down", False),
    ]


def test_a_wrong_smtp_password_is_reported_by_alerts_test(alerting, run, monkeypatch, smtp):
    monkeypatch.setenv("TEST_SMTP_PASSWORD", "wrong")
    doc = tomlkit.parse(alerting.read_text())
    doc["alerts"]["email"][0]["timeout_s"] = 2.0  # type: ignore[index]
    alerting.write_text(tomlkit.dumps(doc))
    result = run("alerts", "test")
    assert result.code == 1
    [email_line] = [line for line in result.out.splitlines() if line.startswith("admins:")]
    assert f"FAILED: 127.0.0.1:{smtp.port}: " in email_line
    assert smtp.messages == []


def test_a_missing_password_variable_is_named(alerting, run, monkeypatch, smtp):
    monkeypatch.delenv("TEST_SMTP_PASSWORD")
    result = run("alerts", "test")
    assert result.code == 1
    assert "FAILED: password_env: the environment variable TEST_SMTP_PASSWORD is not set" in (
        result.out
    )


def test_the_smtp_password_can_come_from_a_file(alerting, run, smtp, monkeypatch):
    monkeypatch.delenv("TEST_SMTP_PASSWORD")
    (alerting.parent / "smtp.secret").write_text(SMTP_PASSWORD + "\n")
    doc = tomlkit.parse(alerting.read_text())
    entry = doc["alerts"]["email"][0]  # type: ignore[index]
    del entry["password_env"]
    entry["password_file"] = "smtp.secret"
    alerting.write_text(tomlkit.dumps(doc))
    result = run("alerts", "test")
    assert result.code == 0, result.out
    assert len(smtp.messages) == 1


def test_alerts_test_without_a_channel_says_how_to_add_one(home, run):
    result = run("alerts", "test")
    assert result.code == 2
    assert "alerts: no channel is configured; add an [[alerts.email]]" in result.err
    assert str(home / "studyvault.toml") in result.err


def test_chat_formats(home, hook):
    configure(
        home / "studyvault.toml",
        free_warning_gb=1e9,
        free_critical_gb=0.0,
        webhook=[
            {"url": hook.url, "format": "slack"},
            {"url": f"http://127.0.0.1:{hook.port}/pacs-alerts", "format": "ntfy"},
        ],
    )
    check(T0)
    slack, ntfy = sorted(hook.posts, key=lambda p: "topic" in p)
    assert list(slack) == ["text"] and slack["text"].startswith("*[studyvault ")
    assert "What to do:" in slack["text"]
    assert ntfy["topic"] == "pacs-alerts" and ntfy["priority"] == 4
    assert "/" in hook.paths and hook.url.split(str(hook.port))[1] in hook.paths


def test_a_bearer_token_comes_from_the_environment(home, hook, monkeypatch):
    monkeypatch.setenv("PAGER_TOKEN", "tok-123")
    configure(home / "studyvault.toml", free_warning_gb=1e9, free_critical_gb=0.0,
              webhook=[{"url": hook.url, "token_env": "PAGER_TOKEN"}])  # fmt: skip
    check(T0)
    assert hook.headers[0]["Authorization"] == "Bearer tok-123"


@pytest.mark.parametrize(
    ("table", "values", "expected"),
    [
        (
            "email",
            {"host": "smtp", "from": "a@b", "to": ["c@d"], "password": "hunter2"},
            "alerts.email[0].password: a secret is never written in the config",
        ),
        (
            "webhook",
            {"url": "http://x", "colour": "red"},
            "alerts.webhook[0]: Object contains unknown field `colour`",
        ),
        (
            "email",
            {"host": "smtp", "from": "a@b", "to": ["c@d"], "tls": "maybe"},
            "alerts.email[0].tls: Invalid enum value 'maybe'",
        ),
        ("metrics", {"port": 70000}, "metrics.port: Expected `int` <= 65535"),
    ],
)
def test_bad_alert_config_is_one_line_naming_the_field(home, run, table, values, expected):
    config = home / "studyvault.toml"
    if table == "metrics":
        doc = tomlkit.parse(config.read_text())
        doc["metrics"]["port"] = values["port"]  # type: ignore[index]
        config.write_text(tomlkit.dumps(doc))
    else:
        configure(config, **{table: [values]})
    result = run("alerts", "list")
    assert result.code == 2
    assert len(result.err.strip().splitlines()) == 1
    assert f"{config}: {expected}" in result.err, result.err


def test_alerts_list_shows_the_problems_now(home, run):
    configure(home / "studyvault.toml", free_warning_gb=1e9)
    result = run("alerts", "list", "--json")
    [row] = result.json()  # type: ignore[misc]
    assert row["key"] == "space:Image Center Storage" and row["severity"] == "warning"
    configure(home / "studyvault.toml", free_warning_gb=0.0, free_critical_gb=0.0)
    assert run("alerts", "list").out.strip() == "No problems."


def test_nothing_is_recorded_as_sent_without_a_channel(home, hook):
    configure(home / "studyvault.toml", free_warning_gb=1e9, free_critical_gb=0.0)
    assert check(T0) == []
    configure(home / "studyvault.toml", webhook=[{"url": hook.url}])
    check(T0 + MINUTE)
    assert len(hook.posts) == 1 and hook.posts[0]["event"] == "problem"


def test_a_plugin_can_route_alerts_without_any_channel(home):
    from studyvault import hookimpl
    from studyvault.manager import load_plugins

    routed: list[Alert] = []

    class SmsGateway:
        @hookimpl
        def studyvault_alert(self, alert: Alert) -> None:
            routed.append(alert)

    load_plugins().pm.register(SmsGateway(), name="sms-gateway")
    configure(home / "studyvault.toml", free_warning_gb=1e9, free_critical_gb=0.0)
    check(T0)
    check(T0 + MINUTE)
    [alert] = routed
    assert (alert.event, alert.key) == ("problem", "space:Image Center Storage")
    assert alert.subject().startswith("[studyvault ") and "What to do:" in alert.body()
