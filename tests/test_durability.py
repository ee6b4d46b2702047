"""Durable commits on SQLite (contract §8): a commit is on disk before anyone acts on
it, and nothing about a change leaves the outbox before that change is durable.

The disk is held back here by making the WAL's fsync wait (the fault is injected
into os.fsync, not into the project): while it waits, Slack is acknowledged as
usual, but no message about the new request reaches Slack; once the disk answers,
the card goes out. A group of concurrent commits shares one fsync.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

from helpers import timed
from sqlalchemy import text

from bot.local.sandbox import ALICE, REVIEWS, Sandbox
from bot.store.db import Database


class HeldDisk:
    """os.fsync, except that an fsync of a file ending in -wal is held (until
    `release_all`) when `hold_when()` is true at the moment it starts."""

    def __init__(self, monkeypatch: Any, hold_when: Any = lambda: True) -> None:
        self.real = os.fsync
        self.hold_when = hold_when
        self.released = threading.Event()
        self.waiting = threading.Event()
        self.wal_syncs = 0
        monkeypatch.setattr(os, "fsync", self.fsync)

    def fsync(self, fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith("-wal"):
            if not self.released.is_set() and self.hold_when():
                self.waiting.set()
                self.released.wait(30)
            self.wal_syncs += 1
        self.real(fd)

    def release_all(self) -> None:
        self.released.set()


async def test_nothing_leaves_before_the_commit_is_on_disk(tmp_path: Path, monkeypatch: Any) -> None:
    async with Sandbox(directory=tmp_path, algorithm="ES256") as box:
        await box.settle()
        path = str(box.directory / "breakglass.db")

        def request_committed() -> bool:  # at the start of an fsync: it covers that commit
            with contextlib.closing(sqlite3.connect(path, timeout=5)) as raw:
                return bool(raw.execute("SELECT count(*) FROM requests").fetchone()[0])

        disk = HeldDisk(monkeypatch, hold_when=request_committed)
        try:
            ack = await timed(box.slack.command(ALICE, "payments-write 30m INC-8 disk is slow"))
            assert "Checking" in ack.body  # Slack is answered whatever the disk does
            assert await asyncio.to_thread(disk.waiting.wait, 10), "no fsync after the request"
            # Committed, and every fsync since held: nothing about it may reach Slack.
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
        first_sync = iter([True])
        disk = HeldDisk(monkeypatch, hold_when=lambda: next(first_sync, False))

        async def write(i: int) -> None:
            async with db.transaction() as conn:
                await conn.execute(text("INSERT INTO sealed_secrets (name, blob) VALUES (:n, :b)"),
                                   {"n": f"s{i}", "b": b"x"})

        first = asyncio.create_task(write(0))
        asyncio.get_running_loop().call_later(20, disk.release_all)  # never hang the suite
        await asyncio.to_thread(disk.waiting.wait, 10)  # the first commit's fsync is held
        rest = [asyncio.create_task(write(i)) for i in range(1, 50)]
        await asyncio.sleep(0.5)
        assert not first.done() and not any(t.done() for t in rest)  # nobody returns early
        disk.release_all()
        await asyncio.gather(first, *rest)
        assert disk.wal_syncs == 2  # the first commit's, then one for the 49 that waited
    finally:
        await db.dispose()
