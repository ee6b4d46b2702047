"""The follow-ups of a revocation pass (`reconcile.follow_up`, outbox kind
`revoked_batch`): the DM and card edits and the reviews of grants a pass revoked.

The pass's process runs them right after the pass; what it leaves (it died, or a
follow-up failed) any process's outbox runs once it is due (`JOB_GRACE`). Here the
bot's own loops are stopped after the grants are made, and the follow-ups are run
by hand or by dispatchers built for the test, on the bot's database and Slack:

- run by four deliveries at once, a follow-up happens once (one review, one audit row);
- a follow-up that keeps failing is retried, never dead-lettered, and runs once it can;
- one that committed and then failed (its answer lost) stays done: not run again,
  not marked dead;
- a follow-up that a process of an older version (a rolling upgrade) dead-lettered
  as an unknown kind is queued again by a dispatcher that knows it, and runs once.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import func, select, update
from test_flow import approve, request, reveal

from bot.core.clock import SystemClock
from bot.delivery.outbox import Dispatcher
from bot.governance import reconcile
from bot.local.sandbox import BOB, CAROL, Sandbox
from bot.store.schema import audit_log, outbox, reviews

WHY = "the permissions of payments-write were narrowed"


async def revoked_with_follow_up(box: Sandbox, n: int = 1) -> tuple[list[str], int]:
    """n live grants revoked by one pass batch whose follow-up nobody has run yet (the
    bot's loops stopped first); (their ids, the follow-up's row id), due now."""
    rids = []
    for _ in range(n):
        _, rid = await request(box)
        await approve(box, rid, BOB, CAROL)
        await reveal(box, rid)
        rids.append(rid)
    await box.settle()
    box.bot._stop.set()  # noqa: SLF001 - no loop of the bot's may run the follow-up
    await asyncio.sleep(0.6)
    jobs: list[tuple[int, dict[str, Any]]] = []
    assert await reconcile._revoke_batch(  # noqa: SLF001 - the pass, without its follow-ups
        box.bot.service, rids, dict.fromkeys(rids, WHY), "policy", jobs) == n
    assert len(jobs) == 1
    async with box.bot.db.transaction() as conn:  # as if JOB_GRACE were over
        await conn.execute(update(outbox).where(outbox.c.id == jobs[0][0])
                           .values(next_attempt_at=box.bot.clock.now()))
    return rids, jobs[0][0]


async def job_row(box: Sandbox, row_id: int) -> Any:
    async with box.bot.db.read() as conn:
        return (await conn.execute(select(outbox).where(outbox.c.id == row_id))).one()


async def counts(box: Sandbox, rids: list[str]) -> tuple[int, int]:
    """(reviews, review_opened audit rows) of `rids`."""
    async with box.bot.db.read() as conn:
        opened = await conn.scalar(select(func.count()).select_from(reviews)
                                   .where(reviews.c.request_id.in_(rids)))
        audited = await conn.scalar(select(func.count()).where(
            audit_log.c.event == "review_opened", audit_log.c.request_id.in_(rids)))
    return int(opened or 0), int(audited or 0)


def dispatcher(box: Sandbox, job: Callable[[dict[str, Any], int], Awaitable[None]] | None,
               **opts: Any) -> Dispatcher:
    jobs = {reconcile.JOB: job} if job is not None else {}
    return Dispatcher(box.bot.db, box.bot.client, SystemClock(), box.bot.service.materialise_dm,
                      jobs=jobs, **opts)


async def test_four_deliveries_at_once_run_a_follow_up_once(sandbox: Sandbox) -> None:
    box = sandbox
    rids, row_id = await revoked_with_follow_up(box, 2)
    payload = json.loads((await job_row(box, row_id)).payload)
    await asyncio.gather(*(reconcile.follow_up(box.bot.service, payload, row_id)
                           for _ in range(4)))
    assert await counts(box, rids) == (2, 2)
    assert (await job_row(box, row_id)).status == "sent"


async def test_a_failing_follow_up_is_retried_never_dead_lettered(sandbox: Sandbox) -> None:
    box = sandbox
    rids, row_id = await revoked_with_follow_up(box)
    failures = {"left": 4}

    async def flaky_hook(w: Any, reqs: Any) -> None:
        if failures["left"]:
            failures["left"] -= 1
            raise ConnectionError("the database went away")

    box.bot.service.on_grant_end.insert(0, flaky_hook)
    d = dispatcher(box, functools.partial(reconcile.follow_up, box.bot.service),
                   max_attempts=2, base_delay=0.01, max_delay=0.02)
    for _ in range(200):
        await d.deliver_once()
        row = await job_row(box, row_id)
        assert row.status != "dead", row.last_error
        if row.status == "sent":
            break
        await asyncio.sleep(0.02)
    assert failures["left"] == 0 and (await job_row(box, row_id)).status == "sent"
    assert await counts(box, rids) == (1, 1)


async def test_a_follow_up_that_committed_then_failed_stays_done(sandbox: Sandbox) -> None:
    """Its commit went through, its answer did not (an fsync error after COMMIT, a lost
    reply): the retry finds the row done and does nothing; the row is not marked dead."""
    box = sandbox
    rids, row_id = await revoked_with_follow_up(box)

    async def committed_then_failed(payload: dict[str, Any], rid: int) -> None:
        await reconcile.follow_up(box.bot.service, payload, rid)
        raise OSError("fsync failed")

    d = dispatcher(box, committed_then_failed, max_attempts=1, base_delay=0.01, max_delay=0.02)
    for _ in range(3):
        await d.deliver_once()
        await asyncio.sleep(0.03)
    row = await job_row(box, row_id)
    assert (row.status, row.last_error) == ("sent", None)
    assert await counts(box, rids) == (1, 1)


async def test_a_follow_up_an_older_version_dead_lettered_runs_again(sandbox: Sandbox) -> None:
    box = sandbox
    rids, row_id = await revoked_with_follow_up(box)
    old = dispatcher(box, None, max_attempts=1)  # an older version: no follow-ups
    await old.deliver_once()
    row = await job_row(box, row_id)
    assert row.status == "dead" and "unknown outbox kind" in row.last_error
    assert await counts(box, rids) == (0, 0)

    new = dispatcher(box, functools.partial(reconcile.follow_up, box.bot.service),
                     poll_interval=0.02)
    stop = asyncio.Event()
    running = asyncio.create_task(new.run(stop))
    try:
        for _ in range(200):
            if (await job_row(box, row_id)).status == "sent":
                break
            await asyncio.sleep(0.02)
    finally:
        stop.set()
        await running
    assert (await job_row(box, row_id)).status == "sent"
    assert await counts(box, rids) == (1, 1)
