"""`python -m bot serve` while it starts, on both backends, as a real child process:

- a SIGHUP that arrives before serve is ready (during its imports, migrations, keys,
  `auth.test`) does not kill it: it is held, and serve reloads once when it can;
- a start whose policy names a `tokens.algorithm` with no key yet, when the database
  already holds another algorithm's key (the algorithm was changed while the bot was
  down), makes that key as a rotation: audited `key_rotated` and alerted, once even when
  two replicas start together; a new database's very first key is not a rotation.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from helpers import ServeProcess, base_env, query

from bot.core.kdf import new_master_key
from bot.local.emulator import SlackEmulator
from bot.local.sandbox import INCIDENT, ProbeTarget, sandbox_policy

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="needs SIGHUP")
SIGHUP_BIT = 1 << (signal.SIGHUP - 1) if hasattr(signal, "SIGHUP") else 0


@dataclass
class World:
    emu: SlackEmulator
    probes: ProbeTarget
    tmp: Path
    url: str
    token: str
    secret: str
    master: str

    def env(self, algorithm: str = "RS256") -> dict[str, str]:
        policy = sandbox_policy(self.probes.url, "client-" + os.urandom(6).hex(),
                                algorithm=algorithm)
        return base_env(self.tmp, self.emu, policy, self.token, self.secret, self.master,
                        self.url)

    def alerts(self) -> list[str]:
        return [m.text or "" for m in self.emu.messages(INCIDENT)
                if (m.text or "").startswith(":rotating_light:")]


@pytest.fixture
async def world(tmp_path: Path, empty_database_url: str) -> AsyncIterator[World]:
    emu = SlackEmulator(bot_token="xoxb-" + os.urandom(8).hex())
    probes = ProbeTarget()
    await emu.start()
    await probes.start()
    try:
        yield World(emu, probes, tmp_path, empty_database_url, emu.bot_token,
                    os.urandom(16).hex(), new_master_key())
    finally:
        await probes.stop()
        await emu.stop()


def _catches_sighup(pid: int) -> bool:
    """Linux: whether the process has a handler for SIGHUP installed (SigCgt)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    line = next((x for x in status.splitlines() if x.startswith("SigCgt:")), "SigCgt: 0")
    return bool(int(line.split()[1], 16) & SIGHUP_BIT)


async def test_a_sighup_while_serve_starts_does_not_kill_it(world: World) -> None:
    serve = ServeProcess(world.env(), world.tmp / "serve.log")
    starting = asyncio.create_task(serve.start(timeout=60))
    await asyncio.sleep(0)  # the child is spawned (Popen returns after its exec)
    assert serve.proc is not None
    pid = serve.proc.pid
    # serve's own code holds SIGHUP first thing: wait for that moment (Linux shows it in
    # /proc), at most a second (the interpreter's own few milliseconds before it cannot
    # be helped); then SIGHUP lands before any import, migration or key work, and again
    # all through the start, until /healthz answers.
    deadline = time.monotonic() + 1.0
    while sys.platform.startswith("linux") and not _catches_sighup(pid):
        assert serve.proc.poll() is None, serve.log_path.read_text()[-2000:]
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.001)
    sent = 0
    while not starting.done():
        serve.proc.send_signal(signal.SIGHUP)
        sent += 1
        await asyncio.sleep(0.02)
    try:
        await starting  # raises if serve exited (the default SIGHUP action kills it)
        assert sent >= 1
        async with aiohttp.ClientSession() as session:
            async with session.get(serve.url + "/healthz") as resp:
                assert resp.status == 200
        # The held SIGHUP is not lost: a reload runs once serve can, and serve stays up.
        deadline = time.monotonic() + 15
        while "SIGHUP: reloading" not in serve.log_path.read_text():
            assert time.monotonic() < deadline, serve.log_path.read_text()[-3000:]
            await asyncio.sleep(0.05)
        while "policy reloaded (sighup" not in serve.log_path.read_text():
            assert time.monotonic() < deadline, serve.log_path.read_text()[-3000:]
            await asyncio.sleep(0.05)
        assert serve.proc.poll() is None
        assert "Traceback" not in serve.log_path.read_text()
    finally:
        assert await serve.stop() == 0, serve.log_path.read_text()[-3000:]


async def _rotations(url: str) -> list[dict[str, str]]:
    rows = await query(url, "SELECT actor, details FROM audit_log WHERE event = 'key_rotated'")
    return [{"actor": str(actor), **json.loads(str(details))} for actor, details in rows]


async def _keys(url: str) -> dict[str, str]:
    return {str(kid): str(alg) for kid, alg in await query(url, "SELECT kid, alg FROM signing_keys")}


async def _jwks_algs(serve: ServeProcess) -> list[str]:
    async with aiohttp.ClientSession() as session:
        async with session.get(serve.url + "/.well-known/jwks.json") as resp:
            return [k["alg"] for k in (await resp.json())["keys"]]


async def test_a_start_that_switches_algorithm_is_an_audited_rotation_once(world: World) -> None:
    # A brand-new deployment: its first key is not a rotation (no audit row, no alert).
    first = ServeProcess(world.env("RS256"), world.tmp / "first.log")
    await first.start(timeout=60)
    assert await first.stop() == 0
    [(rs256_kid, alg)] = (await _keys(world.url)).items()
    assert alg == "RS256"
    assert await _rotations(world.url) == []
    await asyncio.sleep(0.5)
    assert world.alerts() == []

    # The policy now says ES256 and two replicas start at once: one key is made, audited
    # as a rotation and alerted, once.
    env = world.env("ES256")
    a, b = ServeProcess(env, world.tmp / "a.log"), ServeProcess(env, world.tmp / "b.log")
    try:
        await asyncio.gather(a.start(timeout=60), b.start(timeout=60))
        keys = await _keys(world.url)
        [es256_kid] = [kid for kid, alg in keys.items() if alg == "ES256"]
        assert len(keys) == 2
        [rotated] = await _rotations(world.url)
        assert rotated == {"actor": "breakglass", "kid": es256_kid, "previous": rs256_kid,
                           "alg": "ES256", "trigger": "start"}
        [alert_row] = await query(world.url, "SELECT details FROM audit_log WHERE event = 'alert'")
        alert = json.loads(str(alert_row[0]))
        assert alert["kind"] == "key_rotated" and alert["kid"] == es256_kid
        await world.emu.wait_for(lambda: len(world.alerts()) >= 1, timeout=15)
        await asyncio.sleep(1.0)  # a second post would have come by now
        [post] = world.alerts()
        assert es256_kid in post and rs256_kid in post and "ES256" in post
        for replica in (a, b):  # both sign with the new key; the old one stays published
            assert (await _jwks_algs(replica))[0] == "ES256"
            assert "Traceback" not in replica.log_path.read_text()
    finally:
        assert await a.stop() == 0
        assert await b.stop() == 0

    # Started again with the same policy: the key exists, nothing more is rotated. And
    # SIGINT stops it as SIGTERM does (operations.md, Stopping): drained, exit 0.
    again = ServeProcess(env, world.tmp / "again.log")
    await again.start(timeout=60)
    assert again.proc is not None
    again.proc.send_signal(signal.SIGINT)
    assert await asyncio.to_thread(again.proc.wait, 20) == 0
    assert "stopping: draining requests and the outbox" in again.log_path.read_text()
    await again.stop()
    assert len(await _rotations(world.url)) == 1
    assert len(await _keys(world.url)) == 2
