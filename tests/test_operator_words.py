"""What people type and read, taken at their word: `/breakglass list` and other words
meaning a command that does not exist get the usage, never "there is no scope `list`";
`/breakglass revoke` takes the request ID (any case) or the token's jti exactly as a
relying service logs it; every `breakglass` subcommand's --help says what it does and
which environment variables it reads, and `breakglass --version` answers.

Slash commands go over signed HTTP to the running bot (the Slack emulator records what
each person saw); the CLI runs as `python -m bot` in a subprocess.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
from importlib.metadata import version
from typing import Any

import jwt
import pytest
from helpers import command, timed
from sqlalchemy import func, select

from bot.cli import ENV_HELP, SERVE_ENV, build_parser
from bot.core.commands import NOT_SCOPE_WORDS, USAGE, Help, parse_command
from bot.core.policy import parse_policy
from bot.local.emulator import SentRequest
from bot.local.sandbox import ALICE, BOB, CAROL, INCIDENT, REVIEWS, Sandbox, sandbox_policy
from bot.store.schema import audit_log, requests

JWT_RE = re.compile(r"eyJ[\w-]+\.[\w-]+\.[\w-]+")


def seen(box: Sandbox, resp: SentRequest) -> str:
    ack = str((resp.json or {}).get("text", ""))
    later = [str(r.body.get("text", "")) for r in box.emulator.responses
             if r.url == resp.response_url]
    return "\n".join([ack, *later])


async def counts(box: Sandbox) -> tuple[int, int]:
    async with box.bot.db.read() as conn:
        n_requests = await conn.scalar(select(func.count()).select_from(requests))
        n_audit = await conn.scalar(select(func.count()).select_from(audit_log))
    return int(n_requests or 0), int(n_audit or 0)


# --------------------------------------------------------------------------- near-miss words


@pytest.mark.parametrize("word", sorted(NOT_SCOPE_WORDS))
def test_a_near_miss_word_is_help_not_a_scope(word: str) -> None:
    assert parse_command(word) == Help(unknown=word)
    assert parse_command(f"{word.upper()} 30m INC-1 x") == Help(unknown=word.upper())


@pytest.mark.parametrize("word", ["info", "history", "new", "get", "show", "token", "list"])
def test_a_scope_may_have_a_near_miss_name_and_is_then_that_scope(word: str) -> None:
    """Scope names valid before the near-miss words were added stay valid (`serve` must
    not refuse a policy after an upgrade); the command then means that scope."""
    from bot.core.commands import RequestAccess
    from bot.core.policy_warnings import policy_warnings

    text = sandbox_policy("http://127.0.0.1:9", "s").replace("[scopes.db-admin]",
                                                             f"[scopes.{word}]")
    policy = parse_policy(text)
    assert word in policy.scopes
    warned = [w for w in policy_warnings(policy) if w.startswith(f"scopes.{word}:")]
    assert len(warned) == 1 and "meaning a command" in warned[0], policy_warnings(policy)
    parsed = parse_command(f"{word} 30m INC-1 x", scopes=policy.scopes)
    assert isinstance(parsed, RequestAccess) and parsed.scope == word
    assert parse_command(word, scopes=()) == Help(unknown=word)
    other = "show" if word != "show" else "list"
    assert parse_command(f"{other} 30m INC-1 x", scopes=policy.scopes) == Help(unknown=other)


INFO_SCOPE = """
[scopes.info]
description = "Read the info tables"
audience = "db-api"
permissions = ["db:read"]
requesters = ["oncall"]
approvers = ["sre-leads"]
quorum = 1
max_ttl = "15m"
triggers = ["primary-db-down"]
"""


async def test_check_policy_warns_about_a_near_miss_scope_name_and_serve_takes_it(
        tmp_path: Any, database_url: str) -> None:
    text = real_looking(sandbox_policy("http://127.0.0.1:9", "s" * 20)).replace(
        "[scopes.db-admin]", "[scopes.info]")
    path = tmp_path / "info.toml"
    path.write_text(text)
    code, out, err = await check_policy(path)
    assert code == 0 and out.startswith(f"{path}: OK"), (out, err)
    lines = err.splitlines()
    assert lines[0].startswith("warning: scopes.info: people type 'info' meaning a command")
    # The running bot takes the scope: `/breakglass info …` is a request for it, and
    # `/breakglass list` is still the usage.
    (tmp_path / "box").mkdir()
    async with Sandbox(directory=tmp_path / "box", database_url=database_url,
                       extra_policy=INFO_SCOPE) as box:
        box.probes.status["db"] = 503  # the scope's trigger holds
        resp = await command(box, ALICE, "info 30m INC-77 the database is down")
        shown = seen(box, resp)
        assert "is not a /breakglass command" not in shown, shown
        assert "Checking `info`" in shown, shown
        rid = box.latest_request_id()
        assert rid and box.card(rid) is not None
        resp = await command(box, ALICE, "list")
        assert seen(box, resp).startswith("`list` is not a /breakglass command")


async def test_breakglass_list_answers_with_the_usage(sandbox: Sandbox) -> None:
    before = await counts(sandbox)
    for text in ("list", "LIST", "show my tokens", "cancel R23456789", "?"):
        resp = await command(sandbox, ALICE, text)
        shown = seen(sandbox, resp)
        word = text.split()[0]
        assert shown.startswith(f"`{word}` is not a /breakglass command"), shown
        assert USAGE in shown
        assert "There is no scope" not in shown and "duration" not in shown.split("\n")[0]
    assert await counts(sandbox) == before  # nothing requested, nothing audited
    assert sandbox.emulator.messages(REVIEWS) == []
    assert sandbox.emulator.messages(INCIDENT) == []


# --------------------------------------------------------------------------- revoke by jti


async def issued_token(box: Sandbox, user: str = ALICE) -> tuple[str, str]:
    await command(box, user, "payments-write 30m INC-77 auth down")
    rid = box.latest_request_id()
    for approver in (BOB, CAROL):
        await timed(box.slack.click(approver, "bg_approve", rid, channel_id=REVIEWS))
        await box.settle()
    await timed(box.slack.click(user, "bg_reveal", rid,
                                channel_id=box.emulator.dm_channel_for(user)))
    await box.settle()
    found = JWT_RE.search(json.dumps(box.emulator.views[-1].view))
    assert found, "the reveal modal held no token"
    return rid, found.group(0)


async def state_of(box: Sandbox, rid: str) -> str:
    async with box.bot.db.read() as conn:
        return str(await conn.scalar(select(requests.c.state).where(requests.c.id == rid)))


async def test_revoke_by_the_tokens_jti(sandbox: Sandbox) -> None:
    rid, token = await issued_token(sandbox)
    jti = jwt.decode(token, options={"verify_signature": False})["jti"]
    assert jti != jti.upper()  # base64url: upper-casing it would find nothing
    resp = await command(sandbox, ALICE, f"revoke {jti}")
    assert f"{rid} (`payments-write`) revoked" in seen(sandbox, resp), seen(sandbox, resp)
    assert await state_of(sandbox, rid) == "revoked"
    revoked = [m.text for m in sandbox.emulator.messages(INCIDENT) if "*revoked*" in m.text]
    assert len(revoked) == 1 and rid in revoked[0]


async def test_revoke_by_request_id_in_any_case_and_an_unknown_jti(sandbox: Sandbox) -> None:
    rid, token = await issued_token(sandbox)
    jti = jwt.decode(token, options={"verify_signature": False})["jti"]
    wrong = jti[:-1] + ("A" if jti[-1] != "A" else "B")
    resp = await command(sandbox, ALICE, f"revoke {wrong}")
    shown = seen(sandbox, resp)
    assert f"There is no request or token `{wrong}`" in shown and "jti" in shown
    assert await state_of(sandbox, rid) == "revealed"
    resp = await command(sandbox, BOB, f"revoke {rid.lower()}")  # an approver, lower case
    assert f"{rid} (`payments-write`) revoked" in seen(sandbox, resp)
    assert await state_of(sandbox, rid) == "revoked"


async def test_a_jti_is_refused_to_whoever_may_not_revoke_it(sandbox: Sandbox) -> None:
    rid, token = await issued_token(sandbox)
    jti = jwt.decode(token, options={"verify_signature": False})["jti"]
    resp = await command(sandbox, "U0MALLORY", f"revoke {jti}")
    assert f"Only the requester of {rid}" in seen(sandbox, resp)
    assert await state_of(sandbox, rid) == "revealed"


# --------------------------------------------------------------------------- --help, --version


def leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
           ) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    found = []
    for action in parser._actions:  # noqa: SLF001 - argparse keeps subparsers only here
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            for name, child in action.choices.items():
                found += leaves(child, (*path, name))
            return found
    return [(path, parser)]


# What each command reads: the test's own table, so that the help pages are checked
# against it rather than against themselves.
EXPECTED_ENV: dict[tuple[str, ...], set[str]] = {
    ("serve",): set(SERVE_ENV),
    ("check-policy",): {"BREAKGLASS_POLICY"},
    ("keys", "rotate"): {"BREAKGLASS_DATABASE_URL", "BREAKGLASS_MASTER_KEY", "BREAKGLASS_POLICY"},
    ("keys", "rotate-master"): {"BREAKGLASS_DATABASE_URL", "BREAKGLASS_MASTER_KEY",
                                "BREAKGLASS_OLD_MASTER_KEY", "BREAKGLASS_POLICY"},
    ("audit", "verify"): {"BREAKGLASS_DATABASE_URL", "BREAKGLASS_MASTER_KEY"},
    ("audit", "export"): {"BREAKGLASS_DATABASE_URL", "BREAKGLASS_MASTER_KEY"},
    ("outbox", "retry"): {"BREAKGLASS_DATABASE_URL"},
    ("keys", "new-master"): set(),
    ("demo",): set(),
}


def test_every_subcommand_says_what_it_does_and_what_it_reads() -> None:
    found = leaves(build_parser())
    assert len(found) >= len(EXPECTED_ENV)
    for path, parser in found:
        text = parser.format_help()
        assert parser.description and len(parser.description) > 40, (path, text)
        assert "environment" in text, (path, text)
        listed = {v for v in ENV_HELP if re.search(rf"^\s+{v}\s", text, re.M)}
        if not listed:
            assert "reads no environment variables" in text, (path, text)
        assert EXPECTED_ENV.get(path, listed) <= listed, (path, listed)


def test_every_variable_the_code_reads_is_in_some_help_page() -> None:
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "bot"
    read = set()
    for path in root.rglob("*.py"):
        read |= set(re.findall(r"\"((?:BREAKGLASS|SLACK)_[A-Z_]+)\"", path.read_text("utf-8")))
    pages = "\n".join(parser.format_help() for _, parser in leaves(build_parser()))
    missing = sorted(v for v in read if not re.search(rf"^\s+{v}\s", pages, re.M))
    assert not missing, f"read by bot/ but listed by no --help page: {missing}"
    assert read <= set(ENV_HELP)


async def run(*args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BREAKGLASS_", "SLACK_"))}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_help_pages_and_version_from_the_command_line() -> None:
    results: list[Any] = await asyncio.gather(
        run("--version"), run("serve", "--help"), run("audit", "verify", "--help"),
        run("outbox", "retry", "--help"))
    (code, out, _), serve, verify, retry = results
    assert code == 0 and out.strip() == f"breakglass {version('breakglass')}"
    assert serve[0] == 0 and "SLACK_BOT_TOKEN" in serve[1] and "BREAKGLASS_LOG_LEVEL" in serve[1]
    assert "Run the bot" in serve[1]
    assert verify[0] == 0 and "BREAKGLASS_MASTER_KEY" in verify[1] and "exit 0 when" in verify[1]
    assert retry[0] == 0 and "BREAKGLASS_DATABASE_URL" in retry[1]
    assert "BREAKGLASS_MASTER_KEY" not in retry[1]


# --------------------------------------------------------------------------- check-policy warnings


def real_looking(text: str) -> str:
    """The sandbox policy with IDs and an issuer nobody would take for placeholders."""
    return (text.replace("C0REVIEWS", "C07RV2K1QAB").replace("C0INCIDENT", "C07IN3C9ZXY")
            .replace("https://breakglass.example.internal", "https://breakglass.acme.test"))


async def check_policy(path: os.PathLike[str] | str) -> tuple[int, str, str]:
    return await run("check-policy", str(path))


async def test_check_policy_warns_about_the_examples_placeholders() -> None:
    from pathlib import Path

    example = Path(__file__).resolve().parent.parent / "breakglass.example.toml"
    code, out, err = await check_policy(example)
    assert code == 0 and out.startswith(f"{example}: OK")
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    for path in ("slack.reviewer_channel: 'C0REVIEWS'", "slack.incident_channel: 'C0INCIDENT'",
                 "tokens.issuer:", "groups.oncall.members: U01ONCALL1, U01ONCALL2",
                 "groups.oncall.usergroup: 'S01ONCALL'", "groups.sre-leads.members:",
                 "clients.payments-api.secret_hash:", "clients.ledger-sync.secret_sha256:"):
        assert any(w.startswith(f"warning: {path}") for w in warnings), (path, err)
    assert f"{example}: valid, with {len(warnings)} warning(s)" in err


async def test_check_policy_warns_about_a_channel_written_as_a_name(tmp_path: Any) -> None:
    text = real_looking(sandbox_policy("http://127.0.0.1:9", "s" * 20))
    clean = tmp_path / "clean.toml"
    clean.write_text(text)
    named = tmp_path / "named.toml"
    named.write_text(text.replace('"C07RV2K1QAB"', '"#break-glass-reviews"')
                     .replace('"C07IN3C9ZXY"', '"incident-live"'))
    (code, out, err), (code2, out2, err2) = await asyncio.gather(check_policy(clean),
                                                                 check_policy(named))
    assert (code, err) == (0, ""), err  # nothing to warn about
    assert code2 == 0 and out2.startswith(f"{named}: OK")
    lines = err2.splitlines()
    assert lines[0].startswith("warning: slack.reviewer_channel: '#break-glass-reviews' looks "
                               "like a channel name, not an ID"), err2
    assert "/invite @breakglass" in lines[0]
    assert lines[1].startswith("warning: slack.incident_channel: 'incident-live' looks like")
    assert len(lines) == 3
