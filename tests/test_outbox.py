"""The transactional outbox and its Dispatcher, against the Slack emulator's faults.

Each test drives a real Dispatcher (small delays, so retries take milliseconds)
over real HTTP to the emulator, on a SQLite file. The last tests run the whole
bot (Runtime) and restart it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from slack_sdk.web.async_client import AsyncWebClient
from sqlalchemy import event, select, update

from bot import metrics
from bot.core.clock import SystemClock
from bot.delivery import outbox
from bot.delivery.outbox import Dispatcher, Rendered
from bot.local.emulator import SlackEmulator
from bot.local.sandbox import ALICE, BOB, CAROL, INCIDENT, REVIEWS, Sandbox
from bot.store.db import Database
from bot.store.schema import outbox as outbox_table
from bot.store.schema import slack_messages

TOKEN = "xoxb-" + "outbox-test-token"
POST = "chat.postMessage"


@dataclass
class World:
    emu: SlackEmulator
    db: Database
    client: AsyncWebClient
    path: Path

    def dispatcher(self, **kw: Any) -> Dispatcher:
        async def no_token(_p: dict[str, Any]) -> Rendered | None:
            return Rendered("hello")

        opts: dict[str, Any] = {"base_delay": 0.01, "max_delay": 0.05, "poll_interval": 0.02,
                                "max_attempts": 8}
        materialise = kw.pop("materialise", no_token)
        client = kw.pop("client", self.client)
        opts.update(kw)
        return Dispatcher(self.db, client, SystemClock(), materialise, **opts)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    emu = SlackEmulator(bot_token=TOKEN)
    await emu.start()
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'outbox.db'}")
    await db.create_schema()
    client = AsyncWebClient(token=TOKEN, base_url=emu.api_url, timeout=1.0, retry_handlers=[])
    try:
        yield World(emu, db, client, tmp_path)
    finally:
        await db.dispose()
        await emu.stop()


def now() -> datetime:
    return datetime.now(UTC)


async def post(db: Database, channel: str, text: str, key: str | None = None,
               lane: str | None = None) -> None:
    async with db.transaction() as conn:
        await outbox.post(conn, now(), channel, text, key=key, lane=lane)


async def rows(db: Database) -> list[dict[str, Any]]:
    async with db.read() as conn:
        result = await conn.execute(select(outbox_table).order_by(outbox_table.c.id))
        return [dict(r) for r in result.mappings().all()]


def texts(emu: SlackEmulator, channel: str) -> list[str]:
    return [m.text for m in emu.messages(channel)]


def sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def clear_faults(emu: SlackEmulator) -> None:
    emu._faults.clear()  # noqa: SLF001 - the emulator has no public "heal" yet


# --------------------------------------------------------------------------- basics


async def test_post_then_update_uses_the_recorded_ts(world: World) -> None:
    async with world.db.transaction() as conn:
        await outbox.post(conn, now(), "C1", "card v1", key="card:R1")
        await outbox.update_message(conn, now(), "card:R1", "C1", "card v2")
        await outbox.update_message(conn, now(), "card:R1", "C1", "card v3")
    assert await world.dispatcher().drain(5) == 0
    [msg] = world.emu.messages("C1")
    assert msg.text == "card v3" and [v.text for v in msg.history] == ["card v1", "card v2"]
    async with world.db.read() as conn:
        recorded = (await conn.execute(select(slack_messages))).mappings().all()
    assert [(r["key"], r["channel"], r["ts"]) for r in recorded] == [("card:R1", "C1", msg.ts)]
    assert {r["status"] for r in await rows(world.db)} == {"sent"}
    assert len(world.emu.calls_to(POST)) == 1


async def test_a_keyed_post_already_recorded_is_not_sent_again(world: World) -> None:
    await post(world.db, "C1", "card", key="card:R2")
    d = world.dispatcher()
    assert await d.drain(5) == 0
    # The same event queued again (a crash after Slack answered, before the row was marked).
    await post(world.db, "C1", "card", key="card:R2")
    assert await d.drain(5) == 0
    assert texts(world.emu, "C1") == ["card"]
    assert len(world.emu.calls_to(POST)) == 1


async def test_run_loop_delivers_on_wake_and_stops(world: World) -> None:
    d = world.dispatcher(poll_interval=5.0)  # only a wake can make this quick
    stop = asyncio.Event()
    task = asyncio.create_task(d.run(stop))
    await asyncio.sleep(0.05)
    await post(world.db, "C1", "hello")
    d.wake()
    await world.emu.wait_for(lambda: texts(world.emu, "C1") == ["hello"], timeout=2)
    stop.set()
    await asyncio.wait_for(task, 1.0)  # stop wakes the loop; no waiting out poll_interval


# --------------------------------------------------------------------------- faults


async def test_http_500_is_retried_with_backoff_then_delivered_once(world: World) -> None:
    world.emu.fail(POST, 500, times=3)
    before = sample("breakglass_outbox_retries_total", kind="post")
    d = world.dispatcher(base_delay=0.05, max_delay=1.0)
    await post(world.db, "C1", "after 500s")
    assert await d.drain(10) == 0
    assert texts(world.emu, "C1") == ["after 500s"]
    calls = world.emu.calls_to(POST)
    assert [c.fault for c in calls] == ["http_500"] * 3 + [None]
    gaps = [b.at - a.at for a, b in zip(calls, calls[1:], strict=False)]
    # Exponential backoff with jitter in [ceiling/2, ceiling]: 0.05, 0.1, 0.2 ceilings.
    assert gaps[0] >= 0.02 and gaps[1] >= 0.045 and gaps[2] >= 0.095
    assert sample("breakglass_outbox_retries_total", kind="post") - before == 3
    [row] = await rows(world.db)
    assert row["status"] == "sent" and row["attempts"] == 4


async def test_backoff_grows_exponentially_with_jitter_and_is_capped(world: World) -> None:
    d = world.dispatcher(base_delay=1.0, max_delay=10.0)
    for attempt, ceiling in [(1, 1), (2, 2), (3, 4), (4, 8), (5, 10), (30, 10), (500, 10)]:
        draws = [d._backoff(attempt) for _ in range(200)]  # noqa: SLF001
        assert all(ceiling / 2 <= x <= ceiling for x in draws)
        assert len(set(draws)) > 100  # jitter: no two processes retry in lockstep


async def test_rate_limit_waits_retry_after_and_uses_no_attempt(world: World) -> None:
    world.emu.rate_limit(POST, retry_after=1, times=2)
    before = sample("breakglass_outbox_dead_letters_total", kind="post")
    d = world.dispatcher(max_attempts=2, max_delay=5.0)
    await post(world.db, "C1", "paced")
    assert await d.drain(10) == 0
    calls = world.emu.calls_to(POST)
    assert [c.fault for c in calls] == ["rate_limited"] * 2 + [None]
    for a, b in zip(calls, calls[1:], strict=False):
        assert b.at - a.at >= 0.95, "Retry-After: 1 was not honoured"
    assert texts(world.emu, "C1") == ["paced"]
    assert sample("breakglass_outbox_dead_letters_total", kind="post") == before
    [row] = await rows(world.db)
    assert row["status"] == "sent" and row["attempts"] == 1  # the 429s cost nothing


async def test_absurd_retry_after_is_capped_by_max_delay(world: World) -> None:
    world.emu.rate_limit(POST, retry_after=86400)
    d = world.dispatcher(max_delay=0.2)
    await post(world.db, "C1", "soon")
    assert await d.drain(5) == 0
    assert texts(world.emu, "C1") == ["soon"]


async def test_permanent_error_dead_letters_at_once_with_metric_and_log(
        world: World, caplog: pytest.LogCaptureFixture) -> None:
    world.emu.error(POST, "channel_not_found")
    before = sample("breakglass_outbox_dead_letters_total", kind="post")
    d = world.dispatcher()
    await post(world.db, "C404", "lost")
    with caplog.at_level(logging.ERROR, logger="bot.delivery.outbox"):
        assert await d.drain(5) == 0
    [row] = await rows(world.db)
    assert row["status"] == "dead" and "channel_not_found" in row["last_error"]
    assert len(world.emu.calls_to(POST)) == 1
    assert sample("breakglass_outbox_dead_letters_total", kind="post") - before == 1
    [record] = [r for r in caplog.records if "dead-lettered" in r.getMessage()]
    assert f"outbox event {row['id']} " in record.getMessage()
    assert "breakglass outbox retry" in record.getMessage()


async def test_transient_ok_false_is_retried(world: World) -> None:
    world.emu.error(POST, "internal_error", times=2)
    world.emu.error(POST, "fatal_error", times=1)
    d = world.dispatcher()
    await post(world.db, "C1", "eventually")
    assert await d.drain(5) == 0
    assert texts(world.emu, "C1") == ["eventually"]
    assert [c.fault for c in world.emu.calls_to(POST)] == [
        "error:internal_error", "error:internal_error", "error:fatal_error", None]


async def test_ok_false_ratelimited_is_paced_not_counted(world: World) -> None:
    world.emu.error(POST, "ratelimited", times=3)
    d = world.dispatcher(max_attempts=2, max_delay=0.05)
    await post(world.db, "C1", "paced by body")
    assert await d.drain(10) == 0
    assert texts(world.emu, "C1") == ["paced by body"]


async def test_hang_beyond_the_client_timeout_is_retried(world: World) -> None:
    fast = AsyncWebClient(token=TOKEN, base_url=world.emu.api_url, timeout=0.3, retry_handlers=[])
    world.emu.hang(POST, None)  # never answered (until the emulator stops)
    d = world.dispatcher(client=fast)
    assert d.lease.total_seconds() == pytest.approx(5.3)  # the client timeout plus a margin
    await post(world.db, "C1", "after a hang", key="card:H1")
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await d.drain(5) == 0
    assert loop.time() - started >= 0.3
    assert texts(world.emu, "C1") == ["after a hang"]
    assert [c.fault for c in world.emu.calls_to(POST)] == ["hang", None]
    [row] = await rows(world.db)
    assert row["status"] == "sent" and row["attempts"] == 2


async def test_an_answer_that_comes_after_the_timeout_may_double_a_post(world: World) -> None:
    """The one thing no outbox can rule out, documented in docs/reliability.md:
    Slack did the post but its answer came after our timeout. The retry posts
    again; it never posts a third time, and the row is sent once recorded."""
    fast = AsyncWebClient(token=TOKEN, base_url=world.emu.api_url, timeout=0.2, retry_handlers=[])
    world.emu.hang(POST, 0.5)
    d = world.dispatcher(client=fast, base_delay=1.0, max_delay=1.0)
    await post(world.db, "C1", "ambiguous")
    assert await d.drain(5) == 0
    await asyncio.sleep(0.4)
    assert 1 <= texts(world.emu, "C1").count("ambiguous") <= 2
    [row] = await rows(world.db)
    assert row["status"] == "sent"


async def test_connection_refused_is_retried(world: World) -> None:
    dead_end = AsyncWebClient(token=TOKEN, base_url="http://127.0.0.1:9/api/", timeout=0.5,
                              retry_handlers=[])
    d = world.dispatcher(client=dead_end, max_attempts=3)
    await post(world.db, "C1", "nowhere")
    assert await d.drain(5) == 0
    [row] = await rows(world.db)
    assert row["status"] == "dead" and row["attempts"] == 3
    assert "gave up after 3 attempts" in row["last_error"]


# --------------------------------------------------------------------------- order


async def test_per_channel_order_holds_under_random_faults(world: World) -> None:
    rng = random.Random(5)
    channels = ["C1", "C2", "C3", "C4"]
    expected: dict[str, list[str]] = {c: [] for c in channels}
    for i in range(120):
        c = rng.choice(channels)
        expected[c].append(f"{c}-{i}")
    for _ in range(40):
        kind = rng.choice(["fail", "rate", "error", "ok"])
        if kind == "fail":
            world.emu.fail(POST, rng.choice([500, 502, 503]))
        elif kind == "rate":
            world.emu.rate_limit(POST, retry_after=0)
        elif kind == "error":
            world.emu.error(POST, "internal_error")
        else:
            world.emu.hang(POST, 0.01)
    async with world.db.transaction() as conn:
        for i in range(120):
            for c in channels:
                if f"{c}-{i}" in expected[c]:
                    await outbox.post(conn, now(), c, f"{c}-{i}")
    d = world.dispatcher(max_attempts=50)
    assert await d.drain(30) == 0
    for c in channels:
        assert texts(world.emu, c) == expected[c], f"order or count broken in {c}"
    assert {r["status"] for r in await rows(world.db)} == {"sent"}


async def test_a_failing_lane_does_not_hold_the_others(world: World) -> None:
    world.emu.hang(POST, None)  # the first post (lane C1) hangs until its timeout
    fast = AsyncWebClient(token=TOKEN, base_url=world.emu.api_url, timeout=1.0, retry_handlers=[])
    d = world.dispatcher(client=fast)
    await post(world.db, "C1", "slow-1")
    await post(world.db, "C1", "slow-2")
    await post(world.db, "C2", "fast")
    task = asyncio.create_task(d.drain(5))
    await world.emu.wait_for(lambda: texts(world.emu, "C2") == ["fast"], timeout=0.8)
    assert texts(world.emu, "C1") == []  # C1's head is stuck; its second row waits behind it
    assert await task == 0
    assert texts(world.emu, "C1") == ["slow-1", "slow-2"]


async def test_a_dead_row_does_not_hold_its_lane(world: World) -> None:
    world.emu.error(POST, "msg_too_long")
    d = world.dispatcher()
    await post(world.db, "C1", "too long")
    await post(world.db, "C1", "next")
    assert await d.drain(5) == 0
    assert texts(world.emu, "C1") == ["next"]
    assert [r["status"] for r in await rows(world.db)] == ["dead", "sent"]


async def test_update_of_a_never_posted_message_is_dead_and_revived_with_it(world: World) -> None:
    world.emu.error(POST, "not_in_channel")
    d = world.dispatcher()
    async with world.db.transaction() as conn:
        await outbox.post(conn, now(), "C1", "card", key="card:R3")
        await outbox.update_message(conn, now(), "card:R3", "C1", "card approved")
    assert await d.drain(5) == 0
    assert [r["status"] for r in await rows(world.db)] == ["dead", "dead"]
    assert "no posted message" in (await rows(world.db))[1]["last_error"]
    # The operator invites the bot to the channel, then queues both again: same order.
    assert await outbox.retry_dead(world.db, now()) == 2
    assert await d.drain(5) == 0
    [msg] = world.emu.messages("C1")
    assert msg.text == "card approved" and [v.text for v in msg.history] == ["card"]


async def test_an_update_waits_for_its_post_in_another_lane(world: World) -> None:
    world.emu.fail(POST, 500, times=2)
    d = world.dispatcher()
    async with world.db.transaction() as conn:
        await outbox.post(conn, now(), "C1", "card", key="card:R4", lane="old-lane")
        await outbox.update_message(conn, now(), "card:R4", "new-lane", "card v2")
    assert await d.drain(5) == 0
    [msg] = world.emu.messages("C1")
    assert msg.text == "card v2"
    assert {r["status"] for r in await rows(world.db)} == {"sent"}


async def test_two_dispatchers_on_one_database_never_send_a_row_twice(world: World) -> None:
    other_db = Database(world.db.url)
    try:
        world.emu.fail(POST, 503, times=10)
        for i in range(60):
            await post(world.db, f"C{i % 3}", f"m{i}")
        a = world.dispatcher()
        b = Dispatcher(other_db, world.client, SystemClock(), a.materialise, base_delay=0.01,
                       max_delay=0.05, poll_interval=0.02)
        left = await asyncio.gather(a.drain(15), b.drain(15))
        assert left == [0, 0]
    finally:
        await other_db.dispose()
    for c in range(3):
        assert texts(world.emu, f"C{c}") == [f"m{i}" for i in range(60) if i % 3 == c]
    sent_calls = [c for c in world.emu.calls_to(POST) if c.fault is None]
    assert len(sent_calls) == 60


async def test_a_lease_left_by_a_dead_process_is_taken_over_when_it_runs_out(world: World) -> None:
    await post(world.db, "C1", "orphan")
    crashed = world.dispatcher(lease=0.3)
    assert len(await crashed._claim()) == 1  # noqa: SLF001 - claimed, then "SIGKILL"
    survivor = world.dispatcher(lease=0.3)
    assert await survivor.deliver_once() == 0  # leased: not due yet
    await asyncio.sleep(0.35)
    assert await survivor.drain(5) == 0
    assert texts(world.emu, "C1") == ["orphan"]


async def test_many_lanes_beyond_one_claim_are_not_starved(world: World) -> None:
    # 30 rows in a lane whose head waits (backoff) must not hide the other lanes.
    async with world.db.transaction() as conn:
        for i in range(30):
            await outbox.post(conn, now(), "CSTUCK", f"s{i}")
        await conn.execute(update(outbox_table).where(outbox_table.c.lane == "CSTUCK")
                           .values(next_attempt_at=datetime(2999, 1, 1, tzinfo=UTC)))
        for i in range(25):
            await outbox.post(conn, now(), f"CL{i}", "hello")
    d = world.dispatcher()
    assert await d.deliver_once() == 25  # one round: every free lane's head, none stuck
    assert all(texts(world.emu, f"CL{i}") == ["hello"] for i in range(25))
    assert texts(world.emu, "CSTUCK") == []
    assert await d.pending_count() == 30


# --------------------------------------------------------------------------- the look


def _expected_look(rows: list[dict[str, Any]], at: datetime
                   ) -> tuple[dict[str, list[int]], datetime | None, int]:
    """What `Dispatcher._due` promises, from every row: per lane its first BATCH_PER_LANE
    pending rows in id order, the due ones up to the first that is not; the earliest such
    blocking row's time; how many pending rows that look covered."""
    by_lane: dict[str, list[int]] = {}
    next_due: datetime | None = None
    seen = 0
    for lane in sorted({r["lane"] for r in rows}):
        firsts = sorted((r for r in rows if r["lane"] == lane and r["status"] == "pending"),
                        key=lambda r: r["id"])[:outbox.BATCH_PER_LANE]
        seen += len(firsts)
        for r in firsts:
            due = r["next_attempt_at"]
            due = due if due.tzinfo else due.replace(tzinfo=UTC)
            if due > at:
                next_due = due if next_due is None else min(next_due, due)
                break
            by_lane.setdefault(lane, []).append(r["id"])
    return by_lane, next_due, seen


