"""Durable commits on SQLite (contract §8): a commit is on disk before anyone acts on
it, and nothing about a change leaves the outbox before that change is durable.

The disk is held back here by making the WAL's fsync wait (the fault is injected
into os.fsync, not into the project): while it waits, Slack is acknowledged as
usual, but no message about the new request reaches Slack; once the disk answers,
the card goes out. A group of concurrent commits shares one fsync.
"""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from typing import Any

from helpers import timed
from sqlalchemy import text

from bot.sandbox import ALICE, REVIEWS, Sandbox
from bot.store.db import Database


class HeldDisk:
    """os.fsync, except that an fsync of a file ending in -wal waits for a permit."""

    def __init__(self, monkeypatch: Any) -> None:
        self.real = os.fsync
        self.permits = threading.Semaphore(0)
        self.waiting = threading.Event()
        self.released = False
        self.wal_syncs = 0
        monkeypatch.setattr(os, "fsync", self.fsync)

    def fsync(self, fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith("-wal"):
            self.waiting.set()
            if not self.released:
                self.permits.acquire(timeout=30)
            self.waiting.clear()
            self.wal_syncs += 1
        self.real(fd)

    def release_all(self) -> None:
        self.released = True
        self.permits.release(1000)


async def test_nothing_leaves_before_the_commit_is_on_disk(tmp_path: Path, monkeypatch: Any) -> None:
    async with Sandbox(directory=tmp_path, algorithm="ES256") as box:
        await box.settle()
        disk = HeldDisk(monkeypatch)
        try:
            ack = await timed(box.slack.command(ALICE, "payments-write 30m INC-8 disk is slow"))
            assert "Checking" in ack.body  # Slack is answered whatever the disk does
            for _ in range(50):  # one fsync at a time, until the request's commit is visible
                async with box.bot.db.read() as conn:
                    if (await conn.execute(text("SELECT count(*) FROM requests"))).scalar():
                        break
                if await asyncio.to_thread(disk.waiting.wait, 0.1):
                    disk.permits.release()
            else:
                raise AssertionError("the request was never committed")
            # Committed, and its own fsync held: nothing about it may reach Slack.
            await asyncio.sleep(1.0)  # time enough for the outbox, were it not held back
            assert box.emulator.messages(REVIEWS) == []
        finally:
            disk.release_all()
        await box.emulator.wait_for(lambda: len(box.emulator.messages(REVIEWS)) == 1, timeout=10)
        assert disk.wal_syncs >= 1


async def test_concurrent_commits_share_an_fsync(tmp_path: Path, monkeypatch: Any) -> None:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'd.db'}")
    try:
        await db.create_schema()
        disk = HeldDisk(monkeypatch)

        async def write(i: int) -> None:
            async with db.transaction() as conn:
                await conn.execute(text("INSERT INTO sealed_secrets (name, blob) VALUES (:n, :b)"),
                                   {"n": f"s{i}", "b": b"x"})

        first = asyncio.create_task(write(0))
        asyncio.get_running_loop().call_later(20, disk.release_all)  # never hang the suite
        await asyncio.to_thread(disk.waiting.wait, 10)  # the first commit's fsync is under way
        rest = [asyncio.create_task(write(i)) for i in range(1, 50)]
        await asyncio.sleep(0.5)
        assert not first.done() and not any(t.done() for t in rest)  # nobody returns early
        disk.permits.release()  # the first fsync ends...
        await first
        await asyncio.sleep(0.2)
        assert not any(t.done() for t in rest)  # ...but the others committed after it began
        disk.release_all()
        await asyncio.gather(*rest)
        assert disk.wal_syncs == 2  # the first commit's, then one for the 49 that waited
    finally:
        await db.dispose()
