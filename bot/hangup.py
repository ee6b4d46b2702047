"""SIGHUP before `serve` is ready: held, never fatal.

Python leaves SIGHUP at its default action, which ends the process. `serve` takes
several seconds to start (imports, migrations, keys, Slack's `auth.test`), and a
SIGHUP in that time (a config-management run, a `kill -HUP` right after a deploy)
would kill it. `hold()` is called first thing (bot/__main__.py, `cmd_serve`): from
then on a SIGHUP is only noted; once the reloader is up, `serve` installs its real
handler and, if one arrived meanwhile, reloads once (`take()`).
"""

from __future__ import annotations

import signal
from types import FrameType

_pending = False


def _note(signum: int, frame: FrameType | None) -> None:
    global _pending
    _pending = True


def hold() -> None:
    """Note SIGHUPs instead of dying of them (where the platform has SIGHUP)."""
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, _note)


def take() -> bool:
    """Whether a SIGHUP arrived since `hold()` (or the last `take()`); clears it."""
    global _pending
    arrived, _pending = _pending, False
    return arrived