async def test_the_look_takes_each_lanes_first_pending_rows_in_order(database_url: str) -> None:
    """`_due` against the rule it keeps, on random outboxes (both backends): lanes of
    0-50 rows, pending, sent and dead mixed, some waiting (backoff or a lease)."""
    db = Database(database_url)
    await db.create_schema()
    rng = random.Random(20261201)
    at = now()
    try:
        for round_ in range(6):
            async with db.transaction() as conn:
                await conn.execute(outbox_table.delete())
                batch = []
                for lane in [f"C{round_}{i}" for i in range(rng.randint(0, 9))] + ["dm:U1"]:
                    for _ in range(rng.choice([0, 1, 3, outbox.BATCH_PER_LANE, 50])):
                        r = outbox.row(at, lane=lane, kind="post", payload={"channel": lane})
                        r["status"] = rng.choice(["pending"] * 6 + ["sent", "dead"])
                        if rng.random() < 0.08:
                            r["next_attempt_at"] = at + timedelta(seconds=rng.randint(1, 600))
                        batch.append(r)
                rng.shuffle(batch)  # lanes interleave in id order
                await outbox.enqueue_many(conn, batch)
            everything = await rows(db)
            async with db.read() as conn:
                by_lane, next_due, seen = await Dispatcher._due(conn, at)
            got = {lane: [r["id"] for r in rs] for lane, rs in by_lane.items()}
            assert (got, next_due, seen) == _expected_look(everything, at), round_
            assert all(list(r) == ["id", "lane", "kind", "payload", "attempts"]
                       for rs in by_lane.values() for r in rs)
        async with db.transaction() as conn:
            await conn.execute(outbox_table.delete())
            await outbox.enqueue_many(conn, [
                {**outbox.row(at, lane="C1", kind="post", payload={}), "status": s}
                for s in ("sent", "dead")])
        async with db.read() as conn:
            assert await Dispatcher._due(conn, at) == ({}, None, 0)  # drain's "nothing left"
    finally:
        await db.dispose()


