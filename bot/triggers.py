"""Live HTTP probes behind a scope's trigger conditions.

`holds_when = "down"`: the condition holds on a connection error, a timeout or
status >= 400. `"up"`: it holds on a 2xx. All of a scope's probes run at once,
each bounded by its own timeout, so a hanging target costs at most that.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

import aiohttp

from .core.domain import TriggerResult
from .core.durations import format_duration
from .core.policy import Trigger


class Prober:
    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    async def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=100, force_close=True),
                auto_decompress=False,
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def probe(self, name: str, trigger: Trigger) -> TriggerResult:
        timeout = trigger.timeout.total_seconds()
        session = await self._client()
        try:
            async with asyncio.timeout(timeout):
                async with session.get(trigger.http, allow_redirects=False) as resp:
                    status = resp.status
            detail = f"HTTP {status}"
            down = status >= 400
            up = 200 <= status < 300
        except TimeoutError:
            detail, down, up = f"timed out after {format_duration(trigger.timeout)}", True, False
        except aiohttp.ClientError as exc:
            detail, down, up = f"connection failed ({type(exc).__name__})", True, False
        holds = down if trigger.holds_when == "down" else up
        return TriggerResult(name, trigger.description, holds, detail)

    async def probe_all(
        self, names: Sequence[str], triggers: Mapping[str, Trigger]
    ) -> tuple[TriggerResult, ...]:
        results = await asyncio.gather(*(self.probe(n, triggers[n]) for n in names))
        return tuple(results)
