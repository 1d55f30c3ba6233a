"""The command line as a user runs it."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from functools import partial
from pathlib import Path

import jwt
import pytest

from appchat.auth.tokens import TokenVerifier
from appchat.store.migrate import migrations_dir

from .support import SECRET, ServerProcess, client, wait_until


def appchat(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("APPCHAT_")}
    return subprocess.run(
        [sys.executable, "-m", "appchat", *args],
        cwd=cwd,
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_token_is_signed_with_the_configured_secret(tmp_path: Path) -> None:
    out = appchat(
        "token",
        "--request-id",
        "100",
        "--sid",
        "2",
        "--ttl",
        "60",
        cwd=tmp_path,
        env={"APPCHAT_JWT_SECRET": SECRET},
    )
    assert out.returncode == 0, out.stderr
    claims = TokenVerifier(SECRET.encode()).verify(out.stdout.strip())
    assert claims.subject == "request:100" and claims.participant_id == 2
    payload = jwt.decode(out.stdout.strip(), SECRET, algorithms=["HS256"])
    assert payload["exp"] - payload["iat"] == 60


def test_serve_refuses_to_start_without_a_secret(tmp_path: Path) -> None:
    out = appchat("serve", "--port", "0", cwd=tmp_path)
    assert out.returncode == 2
    assert "no JWT secret" in out.stderr and "--dev" in out.stderr
    assert not (tmp_path / "appchat.db").exists()


def test_serve_refuses_a_short_secret(tmp_path: Path) -> None:
    out = appchat("serve", "--port", "0", cwd=tmp_path, env={"APPCHAT_JWT_SECRET": "short"})
    assert out.returncode == 2 and "at least 32" in out.stderr


def test_secret_file_and_token_without_secret(tmp_path: Path) -> None:
    (tmp_path / "s").write_text(SECRET + "\n")
    out = appchat(
        "token", "--admin-id", "1", "--jwt-secret-file", str(tmp_path / "s"), cwd=tmp_path
    )
    assert out.returncode == 0
    TokenVerifier(SECRET.encode()).verify(out.stdout.strip())
    out = appchat("token", "--admin-id", "1", cwd=tmp_path)
    assert out.returncode == 2 and "no JWT secret" in out.stderr
    # Given twice (the environment and a file): refused, never one silently preferred.
    out = appchat(
        "token",
        "--admin-id",
        "1",
        "--jwt-secret-file",
        str(tmp_path / "s"),
        cwd=tmp_path,
        env={"APPCHAT_JWT_SECRET": "y" * 40},
    )
    assert out.returncode == 2 and "not both" in out.stderr


def test_migrate(tmp_path: Path) -> None:
    out = appchat("migrate", "--database", "sqlite:///data/x.db", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "data" / "x.db").exists()
    every = len(list(Path(migrations_dir("sqlite")).glob("*.sql")))
    assert every >= 4  # 0001_initial … 0004_participant_names
    assert f"applied {every} migration(s)" in out.stdout
    again = appchat("migrate", "--database", "sqlite:///data/x.db", cwd=tmp_path)
    assert again.returncode == 0 and "applied 0 migration(s)" in again.stdout


async def test_dev_mode_generates_a_secret_prints_tokens_and_token_uses_it(tmp_path: Path) -> None:
    srv = ServerProcess(tmp_path / "dev.db", "--dev", secret=None)
    srv.env = {k: v for k, v in srv.env.items() if not k.startswith("APPCHAT_")}
    srv.start()
    try:
        secret_file = tmp_path / "appchat-dev.secret"
        assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
        printed = [
            line.split()[-1] for line in srv.lines if line.strip().startswith(("staff", "customer"))
        ]
        assert len(printed) == 2
        async with client(srv, 1, printed[0]) as s:
            await s.ok("Event.AddConversation", {"application_id": 100})
        async with client(srv, 2, printed[1]) as c:
            await c.ok("Event.SendMessage", {"session_channel": "100", "content": "hi"})
        out = appchat(
            "token",
            "--admin-id",
            "3",
            "--database",
            f"sqlite:///{tmp_path / 'dev.db'}",
            cwd=tmp_path,
        )
        assert out.returncode == 0, out.stderr
        async with client(srv, 3, out.stdout.strip()) as s3:
            page = await s3.ok("Event.GetMessageList", {"session_channel": "100"})
            assert [m["content"] for m in page["Messages"]] == ["hi"]
    finally:
        assert srv.stop() == 0


def test_dev_refuses_a_public_host(tmp_path: Path) -> None:
    out = appchat("serve", "--dev", "--host", "0.0.0.0", "--port", "0", cwd=tmp_path)
    assert out.returncode == 2 and "loopback" in out.stderr


def test_migrate_postgres_and_unreachable_database(tmp_path: Path) -> None:
    from .backends import postgres_database

    with postgres_database() as url:
        out = appchat("migrate", "--database", url, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        assert "up to date" in out.stdout
    out = appchat(
        "serve",
        "--port",
        "0",
        "--database",
        "postgresql://postgres@127.0.0.1:1/nope",
        cwd=tmp_path,
        env={"APPCHAT_JWT_SECRET": SECRET},
    )
    assert out.returncode == 1
    assert "cannot start" in out.stderr and "Traceback" not in out.stderr


def test_migrate_does_not_print_the_database_password(tmp_path: Path) -> None:
    from .backends import postgres_database

    with postgres_database() as url:  # the server trusts local users: any password works
        with_password = url.replace("postgres@", "postgres:hunter2-secret@", 1)
        out = appchat("migrate", "--database", with_password, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        assert "hunter2" not in out.stdout + out.stderr
        assert "postgres:***@" in out.stdout
    out = appchat(
        "migrate", "--database", "postgresql://postgres:hunter2-secret@127.0.0.1:1/x", cwd=tmp_path
    )
    assert out.returncode == 2 and "hunter2" not in out.stdout + out.stderr


@pytest.mark.parametrize("port", ["70000", "-1"])
def test_a_port_out_of_range_is_refused(port: str, tmp_path: Path) -> None:
    try:
        out = appchat(
            "serve",
            "--port",
            port,
            "--database",
            f"sqlite:///{tmp_path}/p.db",
            cwd=tmp_path,
            env={"APPCHAT_JWT_SECRET": SECRET},
            timeout=30,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"--port {port} was taken: the server ran instead of refusing")
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"--port {port}" in out.stderr and "65535" in out.stderr
    assert "Traceback" not in out.stderr


def test_busy_port_and_bad_log_level_are_one_line_errors(tmp_path: Path) -> None:
    import socket

    env = {"APPCHAT_JWT_SECRET": SECRET}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        out = appchat("serve", "--port", port, cwd=tmp_path, env=env)
    assert out.returncode == 2, out.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in out.stderr
    assert "Traceback" not in out.stderr
    out = appchat("serve", "--port", "0", "--log-level", "verbose", cwd=tmp_path, env=env)
    assert out.returncode == 2 and "--log-level" in out.stderr and "Traceback" not in out.stderr


def one_line_error(out: subprocess.CompletedProcess[str]) -> str:
    """A refusal at start-up: exit 2, nothing on stdout, one short line on stderr."""
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert len(lines[0]) < 250 and lines[0].startswith("appchat: "), lines[0]
    return lines[0]


@pytest.mark.parametrize(
    ("variable", "value", "needle"),
    [
        ("APPCHAT_PORT", "abc", "expected a whole number, got 'abc'"),
        ("APPCHAT_MAX_FRAME", "64k", "expected a whole number, got '64k'"),
        ("APPCHAT_HEARTBEAT", "-1", "must be 0 (off) or more"),
        ("APPCHAT_HEARTBEAT", "nan", "expected a finite number"),
        ("APPCHAT_RATE", "-5", "must be 0 (no limit) or more"),
        ("APPCHAT_SEND_QUEUE", "0", "must be at least 1"),
        ("APPCHAT_MAX_CONNECTIONS_PER_USER", "0", "must be at least 1"),
    ],
)
def test_bad_environment_values_are_one_line_errors(
    tmp_path: Path, variable: str, value: str, needle: str
) -> None:
    env = {"APPCHAT_JWT_SECRET": SECRET, "APPCHAT_PORT": "0", variable: value}
    line = one_line_error(appchat("serve", cwd=tmp_path, env=env))
    assert variable in line and needle in line
    assert not (tmp_path / "appchat.db").exists()


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--port", "abc"], "argument --port: expected a whole number, got 'abc'"),
        (["--max-frame", "64k"], "argument --max-frame: expected a whole number, got '64k'"),
        (["--heartbeat", "-1"], "--heartbeat -1 (or APPCHAT_HEARTBEAT): must be 0 (off) or more"),
        (["--burst", "0"], "--burst 0 (or APPCHAT_BURST): must be at least 1"),
        (["--prot", "8888"], "unrecognized arguments: --prot 8888 (did you mean --port?)"),
    ],
)
def test_bad_flags_are_a_short_usage_and_one_line(
    tmp_path: Path, flags: list[str], needle: str
) -> None:
    out = appchat("serve", *flags, cwd=tmp_path, env={"APPCHAT_JWT_SECRET": SECRET})
    assert out.returncode == 2 and out.stdout == "" and "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert needle in lines[-1], out.stderr
    # At most serve's own usage line before it (not the top level's, not every option).
    assert lines[:-1] in ([], ["usage: appchat serve [options]"]), out.stderr
    assert not (tmp_path / "appchat.db").exists()


def test_a_bad_environment_value_is_reported_even_beside_a_good_flag(tmp_path: Path) -> None:
    # The flag is good, the variable is not: the variable is still reported, not ignored.
    env = {"APPCHAT_JWT_SECRET": SECRET, "APPCHAT_MAX_FRAME": "64k"}
    line = one_line_error(appchat("serve", "--max-frame", "65536", cwd=tmp_path, env=env))
    assert "APPCHAT_MAX_FRAME" in line


def test_dev_says_what_is_wrong_with_the_database(tmp_path: Path) -> None:
    line = one_line_error(
        appchat(
            "serve",
            "--dev",
            "--port",
            "0",
            "--database",
            "postgresql://postgres:hunter2@127.0.0.1:5432/appchat",
            cwd=tmp_path,
        )
    )
    assert "beside a SQLite database" in line and "--jwt-secret-file" in line
    assert "try it out with" not in line and "hunter2" not in line
    for command in (["serve", "--dev", "--port", "0"], ["token", "--admin-id", "1"], ["migrate"]):
        line = one_line_error(appchat(*command, "--database", "chat.db", cwd=tmp_path))
        assert "'chat.db' is not a database URL" in line and "sqlite:///chat.db" in line
    assert list(tmp_path.iterdir()) == []  # no database, no secret file


def test_start_up_says_whether_the_server_api_and_webhooks_are_on(tmp_path: Path) -> None:
    (tmp_path / "hook.secret").write_text("h" * 40 + "\n")
    (tmp_path / "api-keys").write_text("crm " + "k" * 40 + "\n")
    on = ServerProcess(
        tmp_path / "on.db",
        "--api-keys-file",
        str(tmp_path / "api-keys"),
        "--webhook-url",
        "https://hooks.example.com/appchat?token=receiver-secret",
        "--webhook-secret-file",
        str(tmp_path / "hook.secret"),
        "--api-sender-ids",
        "9000-9009,1",
    )
    off = ServerProcess(tmp_path / "off.db")
    for srv in (on, off):
        srv.start()
        try:
            wait_until(partial(lambda s: "webhooks:" in s.output, srv))
        finally:
            assert srv.stop() == 0
    base = f"http://127.0.0.1:{on.port}"
    assert (
        f"appchat server API: on at {base}/api/ (OpenAPI: {base}/api/openapi.json), "
        "posting only as 1,9000-9009"
    ) in on.output
    assert "appchat webhooks: on, to 1 URL (hooks.example.com)" in on.output
    assert "receiver-secret" not in on.output
    assert "appchat server API: off (turn it on with --api-keys-file or --api-key)" in off.output
    assert "appchat webhooks: off (turn them on with --webhook-url)" in off.output
