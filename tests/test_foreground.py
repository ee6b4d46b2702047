"""Acks first: background work waits while a Slack request is being answered."""

from __future__ import annotations

import asyncio

import pytest

from bot import foreground
from bot.foreground import Foreground


async def test_work_starts_at_once_when_nothing_is_being_answered() -> None:
    gate = Foreground()
    await asyncio.wait_for(gate.wait(), 0.05)


async def test_work_waits_until_the_answer_is_out_and_the_front_is_quiet() -> None:
    gate = Foreground()
    loop = asyncio.get_running_loop()
    with gate.busy():
        waiter = asyncio.create_task(gate.wait())
        await asyncio.sleep(0.05)
        assert not waiter.done(), "work started while a request was being answered"
        ended = loop.time()
    await asyncio.wait_for(waiter, 1)
    assert loop.time() - ended >= foreground.QUIET * 0.9


async def test_waiters_go_one_per_loop_turn_and_stop_when_a_request_arrives() -> None:
    gate = Foreground()
    started: list[int] = []

    async def work(n: int) -> None:
        await gate.wait()
        started.append(n)

    with gate.busy():
        tasks = [asyncio.create_task(work(n)) for n in range(5)]
        await asyncio.sleep(0)
    while not started:
        await asyncio.sleep(0)
    assert started == [0], "more than one piece of work started in one turn of the loop"
    with gate.busy():  # a new request arrives: the rest wait again
        await asyncio.sleep(0.02)
        assert len(started) <= 2
    await asyncio.wait_for(asyncio.gather(*tasks), 1)
    assert started == [0, 1, 2, 3, 4], "work must start in the order it was queued"


async def test_no_work_waits_longer_than_max_defer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(foreground, "MAX_DEFER", 0.1)
    gate = Foreground()
    loop = asyncio.get_running_loop()
    with gate.busy():  # a front that never goes quiet
        t0 = loop.time()
        await asyncio.wait_for(gate.wait(), 1)
        waited = loop.time() - t0
    assert 0.09 <= waited < 0.5


async def test_cancelled_work_leaves_the_queue() -> None:
    gate = Foreground()
    with gate.busy():
        waiter = asyncio.create_task(gate.wait())
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
    assert not gate._waiting
    await asyncio.wait_for(gate.wait(), 0.1)
