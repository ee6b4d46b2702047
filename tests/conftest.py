"""Fixtures shared by the suite, and the two database backends.

Every test that asks for `backend` (directly, or through `database_url` or
`sandbox`) runs twice: on SQLite and on a real PostgreSQL server. The server
comes from BREAKGLASS_TEST_POSTGRES_URL (an admin URL, such as
postgresql+asyncpg://postgres@127.0.0.1:5432/postgres; `.ci/run` starts a
throw-away one), or, when that is not set, the suite starts a throw-away one
itself (tests/pg_throwaway.py). Each test gets a database of its own, copied from a template
that the migrations made once per session. Without PostgreSQL's binaries the
PostgreSQL half fails with a line saying how to get them: nothing is skipped
for want of a server.
`--backend sqlite` (or `postgresql`) runs one half on purpose.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import os
import secrets
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pg_throwaway
import pytest
from helpers import webhooks_policy
from webhook_receiver import Receiver

from bot.local.sandbox import Sandbox

BACKENDS = ("sqlite", "postgresql")
PG_ENV = "BREAKGLASS_TEST_POSTGRES_URL"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--backend", choices=(*BACKENDS, "both"), default="both",
                     help="database backend(s) for tests that use one (default: both)")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        chosen = metafunc.config.getoption("--backend")
        metafunc.parametrize("backend", BACKENDS if chosen == "both" else (chosen,), indirect=True)


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _in_thread(coro_fn: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """Run admin SQL on a loop of its own, away from the test's loop."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(coro_fn())).result()


class PostgresServer:
    """Databases on the test server: one migrated template, one copy per test."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self.base = admin_url.rsplit("/", 1)[0]
        self.template = f"bg_tpl_{os.getpid()}_{secrets.token_hex(3)}"

    def _dsn(self) -> str:
        return self.admin_url.replace("postgresql+asyncpg://", "postgresql://")

    async def _admin(self, *sql: str) -> None:
        import asyncpg

        conn = await asyncpg.connect(self._dsn())
        try:
            for stmt in sql:
                await conn.execute(stmt)
        finally:
            await conn.close()

    def url(self, name: str) -> str:
        return f"{self.base}/{name}"

    def make_template(self) -> None:
        from bot.store import migrate
        from bot.store.db import Database

        async def build() -> None:
            await self._admin(f'CREATE DATABASE "{self.template}"')
            db = Database(self.url(self.template))
            try:
                await migrate.upgrade(db)
            finally:
                await db.dispose()

        _in_thread(build)

    def create(self) -> str:
        name = f"bg_t_{secrets.token_hex(6)}"
        _in_thread(lambda: self._admin(f'CREATE DATABASE "{name}" TEMPLATE "{self.template}"'))
        return name

    def create_empty(self) -> str:
        name = f"bg_e_{secrets.token_hex(6)}"
        _in_thread(lambda: self._admin(f'CREATE DATABASE "{name}"'))
        return name

    def drop(self, name: str) -> None:
        _in_thread(lambda: self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    admin_url, started = os.environ.get(PG_ENV, "").strip(), None
    if not admin_url:
        try:
            admin_url, started = pg_throwaway.start()
        except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
            pytest.fail(f"the PostgreSQL half of the suite needs a server: {exc}; "
                        "or pass --backend sqlite to run only the SQLite half", pytrace=False)
    server = PostgresServer(admin_url)
    try:
        server.make_template()
        yield server
        server.drop(server.template)
    finally:
        if started:
            pg_throwaway.stop(started)


@pytest.fixture
def new_database(request: pytest.FixtureRequest, backend: str,
                 tmp_path: Any) -> Iterator[Callable[..., str]]:
    """Make databases of the test's backend: `new_database()` a migrated one (SQLite: a new
    file, which the bot migrates at start), `new_database(empty=True)` one with no schema."""
    made: list[str] = []
    server: PostgresServer | None = None
    if backend == "postgresql":
        server = request.getfixturevalue("postgres")

    def make(*, empty: bool = False) -> str:
        if server is None:
            made.append("breakglass.db" if not made else f"breakglass-{len(made) + 1}.db")
            return f"sqlite+aiosqlite:///{tmp_path / made[-1]}"
        made.append(server.create_empty() if empty else server.create())
        return server.url(made[-1])

    yield make
    if server is not None:
        for name in made:
            server.drop(name)


@pytest.fixture
def database_url(new_database: Callable[..., str]) -> str:
    """A fresh database of the test's backend."""
    return new_database()


