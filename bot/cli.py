"""`breakglass` (and `python -m bot`): serve, demo, check-policy, keys, audit, outbox, drills."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import ConfigError, Settings
from .core.kdf import MasterKeyError, check_master_key, new_master_key
from .core.policy import Policy, PolicyError, load_policy

if TYPE_CHECKING:
    from . import audit_slack

log = logging.getLogger("bot")


class Exit(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # These libraries dump request bodies at DEBUG, and a body can hold token text.
    for noisy in ("slack_sdk", "slack_bolt", "bot.slack.sdk", "bot.slack.bolt", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(max(logging.INFO, logging.getLogger().level))


def _policy_or_exit(path: str) -> tuple[Policy, str]:
    try:
        policy = load_policy(path)
    except PolicyError as exc:
        errors = exc.errors
        more = f" (+{len(errors) - 1} more: run `breakglass check-policy {path}`)" if len(errors) > 1 else ""
        raise Exit(2, f"invalid policy {path}: {errors[0]}{more}") from None
    return policy, Path(path).read_text(encoding="utf-8")


def _settings_or_exit() -> Settings:
    try:
        return Settings.from_env()
    except ConfigError as exc:
        raise Exit(2, str(exc)) from None


def cmd_check_policy(args: argparse.Namespace) -> int:
    path = args.file or os.environ.get("BREAKGLASS_POLICY") or "./breakglass.toml"
    try:
        policy = load_policy(path)
    except PolicyError as exc:
        print(f"{path}: {len(exc.errors)} error(s)", file=sys.stderr)
        for error in exc.errors:
            print(f"  {error}", file=sys.stderr)
        return 2
    print(f"{path}: OK")
    print(policy.summary())
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _settings_or_exit()
    policy, text = _policy_or_exit(settings.policy_path)
    setup_logging(args.log_level)
    return asyncio.run(_serve(settings, policy, text))


async def _serve(settings: Settings, policy: Policy, policy_text: str) -> int:
    from .delivery.webhooks import WebhookConfigError
    from .keys import WrongMasterKey
    from .runtime import AppTokenRefused, Runtime

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    rt = Runtime(settings, policy, policy_text=policy_text)
    try:
        await rt.start()
    except (WrongMasterKey, WebhookConfigError) as exc:
        raise Exit(2, str(exc)) from None
    port = await rt.serve_http()
    if settings.socket_mode:
        try:
            await rt.start_socket_mode()
        except AppTokenRefused as exc:
            await rt.stop(drain_seconds=2.0)
            raise Exit(2, str(exc)) from None
        log.info("breakglass in Socket Mode; health and token endpoints on port %s", port)
    else:
        log.info("breakglass listening on %s:%s (POST /slack/events)", settings.host, port)
    await stop.wait()
    log.info("stopping: draining requests and the outbox (up to 10s)")
    await rt.stop(drain_seconds=10.0)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    setup_logging("WARNING")
    return asyncio.run(run_demo(verbose=args.verbose))


def _db_and_master() -> tuple[str, str]:
    from .store.db import DEFAULT_URL

    master = os.environ.get("BREAKGLASS_MASTER_KEY", "")
    try:
        check_master_key(master)
    except MasterKeyError as exc:
        raise Exit(2, str(exc)) from None
    return os.environ.get("BREAKGLASS_DATABASE_URL") or DEFAULT_URL, master


def cmd_keys(args: argparse.Namespace) -> int:
    if args.keys_cmd == "new-master":
        print(new_master_key())
        return 0
    return asyncio.run(_keys(args))


async def _keys(args: argparse.Namespace) -> int:
    from .keys import KeyRing, WrongMasterKey
    from .store.db import Database

    url, master = _db_and_master()
    db = Database(url)
    try:
        await db.create_schema()
        now = datetime.now(UTC)
        if args.keys_cmd == "rotate":
            policy, _ = _policy_or_exit(os.environ.get("BREAKGLASS_POLICY") or "./breakglass.toml")
            ring = await KeyRing.open(db, master, policy.tokens.algorithm, now)
            kid = await ring.rotate(db, now)
            print(f"new signing key {kid} is current; older keys stay in JWKS until their "
                  "tokens expire")
        else:
            old = os.environ.get("BREAKGLASS_OLD_MASTER_KEY", "")
            if not old:
                raise Exit(2, "BREAKGLASS_OLD_MASTER_KEY is not set: set it to the current master "
                           "key and BREAKGLASS_MASTER_KEY to the new one")
            try:
                check_master_key(old)
            except MasterKeyError as exc:
                message = str(exc).replace("BREAKGLASS_MASTER_KEY", "BREAKGLASS_OLD_MASTER_KEY")
                raise Exit(2, message) from None
            n = await KeyRing.rotate_master(db, old, master)
            print(f"re-encrypted {n} signing key(s) under the new master key")
    except WrongMasterKey as exc:
        raise Exit(2, str(exc)) from None
    finally:
        await db.dispose()
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    return asyncio.run(_audit(args))


async def _audit(args: argparse.Namespace) -> int:
    from . import audit
    from .store.db import Database

    url, master = _db_and_master()
    db = Database(url)
    try:
        await db.create_schema()
        from .keys import AUDIT_KEY_NAME, WrongMasterKey, sealed_secret

        try:
            key = await sealed_secret(db, master, AUDIT_KEY_NAME)
        except WrongMasterKey as exc:
            raise Exit(2, str(exc)) from None
        if args.audit_cmd == "verify":
            target = _slack_target() if args.slack else None
            result = await audit.verify(db, key)
            broken = None if result.ok else f"broken at sequence {result.first_bad_seq}: {result.problem}"
            print(f"audit log intact: {result.rows} row(s)" if broken is None else f"audit log {broken}")
            if target is None:
                return 0 if broken is None else 1
            return await _verify_slack(db, master, target, broken, args)
        since = _parse_since(args.since) if args.since else None
        async for row in audit.export(db, since):
            sys.stdout.write(json.dumps(row, separators=(",", ":"), sort_keys=True) + "\n")
        return 0
    finally:
        await db.dispose()


def _slack_target() -> audit_slack.Target:
    """`audit verify --slack`: the incident channel from the policy, Slack from the env."""
    from . import audit_slack
    from .config import DEFAULT_API_URL

    policy, _ = _policy_or_exit(os.environ.get("BREAKGLASS_POLICY") or "./breakglass.toml")
    token = os.environ.get("SLACK_BOT_TOKEN", "").strip()
    if not token:
        raise Exit(2, "SLACK_BOT_TOKEN is not set: --slack reads the incident channel's history "
                   "with the bot token (xoxb-…) of the breakglass app")
    if not token.startswith("xoxb-"):
        raise Exit(2, "SLACK_BOT_TOKEN must be a bot token starting with xoxb-")
    api_url = os.environ.get("SLACK_API_URL", "").strip() or DEFAULT_API_URL
    return audit_slack.Target(token, api_url if api_url.endswith("/") else api_url + "/",
                              policy.slack.incident_channel)


async def _verify_slack(db: Any, master: str, target: audit_slack.Target, broken: str | None,
                        args: argparse.Namespace) -> int:
    from . import audit_slack
    from .keys import WrongMasterKey

    since = _parse_since(args.since) if args.since else None
    try:
        lines, problems = await audit_slack.check(db, master, target, chain_problem=broken,
                                                  oldest=since, alert=not args.no_alert)
    except audit_slack.SlackUnusable as exc:
        raise Exit(2, f"audit verify --slack: {exc}") from None
    except WrongMasterKey as exc:
        raise Exit(2, str(exc)) from None
    for line in problems:
        print(f"audit checkpoint mismatch: {line}")
    for line in lines:
        print(line)
    return 1 if problems or broken else 0


def _parse_since(text: str) -> datetime:
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise Exit(2, f"--since takes an ISO-8601 time like 2026-11-25T12:00:00Z, not {text!r}") from None
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def cmd_outbox(args: argparse.Namespace) -> int:
    return asyncio.run(_outbox(args))


async def _outbox(args: argparse.Namespace) -> int:
    from .outbox import retry_dead
    from .store.db import DEFAULT_URL, Database

    db = Database(os.environ.get("BREAKGLASS_DATABASE_URL") or DEFAULT_URL)
    try:
        await db.create_schema()
        n = await retry_dead(db, datetime.now(UTC))
        print(f"{n} dead-lettered event(s) (Slack messages and webhooks) queued again; "
              "a running bot delivers them")
    finally:
        await db.dispose()
    return 0


def cmd_drills(args: argparse.Namespace) -> int:
    return asyncio.run(_drills(args))


async def _drills(args: argparse.Namespace) -> int:
    from .governance import drills
    from .store.db import DEFAULT_URL, Database

    policy, _ = _policy_or_exit(os.environ.get("BREAKGLASS_POLICY") or "./breakglass.toml")
    db = Database(os.environ.get("BREAKGLASS_DATABASE_URL") or DEFAULT_URL)
    now = datetime.now(UTC)
    try:
        await db.create_schema()
        async with db.read() as conn:
            past = await drills.history(conn, args.limit)
            due = await drills.overdue(conn, policy, now)
    finally:
        await db.dispose()
    if args.json:
        print(json.dumps({"drills": [drills.as_json(req, t) for req, t in past],
                          "every": _period(policy), "due": [
                              {"scope": d.scope, "last": d.last.isoformat() if d.last else None}
                              for d in due]}, indent=2))
        return 0
    print(drills.report(past, due, policy.drills.every, now))
    return 0


def _period(policy: Policy) -> str | None:
    from .core.durations import format_period

    return format_period(policy.drills.every) if policy.drills.every else None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="breakglass", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="run the bot (HTTP mode, or Socket Mode with SLACK_APP_TOKEN)")
    s.add_argument("--log-level", default=os.environ.get("BREAKGLASS_LOG_LEVEL", "INFO"))
    s.set_defaults(func=cmd_serve)
    d = sub.add_parser("demo", help="run the whole flow against a built-in Slack emulator")
    d.add_argument("--verbose", action="store_true", help="also show every Slack API call")
    d.set_defaults(func=cmd_demo)
    c = sub.add_parser("check-policy", help="validate a policy file without starting anything")
    c.add_argument("file", nargs="?")
    c.set_defaults(func=cmd_check_policy)
    k = sub.add_parser("keys", help="signing and master keys")
    ks = k.add_subparsers(dest="keys_cmd", required=True)
    ks.add_parser("new-master", help="print a fresh random master key")
    ks.add_parser("rotate", help="make a new signing key current")
    ks.add_parser("rotate-master", help="re-encrypt signing keys under a new master key")
    k.set_defaults(func=cmd_keys)
    a = sub.add_parser("audit", help="the tamper-evident audit log")
    asub = a.add_subparsers(dest="audit_cmd", required=True)
    v = asub.add_parser("verify", help="check the MAC chain; exit 1 naming the first bad row")
    v.add_argument("--slack", action="store_true",
                   help="also compare the checkpoints the bot posted in the incident channel "
                   "(BREAKGLASS_POLICY, SLACK_BOT_TOKEN, SLACK_API_URL); exit 1 naming a "
                   "checkpoint's sequence number the database lacks or holds another MAC for, "
                   "and post an alert there")
    v.add_argument("--since", help="with --slack: only checkpoints posted at or after this "
                   "ISO-8601 time")
    v.add_argument("--no-alert", action="store_true",
                   help="with --slack: print a failure but post no alert to Slack")
    e = asub.add_parser("export", help="write rows as JSON Lines")
    e.add_argument("--since", help="ISO-8601 time")
    a.set_defaults(func=cmd_audit)
    o = sub.add_parser("outbox", help="Slack events waiting or dead-lettered")
    osub = o.add_subparsers(dest="outbox_cmd", required=True)
    osub.add_parser("retry", help="queue dead-lettered events again")
    o.set_defaults(func=cmd_outbox)
    dr = sub.add_parser("drills", help="past drills, and the scopes not rehearsed within "
                        "[drills] every")
    dr.add_argument("--json", action="store_true", help="print JSON instead of text")
    dr.add_argument("--limit", type=int, default=50, help="most recent drills shown (50)")
    dr.set_defaults(func=cmd_drills)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except Exit as exc:
        print(f"breakglass: {exc.message}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130