async def test_the_look_walks_the_pending_lanes_not_the_pending_rows_on_sqlite(
        world: World) -> None:
    """SQLite runs on the event loop: the look must not walk every pending row (30,000
    after a large revocation pass held the loop ~108 ms a look). Every statement `_due`
    runs is planned here: the partial index `ix_outbox_pending_lane` finds the lanes and
    their first rows, and no step scans the outbox or walks its status index."""
    at = now()
    async with world.db.transaction() as conn:
        await outbox.enqueue_many(conn, [
            outbox.row(at, lane=f"C{i % 7}", kind="post", payload={"channel": "C"})
            for i in range(300)])
        await conn.execute(update(outbox_table).where(outbox_table.c.id % 5 == 0)
                           .values(status="sent"))
    seen: list[tuple[str, Any]] = []

    def on_statement(_conn: Any, _cursor: Any, statement: str, params: Any, *_: Any) -> None:
        seen.append((statement, params))

    engine = world.db.engine.sync_engine
    async with world.db.read() as conn:
        event.listen(engine, "before_cursor_execute", on_statement)
        try:
            by_lane, _, looked = await Dispatcher._due(conn, at)
        finally:
            event.remove(engine, "before_cursor_execute", on_statement)
    assert len(by_lane) == 7 and looked == 7 * outbox.BATCH_PER_LANE
    statements = [(s, p) for s, p in seen if "outbox" in s]
    assert statements, seen
    with closing(sqlite3.connect(world.path / "outbox.db")) as db:
        for statement, params in statements:
            plan = [str(step[3]) for step in
                    db.execute("EXPLAIN QUERY PLAN " + statement, params).fetchall()]
            assert any("ix_outbox_pending_lane" in step for step in plan), plan
            for step in plan:
                assert "ix_outbox_status_next" not in step, plan
                words = step.split()
                if words[0] == "SCAN" and words[1] not in ("lanes", "CONSTANT"):  # the CTE, not the table
                    # Only the first lane: the index in order, LIMIT 1.
                    assert "USING INDEX ix_outbox_pending_lane" in step \
                        or "USING COVERING INDEX ix_outbox_pending_lane" in step, plan