@pytest.fixture
async def sandbox(tmp_path, database_url):
    box = Sandbox(directory=tmp_path, database_url=database_url)
    await box.start()
    try:
        yield box
    finally:
        await box.stop()


class _Boxes:
    """Sandboxes made by a test, each in a directory and on a database of its own."""

    def __init__(self, tmp_path: Path, new_database: Callable[..., str], prefix: str) -> None:
        self.tmp_path, self.new_database, self.prefix = tmp_path, new_database, prefix
        self.boxes: list[Sandbox] = []

    async def make(self, **options: Any) -> Sandbox:
        directory = self.tmp_path / f"{self.prefix}{len(self.boxes)}"
        directory.mkdir()
        box = Sandbox(directory=directory, database_url=self.new_database(), **options)
        await box.start()
        self.boxes.append(box)
        return box

    async def close(self) -> None:
        for box in self.boxes:
            await box.stop()


@pytest.fixture
async def make_box(tmp_path: Path, new_database: Callable[..., str]
                   ) -> AsyncIterator[Callable[..., Awaitable[Sandbox]]]:
    """Sandbox(**options), started, and stopped after the test (as many as a test needs)."""
    boxes = _Boxes(tmp_path, new_database, "box")
    yield boxes.make
    await boxes.close()


@pytest.fixture
async def receivers() -> AsyncIterator[Callable[..., Awaitable[Receiver]]]:
    """`await receivers(**options)`: a webhook receiver on loopback (tests/webhook_receiver.py)
    with a secret of its own, stopped after the test."""
    started: list[Receiver] = []

    async def make(**options: Any) -> Receiver:
        r = await Receiver(secret=secrets.token_hex(32).encode(), **options).start()
        started.append(r)
        return r

    yield make
    for r in started:
        await r.stop()


@pytest.fixture
async def hooked_box(tmp_path: Path, new_database: Callable[..., str]
                     ) -> AsyncIterator[Callable[..., Awaitable[Sandbox]]]:
    """`await hooked_box((receiver, ["issued", …]), …, extra=policy_text, **options)`: a
    started sandbox whose policy has a `[[webhooks]]` entry per receiver (its secret in an
    environment variable of the box's own, as in production); a plain string among the
    hooks is added to the policy as it is."""
    boxes = _Boxes(tmp_path, new_database, "hooked")

    async def hooked(*hooks: tuple[Receiver, list[str]] | str, extra: str = "",
                     env: dict[str, str] | None = None, **options: Any) -> Sandbox:
        policy, secrets_env = webhooks_policy(*hooks)
        return await boxes.make(extra_policy=policy + extra, env=secrets_env | (env or {}),
                                **options)

    yield hooked
    await boxes.close()


# --------------------------------------------------------------------------- summary per backend


_OUTCOMES: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Any:
    report = yield
    callspec = getattr(item, "callspec", None)
    which = callspec.params.get("backend") if callspec else None
    if which is None and "postgres" in getattr(item, "fixturenames", ()):
        which = "postgresql"  # a PostgreSQL-only test
    report.user_properties.append(("backend", which))
    return report


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call" or (report.when != "call" and report.outcome != "passed"):
        which = dict(report.user_properties).get("backend") or "other"
        _OUTCOMES[str(which)][report.outcome] += 1


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _OUTCOMES:
        return
    terminalreporter.section("results per database backend (other: SQLite-only or no database)")
    for name in (*BACKENDS, "other"):
        counts = _OUTCOMES.get(name)
        if counts:
            shown = ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items()))
            terminalreporter.write_line(f"{name:>12}: {shown}")


@pytest.fixture
def empty_database_url(new_database: Callable[..., str]) -> str:
    """A database of the test's backend with no schema at all."""
    return new_database(empty=True)
