"""A throw-away PostgreSQL server for the suite: initdb and pg_ctl in a temp dir.

`.ci/run` starts one with `python tests/pg_throwaway.py start` (it prints the
shell lines that export its URL) and stops it with `... stop DIR`; the suite
starts one by itself when BREAKGLASS_TEST_POSTGRES_URL is not set. initdb
refuses to run as root, so as root the server runs as the `postgres` user
(created when missing). Durability is off: every test's database is thrown away.
"""

from __future__ import annotations

import glob
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

MISSING = ("PostgreSQL server binaries (initdb, pg_ctl) not found: install them "
           "(Debian: apt-get install postgresql) or set BREAKGLASS_TEST_POSTGRES_URL "
           "to an admin URL of a server")


def _bin_dir() -> str:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]))
    if found:
        return found[-1]
    initdb = shutil.which("initdb")
    if initdb:
        return str(Path(initdb).parent)
    raise RuntimeError(MISSING)


def _as_server_user() -> list[str]:
    if os.geteuid() != 0:
        return []
    if subprocess.run(["id", "postgres"], capture_output=True, check=False).returncode != 0:
        subprocess.run(["useradd", "--system", "--no-create-home", "postgres"], check=True)
    return ["runuser", "-u", "postgres", "--"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start() -> tuple[str, str]:
    """Start a server; (admin URL, its directory for `stop`)."""
    bin_dir, prefix = _bin_dir(), _as_server_user()
    directory = tempfile.mkdtemp(prefix="breakglass-test-pg.")
    if prefix:
        shutil.chown(directory, user="postgres")
    port = _free_port()
    data = os.path.join(directory, "data")
    subprocess.run([*prefix, f"{bin_dir}/initdb", "-D", data, "-U", "postgres", "--auth=trust",
                    "-E", "UTF8"], check=True, capture_output=True)
    options = (f"-p {port} -k {directory} -c listen_addresses=127.0.0.1 -c max_connections=300 "
               "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
    subprocess.run([*prefix, f"{bin_dir}/pg_ctl", "-D", data, "-l", os.path.join(directory, "log"),
                    "-w", "-o", options, "start"], check=True, capture_output=True)
    return f"postgresql+asyncpg://postgres@127.0.0.1:{port}/postgres", directory


def stop(directory: str) -> None:
    subprocess.run([*_as_server_user(), f"{_bin_dir()}/pg_ctl", "-D", os.path.join(directory, "data"),
                    "-m", "immediate", "stop"], capture_output=True, check=False)
    shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["start"]:
        url, where = start()
        print(f"export BREAKGLASS_TEST_POSTGRES_URL={shlex.quote(url)}; pg_dir={shlex.quote(where)}")
    elif sys.argv[1:2] == ["stop"] and len(sys.argv) == 3:
        stop(sys.argv[2])
    else:
        sys.exit("usage: pg_throwaway.py start | stop DIR")