# --------------------------------------------------------------------------- token DMs


async def test_token_dm_is_materialised_at_send_time_and_errors_leak_nothing(
        world: World, caplog: pytest.LogCaptureFixture) -> None:
    secret = "eyJhbGciOiJub25lIn0.eyJzZWNyZXQiOnRydWV9.c2lnbmF0dXJl"
    calls: list[dict[str, Any]] = []

    async def materialise(p: dict[str, Any]) -> Rendered | None:
        calls.append(p)
        if len(calls) == 1:
            raise RuntimeError(f"database hiccup while minting {secret}")
        return Rendered(f"your token: {secret}")

    # The Runtime's client logs at INFO (slack_sdk dumps bodies at DEBUG); so does this one.
    sdk_log = logging.getLogger("bot.slack.sdk")
    sdk_log.setLevel(logging.INFO)
    client = AsyncWebClient(token=TOKEN, base_url=world.emu.api_url, timeout=1.0,
                            retry_handlers=[], logger=sdk_log)
    d = world.dispatcher(materialise=materialise, client=client)
    async with world.db.transaction() as conn:
        await outbox.enqueue(conn, now(), lane="dm:U1", kind="token_dm",
                             payload={"request_id": "R5", "user": "U1", "key": "dm:R5"})
    with caplog.at_level(logging.DEBUG, logger="bot"):
        assert await d.drain(5) == 0
    assert len(calls) == 2
    assert texts(world.emu, "U1") == [f"your token: {secret}"]
    assert secret not in caplog.text
    assert all(secret not in (r["last_error"] or "") for r in await rows(world.db))
    assert all(secret not in r["payload"] for r in await rows(world.db))


