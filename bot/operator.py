"""Who ran an operator command (`breakglass keys …`, `breakglass tokens revoke`), as the
audit log names them: the one definition both the CLI and the inventory use."""

from __future__ import annotations

import getpass
import os


def operator_actor() -> str:
    """`os:` and the OS user name; `os:uid-N` when the uid has no name (a container's bare
    uid), `os:unknown` where there are no uids."""
    try:
        return f"os:{getpass.getuser()}"
    except Exception:  # noqa: BLE001 - no user name (no passwd entry, no LOGNAME/USER)
        return f"os:uid-{os.getuid()}" if hasattr(os, "getuid") else "os:unknown"
