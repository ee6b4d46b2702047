"""`audit verify` against a tampered row of every event type the bot writes.

One real flow (the bot over HTTP, the Slack emulator, a moving clock, a policy reload,
the `keys` commands) writes a row of every event type the code can write: started,
refused, requested, approved, denied, issued, reveal_failed, revealed, delivered, used,
revoked, review_opened, reviewed, review_overdue, cancelled, escalated, expiry_warned,
expired, alert, drill, drills_due,
checkpoint, policy_reloaded, policy_refused, key_rotated, master_key_rotated. Then, for
each event type, a copy of the SQLite file has one row of that type edited (its details,
its actor, or its request ID) by someone who dropped the append-only triggers, and
`audit verify` must exit 1 naming exactly that row.

The list of event types is not taken on trust: the source under bot/ is scanned for
the event names it writes, and each must be one the flow produced (or be listed in
NOT_WRITTEN_YET with why), so a new event type without a tampering test fails here.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import aiohttp
import pytest

from bot.core.clock import OffsetClock
from bot.core.events import WEBHOOK_EVENTS
from bot.core.kdf import new_master_key
from bot.delivery.audit_publish import publish_head
from bot.local.sandbox import ALICE, BOB, CAROL, INCIDENT, MALLORY, REVIEWS, Sandbox

ROOT = Path(__file__).resolve().parent.parent
JWT_RE = re.compile(r"eyJ[\w-]+\.[\w-]+\.[\w-]+")
TRIGGERS = ("audit_log_no_update", "audit_log_no_delete", "audit_log_next_seq")

# Event names some code may write in future work but nothing under bot/ writes today.
NOT_WRITTEN_YET = {
    "head_published": "the name versions before signed checkpoints wrote; only read now",
}


@dataclass(frozen=True)
class Flow:
    db_path: Path
    master: str


async def _settle(box: Sandbox) -> None:
    await box.settle()


async def _request(box: Sandbox, user: str, text: str) -> str:
    await box.slack.command(user, text)
    await _settle(box)
    return box.latest_request_id()


async def _click(box: Sandbox, user: str, action: str, rid: str) -> None:
    channel = REVIEWS if action in ("bg_approve", "bg_deny") else box.emulator.dm_channel_for(user)
    await box.slack.click(user, action, rid, channel_id=channel)
    await _settle(box)


async def _sweep_after(box: Sandbox, clock: OffsetClock, delta: timedelta) -> None:
    clock.advance(delta)
    await box.bot.service.sweep()
    await _settle(box)


async def _real_flow(directory: Path) -> Flow:
    clock = OffsetClock()
    box = Sandbox(directory=directory, clock=clock, escalate="2m", rate_limit=20,
                  extra_policy='\n[alerts]\nmax_requests_per_day = 2\n\n[drills]\nevery = "30d"\n')
    await box.start()
    emu = box.emulator
    try:
        await box.slack.command(MALLORY, "payments-write 30m INC-1 let me in")  # refused
        await _settle(box)
        a = await _request(box, ALICE, "payments-write 30m INC-4521 auth down")
        await _click(box, BOB, "bg_approve", a)
        await _click(box, CAROL, "bg_approve", a)  # issued
        emu.fail("views.open", status=500)
        await _click(box, ALICE, "bg_reveal", a)  # reveal_failed
        await _click(box, ALICE, "bg_reveal", a)  # revealed
        token = JWT_RE.search(json.dumps(emu.views[-1].view))
        assert token is not None
        basic = base64.b64encode(f"payments-api:{box.client_secret}".encode()).decode()
        async with aiohttp.ClientSession() as http, http.post(
                f"{box.url}/oauth2/introspect", data={"token": token.group(0)},
                headers={"Authorization": f"Basic {basic}"}) as resp:
            assert (await resp.json())["active"] is True  # used
        b = await _request(box, ALICE, "payments-write 30m INC-4522 second")  # alert: 3rd today
        await _click(box, BOB, "bg_deny", b)  # denied
        c = await _request(box, ALICE, "payments-write 30m INC-4523 third")
        await box.slack.command(ALICE, f"revoke {c}")  # cancelled
        await box.slack.command(BOB, f"revoke {a}")  # revoked, review_opened
        await _settle(box)
        await box.slack.command(CAROL, f"review {a} refunds replayed; no misuse")  # reviewed
        await _settle(box)
        d = await _request(box, ALICE, "payments-write 30m INC-4524 nobody answers")
        await _sweep_after(box, clock, timedelta(minutes=3))  # escalated
        e = await _request(box, ALICE, "payments-write 30m INC-4525 to expire")
        await _click(box, BOB, "bg_approve", e)
        await _click(box, CAROL, "bg_approve", e)
        await _sweep_after(box, clock, timedelta(minutes=26))  # expiry_warned (5m before)
        await _sweep_after(box, clock, timedelta(minutes=5))  # expired: d's request, e's token
        await box.slack.command(ALICE, "drill payments-write quarterly drill")
        await _settle(box)
        drill = box.latest_request_id()
        await _click(box, BOB, "bg_approve", drill)
        await _click(box, CAROL, "bg_approve", drill)
        await _click(box, ALICE, "bg_reveal", drill)  # drill
        reloaded = await box.bot.reload_policy(
            box.policy_text.replace('delivery = "reveal"', 'delivery = "message"'), force=True)
        assert reloaded.outcome == "reloaded", reloaded  # policy_reloaded
        refused = await box.bot.reload_policy("[slack]\nreviewer_channel = 1\n", force=True)
        assert refused.outcome == "refused"  # policy_refused
        f = await _request(box, BOB, "payments-write 30m INC-4526 by message")
        await _click(box, CAROL, "bg_approve", f)
        await _click(box, "U0DAVE", "bg_approve", f)  # delivered
        clock.advance(timedelta(hours=25))
        await box.bot.reviews.sweep()  # review_overdue (e's token expired, never reviewed)
        await _settle(box)
        await publish_head(box.bot.db, box.bot.audit_key, clock, INCIDENT,
                           box.bot.keyring.current, force=True)  # checkpoint
        await _settle(box)
        assert d and e
    finally:
        await box.stop_bot()
        await box.probes.stop()
        await emu.stop()
    env = _env(directory / "breakglass.db", box.master_key)
    rotated = _cli(["keys", "rotate"], {**env, "BREAKGLASS_POLICY": str(directory / "breakglass.toml")})
    assert rotated.returncode == 0, rotated.stderr  # key_rotated
    new_master = new_master_key()
    moved = _cli(["keys", "rotate-master"], {**env, "BREAKGLASS_OLD_MASTER_KEY": box.master_key,
                                             "BREAKGLASS_MASTER_KEY": new_master})
    assert moved.returncode == 0, moved.stderr  # master_key_rotated
    with contextlib.closing(sqlite3.connect(directory / "breakglass.db")) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return Flow(directory / "breakglass.db", new_master)


def _env(path: Path, master: str) -> dict[str, str]:
    return {"BREAKGLASS_DATABASE_URL": f"sqlite+aiosqlite:///{path}", "BREAKGLASS_MASTER_KEY": master}


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("BREAKGLASS_", "SLACK_"))}
    return subprocess.run([sys.executable, "-m", "bot", *args], env={**clean, **env},
                          capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def flow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flow]:
    yield asyncio.run(_real_flow(tmp_path_factory.mktemp("every-event")))


def rows_of(path: Path) -> list[tuple[int, str, str | None]]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return list(db.execute("SELECT seq, event, request_id FROM audit_log ORDER BY seq"))


# --------------------------------------------------------------------------- which events


_WRITES = (
    re.compile(r"\bevent\s*=\s*\"([a-z_]+)\""),                        # event="x"
    re.compile(r"_audit\(\s*w\s*,[^,]+,\s*\"([a-z_]+)\""),               # _audit(w, actor, "x"
    re.compile(r"\"([a-z_]+)\"\s+if\s+decision\s*==\s*\"approve\"\s+else\s+\"([a-z_]+)\""),
    re.compile(r"\brecord\(\s*conn\s*,\s*now\s*,\s*\"([a-z_]+)\""),     # cli: record(conn, now, "x"
    re.compile(r"\brecord\(\s*w\s*,[^,]+,\s*\"([a-z_]+)\""),              # service.record(w, actor, "x"
    re.compile(r"^(?:EVENT|ALERT)\s*=\s*\"([a-z_]+)\"", re.M),          # EVENT = "checkpoint"
)


def written_by_the_code() -> set[str]:
    names: set[str] = set()
    for path in (ROOT / "bot").rglob("*.py"):
        if path.name == "emulator.py":
            continue
        text = path.read_text(encoding="utf-8")
        for pattern in _WRITES:
            for match in pattern.finditer(text):
                names.update(g for g in match.groups() if g)
    return names


def test_the_scan_finds_the_events_it_should() -> None:
    found = written_by_the_code()
    assert {"requested", "approved", "denied", "issued", "used", "checkpoint", "alert",
            "started", "key_rotated", "review_opened", "reviewed", "review_overdue"} <= found, found


def test_the_flow_wrote_every_event_type_the_code_writes(flow: Flow) -> None:
    written = {event for _, event, _ in rows_of(flow.db_path)}
    expected = (written_by_the_code() | set(WEBHOOK_EVENTS)) - set(NOT_WRITTEN_YET)
    missing = expected - written
    assert not missing, f"event types the code writes but the flow did not: {sorted(missing)}"
    for name in NOT_WRITTEN_YET:
        assert name not in written_by_the_code() - {"head_published"}, (
            f"{name} is written now: drive it in the flow and drop it from NOT_WRITTEN_YET")


# --------------------------------------------------------------------------- tampering


def tamper(path: Path, statement: str) -> None:
    with contextlib.closing(sqlite3.connect(path)) as db:
        for name in TRIGGERS:
            db.execute(f"DROP TRIGGER IF EXISTS {name}")
        db.execute(statement)
        db.commit()


def verify(path: Path, master: str, monkeypatch: pytest.MonkeyPatch,
           capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    from bot.cli import main

    for key, value in _env(path, master).items():
        monkeypatch.setenv(key, value)
    capsys.readouterr()
    code = main(["audit", "verify"])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out


EDITS = (
    "UPDATE audit_log SET details = replace(details, '}', ',\"x\":1}') WHERE seq = {seq}",
    "UPDATE audit_log SET actor = actor || 'X' WHERE seq = {seq}",
    "UPDATE audit_log SET request_id = CASE WHEN request_id IS NULL THEN 'R2222222' ELSE NULL "
    "END WHERE seq = {seq}",
)


def test_verify_catches_an_edit_of_every_event_type(
        flow: Flow, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    code, out = verify(flow.db_path, flow.master, monkeypatch, capsys)
    assert code == 0, out  # the untouched log is intact
    first_of: dict[str, int] = {}
    last_of: dict[str, int] = {}
    for seq, event, _ in rows_of(flow.db_path):
        first_of.setdefault(event, seq)
        last_of[event] = seq
    checked = []
    for i, (event, seq) in enumerate(sorted(first_of.items())):
        for target in sorted({seq, last_of[event]}):
            edit = EDITS[(i + target) % len(EDITS)]
            copy = tmp_path / f"{event}-{target}.db"
            shutil.copyfile(flow.db_path, copy)
            tamper(copy, edit.replace("{seq}", str(target)))
            code, out = verify(copy, flow.master, monkeypatch, capsys)
            assert code == 1, (event, target, out)
            assert out.startswith(f"audit log broken at sequence {target}:"), (event, out)
            checked.append(event)
    assert set(checked) == set(first_of) and len(first_of) >= 20