async def test_token_dm_for_a_closed_grant_sends_nothing(world: World) -> None:
    async def closed(_p: dict[str, Any]) -> Rendered | None:
        return None

    d = world.dispatcher(materialise=closed)
    async with world.db.transaction() as conn:
        await outbox.enqueue(conn, now(), lane="dm:U1", kind="token_dm",
                             payload={"request_id": "R6", "user": "U1", "key": "dm:R6"})
    assert await d.drain(5) == 0
    assert world.emu.calls_to(POST) == []
    assert [r["status"] for r in await rows(world.db)] == ["sent"]


async def test_garbage_rows_are_dead_not_fatal(world: World) -> None:
    async with world.db.transaction() as conn:
        await outbox.enqueue(conn, now(), lane="C1", kind="carrier-pigeon", payload={})
        await conn.execute(outbox_table.insert().values(
            lane="C1", kind="post", payload="{not json", status="pending", attempts=0,
            next_attempt_at=now(), created_at=now()))
        await conn.execute(outbox_table.insert().values(
            lane="C1", kind="post", payload="[1, 2]", status="pending", attempts=0,
            next_attempt_at=now(), created_at=now()))
        await outbox.post(conn, now(), "C1", "still delivered")
    d = world.dispatcher(max_attempts=2)
    assert await d.drain(5) == 0
    assert [r["status"] for r in await rows(world.db)] == ["dead", "dead", "dead", "sent"]
    assert texts(world.emu, "C1") == ["still delivered"]


