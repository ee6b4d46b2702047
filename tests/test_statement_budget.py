"""Statement budget of the main flow: each use case, with the outbox work it causes.

The bot's throughput on SQLite is bound by the number of SQL statements it runs
(each one costs SQLAlchemy's per-statement work), so the budget of each phase is
pinned here at what it measures now: a change that adds a statement to a hot path
fails this test, and says where.

Counted: every statement the engine runs (BEGIN, COMMIT and ROLLBACK aside), and
every transaction, read or write (the engine's "begin" event). Timers are pushed
out of the way (sweeps, outbox polling) so that a phase counts its own work only:
the command, the click or the reveal, the deliveries it causes, and the look of
`settle()` that finds the outbox empty.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from slack_sdk.web.async_client import AsyncWebClient
from sqlalchemy import event, func, select
from test_flow import approve, request

from bot import audit
from bot.core.clock import SystemClock
from bot.delivery import outbox
from bot.delivery.outbox import Dispatcher, Rendered
from bot.local.emulator import SlackEmulator
from bot.local.sandbox import ALICE, BOB, CAROL, REVIEWS, Sandbox
from bot.store.db import Database
from bot.store.schema import slack_messages

TOKEN = "xoxb-" + "budget-test-token"

# phase: (statements, transactions), as measured. Before this budget, on the same
# driver: command 21/13, approve 23/13, quorum 35/16, reveal 20/11. The command's 13th
# statement is the rate-limit count made again inside the insert's transaction (issue 13:
# the early count alone let concurrent commands past the limit). The quorum's 14th
# statement and 6th transaction came with durable commits on SQLite (a commit returns
# after its fsync): of the three messages a quorum sends, the DM now finishes after the
# other two were recorded, so their outcomes take two transactions instead of one.
BUDGET = {
    "command": (13, 6),
    "approve": (11, 5),
    "quorum": (14, 6),
    "reveal": (11, 5),
}


@dataclass
class Tally:
    statements: list[str] = field(default_factory=list)
    transactions: int = 0

    def report(self) -> str:
        return f"{self.transactions} transaction(s), {len(self.statements)} statement(s):\n  " + (
            "\n  ".join(s[:140] for s in self.statements))


@contextmanager
def counting(box: Sandbox) -> Iterator[Tally]:
    with _counting(box.bot.db.engine.sync_engine) as tally:
        yield tally


@contextmanager
def _counting(engine: Any) -> Iterator[Tally]:
    tally = Tally()

    def on_statement(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        text = " ".join(statement.split())
        if text.upper().split(" ", 1)[0] not in ("BEGIN", "COMMIT", "ROLLBACK"):
            tally.statements.append(text)

    def on_begin(_conn: Any) -> None:
        tally.transactions += 1

    event.listen(engine, "before_cursor_execute", on_statement)
    event.listen(engine, "begin", on_begin)
    try:
        yield tally
    finally:
        event.remove(engine, "before_cursor_execute", on_statement)
        event.remove(engine, "begin", on_begin)


def within(phase: str, tally: Tally) -> None:
    statements, transactions = BUDGET[phase]
    assert len(tally.statements) <= statements and tally.transactions <= transactions, (
        f"{phase}: over its budget of {transactions} transaction(s) and {statements} "
        f"statement(s): {tally.report()}")
    for stmt in tally.statements:
        # Hot paths never count the outbox, and never read a request twice in a phase.
        assert not stmt.startswith("SELECT count(*) AS count_1 FROM outbox"), tally.report()
    reads = [s for s in tally.statements if s.startswith("SELECT requests.id")]
    assert len(reads) <= 1, f"{phase}: the request was read {len(reads)} times: {tally.report()}"


async def quiet_box(tmp_path: Path) -> Sandbox:
    # No sweep (expiry, use summaries, audit head) and no outbox poll between phases.
    box = Sandbox(directory=tmp_path, sweep_interval=3600.0)
    await box.start()
    box.bot.dispatcher.poll_interval = 3600.0
    box.bot.closures.poll_every = 3600.0  # nor the poll for other processes' revocations
    await asyncio.sleep(0.1)  # the first sweep, which runs at start
    box.bot.dispatcher.wake()  # the poll in progress ends; the next one is an hour away
    await box.settle()
    return box


async def test_the_flow_stays_within_its_statement_budget(tmp_path: Path) -> None:
    box = await quiet_box(tmp_path)
    try:
        with counting(box) as tally:
            await box.slack.command(ALICE, "payments-write 30m INC-4521 auth provider down")
            await box.settle()
        rid = box.latest_request_id()
        within("command", tally)

        with counting(box) as tally:
            await box.slack.click(BOB, "bg_approve", rid, channel_id=REVIEWS)
            await box.settle()
        within("approve", tally)

        with counting(box) as tally:
            await box.slack.click(CAROL, "bg_approve", rid, channel_id=REVIEWS)
            await box.settle()
        within("quorum", tally)
        assert len(box.emulator.messages(ALICE)) == 1  # the DM with the Reveal button

        dm = box.emulator.dm_channel_for(ALICE)
        with counting(box) as tally:
            await box.slack.click(ALICE, "bg_reveal", rid, channel_id=dm)
            await box.settle()
        within("reveal", tally)
        assert len(box.emulator.views) == 1
        req = await box.bot.service.request(rid)
        assert req is not None and req.state.value == "revealed"
    finally:
        await box.stop()


async def test_a_use_case_appends_its_audit_events_with_one_head_read(tmp_path: Path) -> None:
    """At quorum one transaction appends two events ("approved", "issued"): one read of
    the head, one insert; and the outbox rows of that transaction go in one insert."""
    box = await quiet_box(tmp_path)
    try:
        await box.slack.command(ALICE, "payments-write 30m INC-4521 auth provider down")
        await box.settle()
        rid = box.latest_request_id()
        await box.slack.click(BOB, "bg_approve", rid, channel_id=REVIEWS)
        await box.settle()
        with counting(box) as tally:
            await box.slack.click(CAROL, "bg_approve", rid, channel_id=REVIEWS)
            await box.settle()
        heads = [s for s in tally.statements if s.startswith("SELECT seq, mac FROM audit_log")]
        inserts = [s for s in tally.statements if s.startswith("INSERT INTO audit_log")]
        outbox_inserts = [s for s in tally.statements if s.startswith("INSERT INTO outbox")]
        assert (len(heads), len(inserts), len(outbox_inserts)) == (1, 1, 1), tally.report()
        events = [r["event"] async for r in _audit(box) if r["request_id"] == rid]
        assert events == ["requested", "approved", "approved", "issued"]
    finally:
        await box.stop()


async def _audit(box: Sandbox) -> Any:
    async for row in audit.export(box.bot.db):
        yield row


# --------------------------------------------------------------------------- audit head


async def test_the_audit_head_is_remembered_within_a_transaction_only(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'audit.db'}"
    db, other = Database(url), Database(url)  # `other`: a second process on the same file
    key = b"k" * 32
    at = datetime.now(UTC)
    try:
        await db.create_schema()
        heads: list[str] = []

        def on_statement(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
            if statement.startswith("SELECT seq, mac FROM audit_log"):
                heads.append(statement)

        event.listen(db.engine.sync_engine, "before_cursor_execute", on_statement)
        async with db.transaction() as conn:
            assert await audit.append(conn, key, at=at, actor="a", event="one", details={}) == 1
            assert await audit.append(conn, key, at=at, actor="a", event="two", details={}) == 2
            assert await audit.append_many(conn, key, [
                audit.AuditEvent(at=at, actor="a", event="three", details={})]) == [3]
        assert len(heads) == 1  # one read for three appends in one transaction
        async with other.transaction() as conn:
            assert await audit.append(conn, key, at=at, actor="b", event="four", details={}) == 4
        async with db.transaction() as conn:  # a new transaction reads the head again
            assert await audit.append(conn, key, at=at, actor="a", event="five", details={}) == 5
        assert len(heads) == 2
        with pytest.raises(ValueError):  # a refused event changes nothing, remembered or not
            async with db.transaction() as conn:
                await audit.append(conn, key, at=at, actor="a", event="six", details={})
                await audit.append(conn, key, at=at, actor="a", event="x",
                                   details={"access_token": "nope"})
        async with db.transaction() as conn:
            assert await audit.append(conn, key, at=at, actor="a", event="six", details={}) == 6
        result = await audit.verify(db, key)
        assert result.ok and result.rows == 6
    finally:
        await db.dispose()
        await other.dispose()


# --------------------------------------------------------------------------- outbox


@pytest.fixture
async def slack(tmp_path: Path) -> AsyncIterator[tuple[SlackEmulator, Database, AsyncWebClient]]:
    emu = SlackEmulator(bot_token=TOKEN)
    await emu.start()
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'outbox.db'}")
    await db.create_schema()
    client = AsyncWebClient(token=TOKEN, base_url=emu.api_url, timeout=2.0, retry_handlers=[])
    try:
        yield emu, db, client
    finally:
        await db.dispose()
        await emu.stop()


async def _hello(_p: dict[str, Any]) -> Rendered | None:
    return Rendered("hello")


async def test_concurrent_lanes_record_their_outcomes_together(
        slack: tuple[SlackEmulator, Database, AsyncWebClient]) -> None:
    emu, db, client = slack
    async with db.transaction() as conn:
        await outbox.enqueue_many(conn, [
            outbox.post_row(datetime.now(UTC), f"C{i}", f"card {i}", key=f"card:R{i}")
            for i in range(25)])
    d = Dispatcher(db, client, SystemClock(), _hello)
    with counting_db(db) as tally:
        assert await d.deliver_once() == 25
    # Claim (due rows, lease, recorded keys) and one commit of 25 outcomes (status, ts).
    assert len(tally.statements) <= 5 and tally.transactions <= 2, tally.report()
    assert all(len(emu.messages(f"C{i}")) == 1 for i in range(25))
    assert await outbox.counts(db) == {"pending": 0, "sent": 25, "dead": 0}
    async with db.read() as conn:
        assert await conn.scalar(select(func.count()).select_from(slack_messages)) == 25


async def test_yield_to_is_awaited_before_each_claim(
        slack: tuple[SlackEmulator, Database, AsyncWebClient]) -> None:
    emu, db, client = slack
    gate = asyncio.Event()
    calls = 0

    async def acks_first() -> None:
        nonlocal calls
        calls += 1
        await gate.wait()

    d = Dispatcher(db, client, SystemClock(), _hello, yield_to=acks_first)
    async with db.transaction() as conn:
        await outbox.post(conn, datetime.now(UTC), "C1", "hello")
    round_ = asyncio.create_task(d.deliver_once())
    await asyncio.sleep(0.05)
    assert calls == 1 and not round_.done() and emu.messages("C1") == []
    gate.set()
    assert await round_ == 1
    assert [m.text for m in emu.messages("C1")] == ["hello"]
    # An idle round looks without claiming: nothing to yield for.
    assert await d.deliver_once() == 0 and calls == 1


@contextmanager
def counting_db(db: Database) -> Iterator[Tally]:
    with _counting(db.engine.sync_engine) as tally:
        yield tally


async def test_batch_updates_by_id_use_the_primary_key_on_sqlite(tmp_path: Path) -> None:
    """`UPDATE … WHERE id IN (…) AND state IN (…)` (a reload's batches) and the outbox's
    claims (`… AND status = 'pending'`) must find their rows by primary key. Without
    table statistics SQLite would rather walk the state (status) index, every live
    grant (pending row) for every batch: 6x slower at 10,000 live grants, and worse
    the more there are (`store.schema.not_indexed`). Each such statement a reload and
    its deliveries ran is planned again here, with its parameters."""
    box = await quiet_box(tmp_path)
    try:
        for _ in range(3):
            _, rid = await request(box)
            await approve(box, rid, BOB, CAROL)
        await box.settle()
        seen: list[tuple[str, Any]] = []

        def on_statement(_conn: Any, _cursor: Any, statement: str, params: Any, *_: Any) -> None:
            if statement.startswith("UPDATE") and " IN (" in statement:
                seen.append((statement, params))

        engine = box.bot.db.engine.sync_engine
        event.listen(engine, "before_cursor_execute", on_statement)
        try:
            await box.bot.reload_policy(box.policy_text.replace(
                'permissions = ["payments:read", "payments:write"]',
                'permissions = ["payments:read"]'))
            box.bot.dispatcher.wake()
            await box.settle()
        finally:
            event.remove(engine, "before_cursor_execute", on_statement)
        tables = {s.split()[1] for s, _ in seen}
        assert {"requests", "outbox"} <= tables, seen
        with closing(sqlite3.connect(box.directory / "breakglass.db")) as db:
            for statement, params in seen:
                plan = db.execute("EXPLAIN QUERY PLAN " + statement, params).fetchall()
                assert not any(" INDEX ix_" in str(step) for step in plan), (statement, plan)
    finally:
        await box.stop()
