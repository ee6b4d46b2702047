"""What an operator can get wrong before the bot runs, each turned into one line that
names the setting and says what to do (contract §1: exit status 2, no traceback).

`serve` checks that it may create or open its database; the commands that only read
one (`audit verify`, `audit export`, `outbox retry`) check that it exists and never
create it. Binding the listen address and opening the database are checked where they
happen, and their errors are turned into lines here.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from pathlib import Path
from typing import Any

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

DATABASE = "BREAKGLASS_DATABASE_URL"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_EXAMPLES = ("sqlite+aiosqlite:///./breakglass.db or "
             "postgresql+asyncpg://USER:PASSWORD@HOST:5432/DATABASE")
_SQLITE_HEADER = b"SQLite format 3\x00"


def parse_database_url(text: str) -> tuple[URL | None, str | None]:
    """The URL, or a line saying what is wrong with it (never echoing a password)."""
    try:
        url = make_url(text)
    except (ArgumentError, ValueError):
        return None, f"{DATABASE} is not a database URL: write it like {_EXAMPLES}"
    backend, driver = url.get_backend_name(), url.get_driver_name()
    shown = shown_url(url)
    if backend == "sqlite":
        if driver not in ("pysqlite", "aiosqlite", "breakglass_sqlite"):
            return None, (f"{DATABASE} {shown} names the SQLite driver {driver!r}, which breakglass "
                          "does not use: write sqlite+aiosqlite:///PATH")
        if not url.database or url.database == ":memory:" or url.database.startswith("file:"):
            return None, (f"{DATABASE} {shown} names no SQLite file: write "
                          "sqlite+aiosqlite:///./breakglass.db (a relative path) or "
                          "sqlite+aiosqlite:////var/lib/breakglass/breakglass.db (absolute)")
        return url, None
    if backend == "postgresql":
        if "+" not in url.drivername or driver != "asyncpg":
            fixed = url.set(drivername="postgresql+asyncpg")
            return None, (f"{DATABASE} {shown} does not use the asyncpg driver: write "
                          f"{shown_url(fixed)}")
        try:
            import asyncpg  # noqa: F401
        except ImportError:
            return None, (f"{DATABASE} is a PostgreSQL URL but asyncpg is not installed: "
                          "pip install 'breakglass[postgres]' (or '.[postgres]' from a checkout)")
        return url, None
    return None, (f"{DATABASE} {shown}: breakglass runs on SQLite or PostgreSQL, not "
                  f"{backend!r}: write it like {_EXAMPLES}")


def shown_url(url: URL) -> str:
    return url.render_as_string(hide_password=True)


def sqlite_file(url: URL) -> Path | None:
    """The SQLite file of `url` (as the process sees it), or None for PostgreSQL."""
    if url.get_backend_name() != "sqlite" or not url.database:
        return None
    return Path(url.database)


def database_to_create(text: str) -> str | None:
    """`serve`: None when the database can be opened, or created where the URL says."""
    url, problem = parse_database_url(text)
    if url is None:
        return problem
    path = sqlite_file(url)
    if path is None:
        return None
    directory = path.parent
    if not directory.is_dir():
        what = "is not a directory" if directory.exists() else "does not exist"
        return (f"{DATABASE}: the directory {directory} of the SQLite file {what}: create it "
                "(mkdir -p) or point the URL at a directory that exists")
    if not os.access(directory, os.W_OK | os.X_OK):
        return (f"{DATABASE}: the directory {directory} is not writable by this user "
                f"(uid {os.geteuid()}); SQLite writes its journal beside the file: give the "
                "user write access to it or point the URL at a directory it may write")
    if path.exists():
        return _not_a_database(path) or (
            None if os.access(path, os.R_OK | os.W_OK) else
            f"{DATABASE}: {path} is not readable and writable by this user "
            f"(uid {os.geteuid()}): fix its owner or mode")
    return None


def existing_database(text: str) -> str | None:
    """Commands that read a database: None when it is there; they never create one."""
    url, problem = parse_database_url(text)
    if url is None:
        return problem
    path = sqlite_file(url)
    if path is None:
        return None  # PostgreSQL: the schema check tells (`missing_schema`)
    if not path.is_file() or path.stat().st_size == 0:
        return (f"no database at {path.resolve()} ({DATABASE}): run the command where the "
                "bot's database is, or set the URL the bot runs with; nothing was created")
    if not os.access(path, os.R_OK):
        return f"{DATABASE}: {path} is not readable by this user (uid {os.geteuid()})"
    return _not_a_database(path)


def _not_a_database(path: Path) -> str | None:
    try:
        with path.open("rb") as f:
            head = f.read(len(_SQLITE_HEADER))
    except OSError as exc:
        return f"{DATABASE}: {path} cannot be read ({exc.strerror})"
    if head and head != _SQLITE_HEADER:
        return (f"{DATABASE}: {path} is not a SQLite database: point the URL at the bot's "
                "database file, or at a path where none exists yet")
    return None


def missing_schema(url_text: str) -> str:
    return (f"no breakglass tables in the database at {shown_url(make_url(url_text))} "
            f"({DATABASE}): point it at the bot's database (`breakglass serve` creates the "
            "tables); nothing was created")


def open_failed(url_text: str, exc: BaseException) -> str:
    """The database could not be opened or written at start."""
    url = make_url(url_text)
    cause = _cause(exc, url.password)
    if url.get_backend_name() == "postgresql":
        where = f"{url.host or 'localhost'}:{url.port or 5432}"
        return (f"{DATABASE}: could not use the PostgreSQL database {url.database!r} at {where} "
                f"({cause}): check that the server runs, that the database exists and that "
                "the user and password are right")
    return (f"{DATABASE}: could not use the SQLite database {url.database} ({cause}): check "
            "the path, its directory's permissions and the disk")


def _cause(exc: BaseException, password: str | None) -> str:
    inner = getattr(exc, "orig", None) or exc
    text = str(inner).strip().splitlines()[0] if str(inner).strip() else ""
    if password:
        text = text.replace(password, "***")
    name = type(inner).__name__
    return f"{name}: {text}" if text else name


def bind_failed(exc: OSError, host: str, port: int) -> str:
    """The listen address could not be bound."""
    if isinstance(exc, socket.gaierror) or exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
        return (f"BREAKGLASS_HOST {host!r} is not an address of this machine: use 0.0.0.0 "
                "(every interface), 127.0.0.1 (this machine only) or one of its own addresses")
    if exc.errno == errno.EADDRINUSE:
        return (f"BREAKGLASS_PORT {port} on {host} is already in use by another program: "
                "stop it, or set BREAKGLASS_PORT to a free port")
    if exc.errno == errno.EACCES:
        return (f"BREAKGLASS_PORT {port} needs privileges this user does not have: use a port "
                "above 1023 and let a proxy or load balancer forward to it")
    return f"could not listen on {host}:{port} (BREAKGLASS_HOST, BREAKGLASS_PORT): {exc.strerror or exc}"


def host_problem(host: str) -> str | None:
    """A listen address that cannot be one (resolution is left to the bind)."""
    if not host or any(c.isspace() for c in host) or "/" in host or "://" in host:
        return (f"BREAKGLASS_HOST {host!r} is not an address: write an IP address or a host "
                "name only, like 0.0.0.0 or 127.0.0.1 (no scheme, no path)")
    return None


def log_level(text: str, where: str) -> int:
    """`info` and `INFO` alike; ValueError with the line to print when it is none."""
    name = text.strip().upper()
    if name == "WARN":
        name = "WARNING"
    if name not in LOG_LEVELS:
        raise ValueError(f"{where} {text!r} is not a log level: use one of "
                         f"{', '.join(LOG_LEVELS)} (any case)")
    return int(logging.getLevelName(name))


async def has_schema(db: Any) -> bool:
    """Whether the database holds breakglass's tables (a read; creates nothing)."""
    from sqlalchemy import inspect

    def present(sync_conn: Any) -> bool:
        names = set(inspect(sync_conn).get_table_names())
        return {"audit_log", "outbox", "requests"} <= names

    async with db.read() as conn:
        return bool(await conn.run_sync(present))