# --------------------------------------------------------------------------- the CLI


def _cli(db_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BREAKGLASS_", "SLACK_"))}
    env["BREAKGLASS_DATABASE_URL"] = db_url
    return subprocess.run([sys.executable, "-m", "bot", *args], env=env, capture_output=True,
                          text=True, timeout=60, check=False)


async def test_dead_letter_then_outbox_retry_cli_then_delivered(world: World) -> None:
    world.emu.fail(POST, 500, times=3)
    before = sample("breakglass_outbox_dead_letters_total", kind="post")
    d = world.dispatcher(max_attempts=3)
    await post(world.db, "C1", "first", key="card:R7")
    assert await d.drain(5) == 0
    await post(world.db, "C2", "other lane")  # Slack is back: the rest flows
    assert await d.drain(5) == 0
    statuses = [r["status"] for r in await rows(world.db)]
    assert statuses == ["dead", "sent"]
    assert sample("breakglass_outbox_dead_letters_total", kind="post") - before == 1
    dead = await outbox.dead_letters(world.db)
    assert [(r["kind"], r["lane"], r["attempts"]) for r in dead] == [("post", "C1", 3)]
    assert await outbox.counts(world.db) == {"pending": 0, "sent": 1, "dead": 1}

    done = await asyncio.to_thread(_cli, world.db.url, "outbox", "retry")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("1 dead-lettered")
    [first, _] = await rows(world.db)
    assert first["status"] == "pending" and first["attempts"] == 0 and first["last_error"] is None

    assert await d.drain(5) == 0
    assert texts(world.emu, "C1") == ["first"]
    assert [r["status"] for r in await rows(world.db)] == ["sent", "sent"]
    again = await asyncio.to_thread(_cli, world.db.url, "outbox", "retry")
    assert again.stdout.startswith("0 dead-lettered")


# --------------------------------------------------------------------------- the whole bot


async def test_state_and_messages_commit_together_and_a_restart_resumes(tmp_path: Path,
                                                                        database_url: str) -> None:
    box = Sandbox(directory=tmp_path, database_url=database_url)
    await box.start()
    try:
        emu = box.emulator
        emu.fail(POST, 503, times=10_000)  # Slack is down from here on
        resp = await box.slack.command(ALICE, "payments-write 30m INC-77 auth down")
        assert resp.status == 200
        await box.bot.idle()
        service = box.bot.service  # the request exists although Slack saw nothing of it
        async with box.bot.db.read() as conn:
            pending = (await conn.execute(select(outbox_table.c.kind, outbox_table.c.lane)
                                          .where(outbox_table.c.status == "pending"))).all()
        assert (("post", REVIEWS) in pending) and (("post", INCIDENT) in pending)
        assert await service.count_requests() == 1
        assert emu.messages(REVIEWS) == []

        await box.stop_bot()  # pending rows left behind while Slack fails
        db = Database(box.database_url)
        try:
            assert (await outbox.counts(db))["pending"] >= 2
        finally:
            await db.dispose()
        clear_faults(emu)
        await box.start_bot()  # a new Runtime on the same database
        await emu.wait_for(lambda: len(emu.messages(REVIEWS)) == 1 and
                           len(emu.messages(INCIDENT)) == 1, timeout=15)
        await box.settle(10)
        rid = box.latest_request_id()
        assert len(emu.messages(REVIEWS)) == 1 and len(emu.messages(INCIDENT)) == 1

        # The card keeps working after the restart: its ts was recorded once.
        for who in (BOB, CAROL):
            await box.slack.click(who, "bg_approve", rid, channel_id=REVIEWS)
            await box.settle()
        card = box.card(rid)
        assert len(emu.messages(REVIEWS)) == 1 and card is not None and card.history
        assert len(emu.messages(ALICE)) == 1  # one DM
        assert sum("*issued*" in m.text for m in emu.messages(INCIDENT)) == 1
    finally:
        await box.stop()


# ------------------------------------------------- posts that name another message


async def test_a_thread_reply_and_a_link_wait_for_the_message_they_name(world: World) -> None:
    """`thread_key` and `link_key` are resolved at send time: while the named message's
    own post is pending (here failing twice, in another lane), the row waits for it."""
    world.emu.fail(POST, 500, times=2)
    async with world.db.transaction() as conn:
        await outbox.enqueue_many(conn, [
            outbox.post_row(now(), "C1", "card", key="card:R9"),
            outbox.post_row(now(), "U0DIRECTOR", "please decide", lane="dm:U0DIRECTOR",
                            link_key="card:R9", link_text="Open R9"),
            outbox.post_row(now(), "C1", "reminder", lane="reminders", thread_key="card:R9"),
        ])
    assert await world.dispatcher().drain(5) == 0
    card = next(m for m in world.emu.messages("C1") if m.text == "card")
    reminder = next(m for m in world.emu.messages("C1") if m.text == "reminder")
    assert reminder.thread_ts == card.ts and card.thread_ts is None
    [dm] = world.emu.messages("U0DIRECTOR")
    assert dm.text == f"please decide\n<{world.emu.permalink('C1', card.ts)}|Open R9>"
    assert [c.params["message_ts"] for c in world.emu.calls_to("chat.getPermalink")] == [card.ts]
    done = await rows(world.db)
    assert {r["status"] for r in done} == {"sent"}
    # The card's first post failed (no other row could post before it): both waited.
    assert [r["attempts"] >= 2 for r in done] == [True, True, True]


async def test_a_post_naming_a_message_never_posted_goes_out_without_it(world: World) -> None:
    async with world.db.transaction() as conn:
        await outbox.enqueue_many(conn, [
            outbox.post_row(now(), "C1", "reminder", thread_key="card:NONE"),
            outbox.post_row(now(), "U0X", "hello", lane="dm:U0X", link_key="card:NONE"),
        ])
    assert await world.dispatcher().drain(5) == 0
    [reminder] = world.emu.messages("C1")
    assert reminder.thread_ts is None
    assert [m.text for m in world.emu.messages("U0X")] == ["hello"]
    assert world.emu.calls_to("chat.getPermalink") == []
