"""Keys under pressure (contract §7.7): `breakglass keys rotate` and `rotate-master`
reach every running `serve` within 10 seconds, without a restart.

Every `INTERVAL` seconds (and on SIGHUP) the process reads a fingerprint of the
`signing_keys` table (`keys.fingerprint`: kid, retirement and ciphertext of each
row; a few rows, one query). When it changed, the key ring is reloaded:

* after `keys rotate`, the new key becomes current here (new tokens carry its
  kid) and the retired ones keep verifying, and stay in the JWKS, while tokens
  they signed live;
* after `keys rotate-master`, the rows no longer decrypt under the master key
  this process was started with. It keeps the keys it holds in memory (so it
  signs and verifies exactly as before), logs once that it needs the new
  `BREAKGLASS_MASTER_KEY` at its next start, and reports it in `/healthz`
  (`"signing_keys": "restart with the new BREAKGLASS_MASTER_KEY"`). Until it is
  restarted it cannot open a key made after the master rotation: a `keys
  rotate` run then is seen (its public key is not trusted without decrypting
  the row, so tokens signed by it are not verified by this process) and this
  process keeps signing with its old key, which stays valid everywhere.
  docs/operations.md gives the order: rotate-master, restart each serve, then
  rotate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from ..core.clock import Clock
from ..keys import KeyRing, fingerprint
from ..store.db import Database

log = logging.getLogger(__name__)

INTERVAL = 2.0


class KeyWatch:
    def __init__(self, db: Database, keyring: KeyRing, clock: Clock) -> None:
        self.db = db
        self.keyring = keyring
        self.clock = clock
        self.reloads = 0
        self._seen: str | None = None
        self._warned = False
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        self._seen = await fingerprint(self.db)

    async def check(self, force: bool = False) -> bool:
        """Reload the key ring if the table changed (always with `force`)."""
        async with self._lock:
            seen = await fingerprint(self.db)
            if seen == self._seen and not force:
                return False
            before = self.keyring.current.kid
            await self.keyring.reload(self.db, self.clock.now())
            self._seen = seen
            self.reloads += 1
        after = self.keyring.current.kid
        if after != before:
            log.info("signing keys reloaded: %s is current (was %s)", after, before)
        if self.keyring.master_outdated and not self._warned:
            self._warned = True
            log.error("the signing keys were re-encrypted under a new master key (keys "
                      "rotate-master): this process keeps working with the keys it holds; "
                      "restart it with the new BREAKGLASS_MASTER_KEY before the next `keys "
                      "rotate` (unreadable: %s)", ", ".join(sorted(self.keyring.unreadable)))
        elif not self.keyring.master_outdated:
            self._warned = False
        return True

    @property
    def status(self) -> str:
        if self.keyring.master_outdated:
            return "restart with the new BREAKGLASS_MASTER_KEY"
        return "ok"

    async def run(self, stop: asyncio.Event, interval: float = INTERVAL) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
            if stop.is_set():
                return
            try:
                await self.check()
            except Exception:  # noqa: BLE001 - keep watching
                log.exception("could not check the signing keys")
