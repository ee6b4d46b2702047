"""A new operator's first hour, run as they run it: `python -m bot serve` (and the
commands that read a database) in a subprocess, configured by environment variables,
against the Slack emulator on loopback.

Each mistake (a bad BREAKGLASS_DATABASE_URL, a missing or unwritable database
directory, a file that is not a database, PostgreSQL without asyncpg, a port in use,
a bad BREAKGLASS_HOST, an unknown log level, several variables missing) must end in
exit status 2 and one line per problem naming the setting and what to do, never a
traceback; a log level in lower case is accepted. Commands that read a database
(`audit verify`, `audit export`, `outbox retry`, `keys rotate-master`, `drills`,
`db current`, `reviews`, `tokens list`) never create one: no file, or a database
without breakglass's tables (SQLite or PostgreSQL), is exit 2 "no database at …".
At start, a bot token Slack refuses is exit 2 naming SLACK_BOT_TOKEN, and a reviewer
or incident channel the bot is not in (or written as a name) is a warning naming it
and `/invite @breakglass`, while the bot keeps serving.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from bot.core.kdf import new_master_key
from bot.local.emulator import SlackEmulator
from bot.local.sandbox import sandbox_policy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def home() -> Iterator[Path]:
    """A directory any user may read (tmp_path is private to root, and one case runs
    the bot as another user)."""
    made = Path(tempfile.mkdtemp(prefix="bg-first-hour-"))
    made.chmod(0o755)
    try:
        yield made
    finally:
        shutil.rmtree(made, ignore_errors=True)


@pytest.fixture
async def slack() -> AsyncIterator[SlackEmulator]:
    emulator = SlackEmulator(bot_token="xoxb-" + os.urandom(12).hex())
    await emulator.start()
    try:
        yield emulator
    finally:
        await emulator.stop()


@pytest.fixture
def env(home: Path, slack: SlackEmulator) -> dict[str, str]:
    """A complete, valid environment: each test breaks one thing in it."""
    policy = home / "breakglass.toml"
    policy.write_text(sandbox_policy("http://127.0.0.1:9", os.urandom(16).hex()))
    policy.chmod(0o644)
    assert slack.bot_token is not None
    return {"SLACK_BOT_TOKEN": slack.bot_token, "SLACK_SIGNING_SECRET": os.urandom(16).hex(),
            "SLACK_API_URL": slack.api_url, "BREAKGLASS_POLICY": str(policy),
            "BREAKGLASS_DATABASE_URL": f"sqlite+aiosqlite:///{home / 'bg.db'}",
            "BREAKGLASS_MASTER_KEY": new_master_key(), "BREAKGLASS_HOST": "127.0.0.1",
            "BREAKGLASS_PORT": str(free_port()), "BREAKGLASS_METRICS_ADDR": "127.0.0.1:0"}


def clean_env(env: dict[str, str]) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("BREAKGLASS_", "SLACK_"))}
    return {**base, **env}


async def run(*args: str, env: dict[str, str], cwd: Path | None = None,
              prefix: tuple[str, ...] = (), code: str | None = None) -> tuple[int, str, str]:
    """`python -m bot ARGS` (or `python -c CODE ARGS`) to its end."""
    program = ("-c", code) if code else ("-m", "bot")
    proc = await asyncio.create_subprocess_exec(
        *prefix, sys.executable, *program, *args, env=clean_env(env), cwd=cwd,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    except TimeoutError:
        proc.kill()
        out, err = await proc.communicate()
        raise AssertionError(f"still running after 60s: {err.decode()}") from None
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def lines_of(err: str) -> list[str]:
    assert "Traceback" not in err, err
    return err.strip().splitlines()


def one_line(code: int, err: str) -> str:
    """The one error line (`breakglass: …`), last; log lines may come before it when the
    problem shows once logging has started (a port in use, an unreachable server)."""
    assert code == 2, err
    lines = lines_of(err)
    errors = [line for line in lines if line.startswith("breakglass: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    return errors[0]


async def serve_until_listening(env: dict[str, str], *args: str) -> tuple[int, str]:
    """Start serve, wait until /healthz answers, SIGTERM it: its exit code and its log."""
    import aiohttp

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", "serve", *args, env=clean_env(env),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    health = f"http://127.0.0.1:{env['BREAKGLASS_PORT']}/healthz"
    try:
        async with asyncio.timeout(60), aiohttp.ClientSession() as http:
            while proc.returncode is None:
                try:
                    async with http.get(health) as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
            _, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, err.decode()


# --------------------------------------------------------------------------- the database URL


@pytest.mark.parametrize(("url", "words"), [
    ("not a url at all", "is not a database URL"),
    ("mysql+aiomysql://breakglass:hunter2pw@db.internal/bg", "SQLite or PostgreSQL"),
    ("postgresql://breakglass:hunter2pw@127.0.0.1:1/bg", "postgresql+asyncpg://"),
    ("sqlite+aiosqlite:///:memory:", "names no SQLite file"),
])
async def test_a_bad_database_url_is_one_line(env: dict[str, str], url: str, words: str) -> None:
    code, _, err = await run("serve", env={**env, "BREAKGLASS_DATABASE_URL": url})
    line = one_line(code, err)
    assert "BREAKGLASS_DATABASE_URL" in line and words in line, line
    assert "hunter2pw" not in err  # a password in the URL is never printed


async def test_a_missing_database_directory_is_one_line(env: dict[str, str], home: Path) -> None:
    missing = home / "var" / "lib" / "breakglass"
    code, _, err = await run("serve", env={
        **env, "BREAKGLASS_DATABASE_URL": f"sqlite+aiosqlite:///{missing / 'bg.db'}"})
    line = one_line(code, err)
    assert "BREAKGLASS_DATABASE_URL" in line and str(missing) in line
    assert "does not exist" in line and "mkdir" in line
    assert not (home / "var").exists()


async def test_an_unwritable_database_directory_is_one_line(env: dict[str, str],
                                                           home: Path) -> None:
    locked = home / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    # root may write anywhere: run the bot as `nobody`, as a service user would be.
    prefix: tuple[str, ...] = ()
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        assert setpriv, "running as root: setpriv is needed to drop privileges"
        prefix = (setpriv, "--reuid=65534", "--regid=65534", "--clear-groups")
    code, _, err = await run("serve", env={
        **env, "BREAKGLASS_DATABASE_URL": f"sqlite+aiosqlite:///{locked / 'bg.db'}"},
        prefix=prefix, cwd=home)
    line = one_line(code, err)
    assert "BREAKGLASS_DATABASE_URL" in line and str(locked) in line and "not writable" in line
    assert list(locked.iterdir()) == []


async def test_a_file_that_is_not_a_database_is_one_line(env: dict[str, str], home: Path) -> None:
    notes = home / "notes.txt"
    notes.write_text("shopping list: milk, eggs\n" * 50)
    code, _, err = await run("serve", env={
        **env, "BREAKGLASS_DATABASE_URL": f"sqlite+aiosqlite:///{notes}"})
    line = one_line(code, err)
    assert "BREAKGLASS_DATABASE_URL" in line and str(notes) in line
    assert "not a SQLite database" in line
    assert notes.read_text().startswith("shopping list")


async def test_postgresql_without_asyncpg_installed_is_one_line(env: dict[str, str]) -> None:
    block = ("import sys; sys.modules['asyncpg'] = None; sys.argv[0] = 'breakglass'\n"
             "from bot.cli import main\nraise SystemExit(main(sys.argv[1:]))")
    code, _, err = await run("serve", env={
        **env, "BREAKGLASS_DATABASE_URL": "postgresql+asyncpg://bg:hunter2pw@127.0.0.1:1/bg"},
        code=block)
    line = one_line(code, err)
    assert "BREAKGLASS_DATABASE_URL" in line and "asyncpg is not installed" in line
    assert "pip install 'breakglass[postgres]'" in line
    assert "hunter2pw" not in err


async def test_an_unreachable_postgresql_server_is_one_line(env: dict[str, str]) -> None:
    port = free_port()  # nothing listens there
    code, _, err = await run("serve", env={
        **env, "BREAKGLASS_DATABASE_URL": f"postgresql+asyncpg://bg:hunter2pw@127.0.0.1:{port}/bg"})
    line = one_line(code, err)
    assert "BREAKGLASS_DATABASE_URL" in line and f"127.0.0.1:{port}" in line
    assert "hunter2pw" not in err


# --------------------------------------------------------------------------- the listen address


async def test_a_port_in_use_is_one_line(env: dict[str, str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = await run("serve", env={**env, "BREAKGLASS_PORT": str(port)})
    line = one_line(code, err)
    assert f"BREAKGLASS_PORT {port}" in line and "in use" in line


@pytest.mark.parametrize(("host", "words"), [
    ("192.0.2.1", "is not an address of this machine"),  # TEST-NET-1: nobody's address
    ("http://0.0.0.0:3000", "is not an address"),
    ("local host", "is not an address"),
])
async def test_a_bad_host_is_one_line(env: dict[str, str], host: str, words: str) -> None:
    code, _, err = await run("serve", env={**env, "BREAKGLASS_HOST": host})
    line = one_line(code, err)
    assert f"BREAKGLASS_HOST {host!r}" in line and words in line


@pytest.mark.parametrize("port", ["0", "70000", "http"])
async def test_a_bad_port_is_one_line(env: dict[str, str], port: str) -> None:
    code, _, err = await run("serve", env={**env, "BREAKGLASS_PORT": port})
    assert "BREAKGLASS_PORT" in one_line(code, err)


# --------------------------------------------------------------------------- log level


async def test_a_log_level_in_lower_case_is_accepted(env: dict[str, str]) -> None:
    code, log = await serve_until_listening({**env, "BREAKGLASS_LOG_LEVEL": "info"})
    assert code == 0, log
    assert "Traceback" not in log and "INFO bot: breakglass listening on" in log
    code, log = await serve_until_listening(env, "--log-level", "warning")
    assert code == 0, log
    assert "INFO" not in log  # WARNING and above only


@pytest.mark.parametrize(("args", "variable", "name"), [
    ((), {"BREAKGLASS_LOG_LEVEL": "verbose"}, "BREAKGLASS_LOG_LEVEL"),
    (("--log-level", "loud"), {}, "--log-level"),
])
async def test_an_unknown_log_level_is_one_line(env: dict[str, str], args: tuple[str, ...],
                                                variable: dict[str, str], name: str) -> None:
    code, _, err = await run("serve", *args, env={**env, **variable})
    line = one_line(code, err)
    assert name in line and "is not a log level" in line and "DEBUG, INFO, WARNING" in line


# --------------------------------------------------------------------------- every problem at once


async def test_every_missing_variable_is_reported_at_once(env: dict[str, str]) -> None:
    broken = {k: v for k, v in env.items()
              if k not in ("SLACK_BOT_TOKEN", "SLACK_SIGNING_SECRET", "BREAKGLASS_MASTER_KEY")}
    code, _, err = await run("serve", env={**broken, "BREAKGLASS_PORT": "none"})
    assert code == 2
    lines = lines_of(err)
    assert all(line.startswith("breakglass: ") for line in lines), err
    for name in ("SLACK_BOT_TOKEN", "SLACK_SIGNING_SECRET", "BREAKGLASS_MASTER_KEY",
                 "BREAKGLASS_PORT"):
        assert sum(name in line.split(":")[1] for line in lines) == 1, (name, err)
    assert len(lines) == 4, err


async def test_missing_variables_and_a_bad_policy_are_reported_together(
        env: dict[str, str], home: Path) -> None:
    bad = home / "bad.toml"
    bad.write_text("[slack]\nreviewer_channel = 1\n")
    broken = {k: v for k, v in env.items() if k != "SLACK_BOT_TOKEN"}
    code, _, err = await run("serve", env={**broken, "BREAKGLASS_POLICY": str(bad)})
    assert code == 2
    lines = lines_of(err)
    assert len(lines) == 2, err
    assert "SLACK_BOT_TOKEN" in lines[0] and f"invalid policy {bad}" in lines[1]


# --------------------------------------------------------------------------- commands that read


READERS = [("audit", "verify"), ("audit", "export"), ("outbox", "retry"),
           ("keys", "rotate-master"), ("drills",), ("db", "current"), ("reviews",),
           ("tokens", "list")]


@pytest.mark.parametrize("command", READERS, ids=" ".join)
async def test_a_reading_command_in_the_wrong_directory_creates_nothing(
        env: dict[str, str], home: Path, command: tuple[str, str]) -> None:
    elsewhere = home / "elsewhere"
    elsewhere.mkdir()
    variables = {"BREAKGLASS_MASTER_KEY": env["BREAKGLASS_MASTER_KEY"],
                 "BREAKGLASS_OLD_MASTER_KEY": new_master_key()}
    code, out, err = await run(*command, env=variables, cwd=elsewhere)  # the default URL
    line = one_line(code, err)
    assert line.startswith(f"breakglass: no database at {elsewhere / 'breakglass.db'}"), line
    assert "BREAKGLASS_DATABASE_URL" in line and out == ""
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("command", READERS, ids=" ".join)
async def test_a_reading_command_refuses_an_empty_file_and_a_missing_directory(
        env: dict[str, str], home: Path, command: tuple[str, str]) -> None:
    empty = home / "empty.db"
    empty.touch()
    variables = {"BREAKGLASS_MASTER_KEY": env["BREAKGLASS_MASTER_KEY"],
                 "BREAKGLASS_OLD_MASTER_KEY": new_master_key()}
    for path in (empty, home / "nowhere" / "bg.db"):
        code, _, err = await run(*command, env={
            **variables, "BREAKGLASS_DATABASE_URL": f"sqlite+aiosqlite:///{path}"})
        assert one_line(code, err).startswith(f"breakglass: no database at {path}"), err
    assert empty.stat().st_size == 0 and not (home / "nowhere").exists()
    assert sorted(p.name for p in home.iterdir()) == ["breakglass.toml", "empty.db"]


async def test_a_sqlite_file_without_breakglass_tables_is_not_a_database(
        env: dict[str, str], home: Path) -> None:
    import sqlite3

    other = home / "other.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE notes (body TEXT)")
    code, _, err = await run("audit", "verify", env={
        "BREAKGLASS_MASTER_KEY": env["BREAKGLASS_MASTER_KEY"],
        "BREAKGLASS_DATABASE_URL": f"sqlite+aiosqlite:///{other}"})
    assert "no breakglass tables" in one_line(code, err)
    with sqlite3.connect(other) as db:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    assert tables == ["notes"]


async def test_a_postgresql_database_without_the_schema_is_exit_2(env: dict[str, str],
                                                                  postgres: Any) -> None:
    import asyncpg

    name = postgres.create_empty()
    try:
        url = postgres.url(name)
        # `db current` answers "empty" for it (exit 0): reporting the schema is its job.
        for command in [c for c in READERS if c != ("db", "current")]:
            code, _, err = await run(*command, env={
                "BREAKGLASS_MASTER_KEY": env["BREAKGLASS_MASTER_KEY"],
                "BREAKGLASS_POLICY": env["BREAKGLASS_POLICY"],
                "BREAKGLASS_OLD_MASTER_KEY": new_master_key(), "BREAKGLASS_DATABASE_URL": url})
            assert "no breakglass tables" in one_line(code, err), (command, err)
        probe = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            tables = await probe.fetch("SELECT tablename FROM pg_tables WHERE schemaname='public'")
        finally:
            await probe.close()
        assert tables == []  # nothing was created
    finally:
        postgres.drop(name)


async def test_verify_on_the_bots_own_database_still_works(env: dict[str, str]) -> None:
    code, log = await serve_until_listening(env)
    assert code == 0, log
    code, out, err = await run("audit", "verify", env=env)
    assert (code, err) == (0, ""), err
    assert out.startswith("audit log intact: ")
    code, out, err = await run("outbox", "retry", env=env)
    assert code == 0 and "queued again" in out, err


# --------------------------------------------------------------------------- Slack at start


async def test_a_wrong_bot_token_is_found_at_start(env: dict[str, str],
                                                   slack: SlackEmulator) -> None:
    wrong = "xoxb-" + os.urandom(12).hex()  # well formed; not the workspace's token
    code, _, err = await run("serve", env={**env, "SLACK_BOT_TOKEN": wrong})
    line = one_line(code, err)
    assert line.startswith("breakglass: SLACK_BOT_TOKEN was refused by Slack (invalid_auth)")
    assert "OAuth & Permissions" in line and wrong not in err
    assert [c.method for c in slack.calls] == ["auth.test"]  # found before anything else


async def test_a_channel_the_bot_is_not_in_is_named_at_start(env: dict[str, str],
                                                             slack: SlackEmulator) -> None:
    slack.outside_channels.add("C0REVIEWS")
    code, log = await serve_until_listening(env)
    assert code == 0, log  # a warning: the token endpoints keep serving
    warnings = [line for line in log.splitlines() if "WARNING" in line and "slack." in line
                and "placeholder" not in line]
    assert len(warnings) == 1, log
    assert "slack.reviewer_channel 'C0REVIEWS'" in warnings[0]
    assert "the bot is not in this channel" in warnings[0]
    assert "/invite @breakglass" in warnings[0]
    asked = sorted(c.params.get("channel") for c in slack.calls_to("conversations.info"))
    assert asked == ["C0INCIDENT", "C0REVIEWS"]


async def test_a_channel_written_as_a_name_is_named_at_start(env: dict[str, str],
                                                             home: Path) -> None:
    policy = Path(env["BREAKGLASS_POLICY"])
    policy.write_text(policy.read_text().replace('"C0INCIDENT"', '"#incident-live"'))
    code, log = await serve_until_listening(env)
    assert code == 0, log
    found = [line for line in log.splitlines() if "slack.incident_channel '#incident-live': "
             "Slack knows no such channel" in line]
    assert len(found) == 1 and "/invite @breakglass" in found[0], log
    assert "slack.reviewer_channel 'C0REVIEWS': " not in log
