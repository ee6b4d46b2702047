"""`breakglass` (and `python -m bot`): serve, demo, check-policy, keys, audit, outbox, drills, db.

Every subcommand's --help says what it does and which environment variables it reads."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import sys
import textwrap
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import SQLAlchemyError

from . import hangup, preflight
from .config import ConfigError, Settings
from .core.kdf import MasterKeyError, check_master_key, new_master_key
from .core.policy import Policy, PolicyError, load_policy
from .core.policy_warnings import policy_warnings
from .operator import operator_actor

if TYPE_CHECKING:
    from .delivery import audit_slack

log = logging.getLogger("bot")


class Exit(Exception):
    """Stop with `code`; each line of `message` is printed as one `breakglass: …` line."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def setup_logging(level: str | int = "INFO") -> None:
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # These libraries dump request bodies at DEBUG, and a body can hold token text.
    for noisy in ("slack_sdk", "slack_bolt", "bot.slack.sdk", "bot.slack.bolt", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(max(logging.INFO, logging.getLogger().level))
    logging.getLogger("alembic").setLevel(logging.WARNING)  # a line per migration step at INFO


def _policy_or_exit(path: str) -> tuple[Policy, str]:
    try:
        policy = load_policy(path)
    except PolicyError as exc:
        errors = exc.errors
        more = f" (+{len(errors) - 1} more: run `breakglass check-policy {path}`)" if len(errors) > 1 else ""
        raise Exit(2, f"invalid policy {path}: {errors[0]}{more}") from None
    return policy, Path(path).read_text(encoding="utf-8")


def _policy_problem(path: str) -> str | None:
    try:
        _policy_or_exit(path)
    except Exit as exc:
        return exc.message
    except OSError as exc:
        return f"BREAKGLASS_POLICY: cannot read {path} ({exc.strerror})"
    return None


def _log_level(args: argparse.Namespace) -> int:
    if args.log_level is not None:
        return preflight.log_level(args.log_level, "--log-level")
    return preflight.log_level(os.environ.get("BREAKGLASS_LOG_LEVEL") or "INFO",
                               "BREAKGLASS_LOG_LEVEL")


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
    warnings = policy_warnings(policy)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if warnings:
        print(f"{path}: valid, with {len(warnings)} warning(s): the bot starts with it, but "
              "check each", file=sys.stderr)
    return 0


def cmd_hash_secret(args: argparse.Namespace) -> int:
    from .core import client_secrets

    ln = client_secrets.DEFAULT_LN if args.ln is None else args.ln
    if not client_secrets.MIN_LN <= ln <= client_secrets.MAX_LN:
        raise Exit(2, f"--ln must be from {client_secrets.MIN_LN} to {client_secrets.MAX_LN}, "
                   f"not {ln}")
    if sys.stdin.isatty():
        import getpass

        line = getpass.getpass("client secret: ")
    else:
        line = sys.stdin.readline()
    secret = line[:-1] if line.endswith("\n") else line
    if secret.endswith("\r"):
        secret = secret[:-1]
    if not secret:
        raise Exit(2, "no client secret on standard input: "
                   "printf %s \"$CLIENT_SECRET\" | breakglass hash-secret")
    if len(secret) < 16:
        print("warning: the secret is shorter than 16 characters; use a random one, e.g. "
              "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'", file=sys.stderr)
    print(f'secret_hash = "{client_secrets.hash_secret(secret, ln=ln)}"')
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Every problem with the environment, the database path and the policy at once,
    each on its own line, before anything starts."""
    hangup.hold()  # a SIGHUP while starting is held for the reloader, not fatal
    problems: list[str] = []
    settings: Settings | None = None
    level = logging.INFO
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        problems += exc.problems
    try:
        level = _log_level(args)
    except ValueError as exc:
        problems.append(str(exc))
    if settings is not None and (bad_db := preflight.database_to_create(settings.database_url)):
        problems.append(bad_db)
    policy_path = settings.policy_path if settings else (
        os.environ.get("BREAKGLASS_POLICY", "").strip() or "./breakglass.toml")
    if (bad_policy := _policy_problem(policy_path)) is not None:
        problems.append(bad_policy)
    if problems or settings is None:
        raise Exit(2, "\n".join(problems))
    policy, text = _policy_or_exit(policy_path)
    setup_logging(level)
    for warning in policy_warnings(policy):
        log.warning("policy %s: %s", policy_path, warning)
    return asyncio.run(_serve(settings, policy, text))


async def _serve(settings: Settings, policy: Policy, policy_text: str) -> int:
    from .delivery.webhooks import WebhookConfigError
    from .keys import WrongMasterKey
    from .runtime import AppTokenRefused, BotTokenRefused, MetricsAddrUnusable, Runtime

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    rt = Runtime(settings, policy, policy_text=policy_text)
    try:
        await rt.start()
    except (WrongMasterKey, WebhookConfigError, BotTokenRefused) as exc:
        await _close_db(rt)
        raise Exit(2, str(exc)) from None
    except (OSError, SQLAlchemyError) as exc:
        await _close_db(rt)
        raise Exit(2, preflight.open_failed(settings.database_url, exc)) from None
    with contextlib.suppress(NotImplementedError, AttributeError):
        # SIGHUP: reload the policy file and the signing keys (contract §7.3, §7.7).
        loop.add_signal_handler(signal.SIGHUP, rt.on_sighup)
    if hangup.take():  # one or more arrived while starting: reload once, now
        rt.on_sighup()
    # What start made (modules, the policy, the app) lives as long as the process: out
    # of the cyclic GC's sight, a full collection in the middle of a large revocation
    # pass no longer holds the event loop for ~100 ms (docs/performance.md).
    gc.collect()
    gc.freeze()
    try:
        port = await rt.serve_http()
    except MetricsAddrUnusable as exc:
        await rt.stop(drain_seconds=1.0)
        raise Exit(2, str(exc)) from None
    except OSError as exc:
        await rt.stop(drain_seconds=1.0)
        raise Exit(2, preflight.bind_failed(exc, settings.host, settings.port)) from None
    if settings.socket_mode:
        try:
            await rt.start_socket_mode()
        except AppTokenRefused as exc:
            await rt.stop(drain_seconds=2.0)
            raise Exit(2, str(exc)) from None
        log.info("breakglass in Socket Mode; health and token endpoints on port %s", port)
    else:
        log.info("breakglass listening on %s:%s (POST /slack/events)", settings.host, port)
    if settings.metrics_addr:
        log.info("metrics on %s (GET /metrics)", settings.metrics_addr)
    await stop.wait()
    log.info("stopping: draining requests and the outbox (up to 10s)")
    await rt.stop(drain_seconds=10.0)
    return 0


async def _close_db(rt: Any) -> None:
    db = getattr(rt, "db", None)
    if db is not None:
        with contextlib.suppress(Exception):
            await db.dispose()


async def _existing_db(url: str) -> Any:
    """The database at `url`, opened only when it is there and holds breakglass's tables:
    a command that reads a database never creates one (contract §6)."""
    from .store.db import Database

    problem = preflight.existing_database(url)
    if problem is not None:
        raise Exit(2, problem)
    db = Database(url)
    try:
        present = await preflight.has_schema(db)
    except (OSError, SQLAlchemyError) as exc:
        await db.dispose()
        raise Exit(2, preflight.open_failed(url, exc)) from None
    if not present:
        await db.dispose()
        raise Exit(2, preflight.missing_schema(url))
    return db


def cmd_demo(args: argparse.Namespace) -> int:
    from .local.demo import run_demo

    setup_logging("WARNING")
    return asyncio.run(run_demo(verbose=args.verbose))


def _db_and_master() -> tuple[str, str]:
    master = os.environ.get("BREAKGLASS_MASTER_KEY", "")
    try:
        check_master_key(master)
    except MasterKeyError as exc:
        raise Exit(2, str(exc)) from None
    return _db_url(), master


def _db_url() -> str:
    from .store.db import DEFAULT_URL

    return os.environ.get("BREAKGLASS_DATABASE_URL", "").strip() or DEFAULT_URL


def cmd_keys(args: argparse.Namespace) -> int:
    if args.keys_cmd == "new-master":
        print(new_master_key())
        return 0
    return asyncio.run(_keys(args))


async def _keys(args: argparse.Namespace) -> int:
    from . import audit
    from .delivery.webhooks import Webhooks
    from .governance.alerts import KEY_ROTATED, MASTER_KEY_ROTATED, raise_alert_in
    from .keys import AUDIT_KEY_NAME, KeyRing, WrongMasterKey, sealed_secret

    url, master = _db_and_master()
    policy_path = os.environ.get("BREAKGLASS_POLICY") or "./breakglass.toml"
    old = ""
    if args.keys_cmd == "rotate-master":
        old = os.environ.get("BREAKGLASS_OLD_MASTER_KEY", "")
        if not old:
            raise Exit(2, "BREAKGLASS_OLD_MASTER_KEY is not set: set it to the current master "
                       "key and BREAKGLASS_MASTER_KEY to the new one")
        try:
            check_master_key(old)
        except MasterKeyError as exc:
            message = str(exc).replace("BREAKGLASS_MASTER_KEY", "BREAKGLASS_OLD_MASTER_KEY")
            raise Exit(2, message) from None
    no_alert = ""
    if args.keys_cmd == "rotate":
        policy: Policy | None = _policy_or_exit(policy_path)[0]
    else:
        # The alert needs the incident channel; an emergency master rotation does not
        # wait for a readable policy (it is audited either way).
        try:
            policy = load_policy(policy_path)
        except PolicyError as exc:
            policy = None
            # Said once the database is known to be there (else nothing is rotated at all).
            no_alert = (f"breakglass: warning: no alert posted ({exc.errors[0]}); the rotation "
                        "is audited")
    actor = operator_actor()
    audit_key = b""

    async def record(conn: Any, now: datetime, event: str, details: dict[str, Any],
                     kind: str, text: str) -> None:
        """The operation's audit row and its alert (§7.5: an `alert` audit row, which the
        policy's webhooks receive, and the incident post), in the rotation's transaction."""
        await audit.append(conn, audit_key, at=now, actor=actor, event=event, details=details)
        if policy is not None:
            await raise_alert_in(conn, audit_key, now, policy.slack.incident_channel, kind, text,
                                 {**details, "by": actor})

    # Rotating the keys of no database is a mistake (the wrong directory, a mistyped URL):
    # a new database would take the rotation while every serve signs on with the old key.
    db = await _existing_db(url)
    if no_alert:
        print(no_alert, file=sys.stderr)
    try:
        await db.create_schema()
        if policy is not None and policy.webhooks:
            # Queued with the audit rows; the serving bot signs and sends them (no secret here).
            Webhooks.enqueue_only(policy.webhooks).attach(db)
        now = datetime.now(UTC)
        if args.keys_cmd == "rotate":
            assert policy is not None
            alg = policy.tokens.algorithm
            switched_from: list[str] = []

            async def note_switch(conn: Any, kid: str, was: str) -> None:
                switched_from.append(was)  # the policy's algorithm had no key yet

            ring = await KeyRing.open(db, master, alg, now, on_switch=note_switch)
            audit_key = await sealed_secret(db, master, AUDIT_KEY_NAME)
            # The key that signed until now: another algorithm's, if opening the ring had to
            # make this algorithm's first key (which the rotation retires with the rest).
            previous = switched_from[0] if switched_from else ring.current.kid

            async def record_rotation(conn: Any, kid: str) -> None:
                await record(conn, now, "key_rotated",
                             {"kid": kid, "previous": previous, "alg": alg}, KEY_ROTATED,
                             f"signing key rotated by `{actor}`: `{kid}` signs new tokens; "
                             f"tokens signed by `{previous}` keep verifying until they expire.")

            kid = await ring.rotate(db, now, record=record_rotation)
            print(f"new signing key {kid} is current; older keys stay in JWKS until their "
                  "tokens expire; running `breakglass serve` processes pick it up within 10 s")
        else:
            audit_key = await sealed_secret(db, old, AUDIT_KEY_NAME)

            async def record_master(conn: Any, count: str) -> None:
                await record(conn, now, "master_key_rotated", {"keys": int(count)},
                             MASTER_KEY_ROTATED,
                             f"master key rotated by `{actor}`: {count} signing key(s) "
                             "re-encrypted. Running `breakglass serve` processes keep working "
                             "with the keys they hold; restart each with the new "
                             "BREAKGLASS_MASTER_KEY.")

            n = await KeyRing.rotate_master(db, old, master, record=record_master)
            print(f"re-encrypted {n} signing key(s) under the new master key; restart each "
                  "running `breakglass serve` with the new BREAKGLASS_MASTER_KEY (they keep "
                  "working until then, see docs/operations.md)")
    except WrongMasterKey as exc:
        raise Exit(2, str(exc)) from None
    finally:
        await db.dispose()
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    return asyncio.run(_audit(args))


async def _audit(args: argparse.Namespace) -> int:
    from . import audit

    url, master = _db_and_master()
    since = _parse_since(args.since) if getattr(args, "since", None) else None
    db = await _existing_db(url)
    try:
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
            return await _verify_slack(db, master, key, target, broken, args)
        async for row in audit.export(db, since):
            sys.stdout.write(json.dumps(row, separators=(",", ":"), sort_keys=True) + "\n")
        return 0
    finally:
        await db.dispose()


def _slack_target() -> audit_slack.Target:
    """`audit verify --slack`: the incident channel from the policy, Slack from the env."""
    from .config import DEFAULT_API_URL
    from .delivery import audit_slack

    policy, _ = _policy_or_exit(os.environ.get("BREAKGLASS_POLICY") or "./breakglass.toml")
    token = os.environ.get("SLACK_BOT_TOKEN", "").strip()
    if not token:
        raise Exit(2, "SLACK_BOT_TOKEN is not set: --slack reads the incident channel's history "
                   "with the bot token (xoxb-…) of the breakglass app")
    if not token.startswith("xoxb-"):
        raise Exit(2, "SLACK_BOT_TOKEN must be a bot token starting with xoxb-")
    api_url = os.environ.get("SLACK_API_URL", "").strip() or DEFAULT_API_URL
    return audit_slack.Target(token, api_url if api_url.endswith("/") else api_url + "/",
                              policy.slack.incident_channel, tuple(policy.webhooks), os.environ)


async def _verify_slack(db: Any, master: str, key: bytes, target: audit_slack.Target,
                        broken: str | None, args: argparse.Namespace) -> int:
    from .delivery import audit_slack
    from .keys import WrongMasterKey

    since = _parse_since(args.since) if args.since else None
    try:
        lines, problems = await audit_slack.check(db, master, key, target, chain_problem=broken,
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
    from .delivery.outbox import retry_dead

    db = await _existing_db(_db_url())
    try:
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

    db = await _existing_db(_db_url())
    now = datetime.now(UTC)
    try:
        policy, _ = _policy_or_exit(os.environ.get("BREAKGLASS_POLICY") or "./breakglass.toml")
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
def cmd_reviews(args: argparse.Namespace) -> int:
    return asyncio.run(_reviews(args))


async def _reviews(args: argparse.Namespace) -> int:
    from .core.reviews import is_overdue
    from .store import reviews as review_store

    db = await _existing_db(_db_url())
    try:
        now = datetime.now(UTC)
        async with db.read() as conn:
            found = await review_store.listed(conn, open_only=True, overdue_only=args.overdue,
                                              now=now)
    finally:
        await db.dispose()
    late = [r for r in found if is_overdue(r, now)]
    if args.json:
        for r in found:
            sys.stdout.write(json.dumps({
                "request_id": r.request_id, "requester": r.requester, "scope": r.scope,
                "ended_at": r.ended_at.isoformat(), "due_at": r.due_at.isoformat(),
                "overdue": is_overdue(r, now)}, separators=(",", ":")) + "\n")
    elif not found:
        print("no overdue reviews" if args.overdue else "no reviews waiting for sign-off")
    else:
        for r in found:
            state = "OVERDUE" if is_overdue(r, now) else "open"
            print(f"{r.request_id}  {state:7}  {r.scope}  requester {r.requester}  ended "
                  f"{r.ended_at:%Y-%m-%d %H:%M} UTC  due {r.due_at:%Y-%m-%d %H:%M} UTC")
        print(f"{len(found)} review(s) waiting for sign-off, {len(late)} overdue")
    return 1 if late else 0


def cmd_tokens(args: argparse.Namespace) -> int:
    return asyncio.run(_tokens(args))


async def _tokens(args: argparse.Namespace) -> int:
    if args.tokens_cmd == "revoke":
        return await _tokens_revoke(args)
    from .governance.inventory import LiveGrant
    from .store import requests as requests_store
    from .store import reviews as review_store

    db = await _existing_db(_db_url())
    try:
        now = datetime.now(UTC)
        async with db.read() as conn:
            found = await requests_store.load_many(conn, review_store.live_grants(),
                                                   limit=100_000)
            uses = await review_store.use_counts(conn, [g.id for g in found])
    finally:
        await db.dispose()
    grants = sorted((LiveGrant(g, uses.get(g.id, 0)) for g in found
                     if g.token_expires_at is not None and g.token_expires_at > now),
                    key=lambda g: (g.request.token_expires_at, g.request.id))
    if args.json:
        for g in grants:
            sys.stdout.write(json.dumps(g.as_dict(now), separators=(",", ":")) + "\n")
        return 0
    if not grants:
        print("no live grants")
        return 0
    from .core.durations import format_duration

    for g in grants:
        req = g.request
        assert req.token_expires_at is not None
        left = timedelta(seconds=max(0, int((req.token_expires_at - now).total_seconds())))
        print(f"{req.id}  {req.scope}  requester {req.requester}  incident "
              f"{req.incident or '-'}  expires in {format_duration(left)}"
              f"  approvers {','.join(req.approvals) or '-'}  uses {g.uses}")
    print(f"{len(grants)} live grant(s)")
    return 0


async def _tokens_revoke(args: argparse.Namespace) -> int:
    reason = " ".join((args.reason or "").split())
    if not reason:
        raise Exit(2, "--reason is required: say why these grants are revoked (e.g. --reason "
                   "'lost laptop'); it goes into the audit log and the incident channel. "
                   "Nothing was revoked.")
    from .audit import looks_like_token

    if looks_like_token(reason):
        # The audit log refuses token-shaped text: refused here, before anything changes.
        raise Exit(2, "--reason looks like it contains a token (a JWT or a Slack token): "
                   "remove the token text and run the command again (it goes into the audit "
                   "log and the incident channel). Nothing was revoked.")
    chosen = [bool(args.ids), args.user is not None or args.scope is not None, args.all]
    if sum(chosen) != 1:
        raise Exit(2, "name what to revoke: IDs, or --user U and/or --scope S, or --all "
                   "(one of these). Nothing was revoked.")
    settings_url, master = _db_and_master()
    policy, _ = _policy_or_exit(os.environ.get("BREAKGLASS_POLICY") or "./breakglass.toml")
    from .core.clock import SystemClock
    from .directory import Directory
    from .governance.inventory import Inventory
    from .keys import AUDIT_KEY_NAME, KeyRing, WrongMasterKey, sealed_secret
    from .service import Service
    from .triggers import Prober

    db = await _existing_db(settings_url)
    prober = Prober()
    try:
        now = datetime.now(UTC)
        try:
            keyring = await KeyRing.open(db, master, policy.tokens.algorithm, now)
            audit_key = await sealed_secret(db, master, AUDIT_KEY_NAME)
        except WrongMasterKey as exc:
            raise Exit(2, str(exc)) from None
        from .delivery.webhooks import Webhooks

        # Operator revocations reach the webhooks like any other (the bot signs and sends).
        Webhooks.enqueue_only(policy.webhooks).attach(db)
        service = Service(db, policy, keyring, Directory(policy, None), prober, SystemClock(),
                          audit_key)
        from .governance.reviews import Reviews

        Reviews(service)  # a revocation opens the grant's review, as in `serve`
        inventory = Inventory(service)
        try:
            grants = await inventory.select(list(args.ids), user=args.user, scope=args.scope,
                                            every=args.all)
        except ValueError as exc:
            raise Exit(2, f"{exc}. Nothing was revoked; `breakglass tokens list` shows the "
                       "live grants.") from None
        if not grants:
            print("no live grant matched; nothing was revoked")
            return 0
        actor = operator_actor()
        done = await inventory.revoke(grants, actor, reason)
        for req in done:
            what = "revoked" if req.issued_at is not None else "cancelled"
            print(f"{what} {req.id}  {req.scope}  requester {req.requester}")
        print(f"{len(done)} grant(s) revoked by {actor}; a running bot announces them and "
              "edits the DMs")
        return 0
    finally:
        await prober.close()
        await db.dispose()


# What each command reads from the environment: shown in its --help (tests/test_cli_help.py).
ENV_HELP = {
    "SLACK_BOT_TOKEN": "bot token (xoxb-…); required",
    "SLACK_SIGNING_SECRET": "request signing secret; required in HTTP mode",
    "SLACK_APP_TOKEN": "app-level token (xapp-…); set: Socket Mode",
    "SLACK_API_URL": "Slack Web API base URL (default https://slack.com/api/)",
    "BREAKGLASS_POLICY": "policy file (default ./breakglass.toml)",
    "BREAKGLASS_DATABASE_URL": "database (default sqlite+aiosqlite:///./breakglass.db)",
    "BREAKGLASS_MASTER_KEY": "master key (from `breakglass keys new-master`); required",
    "BREAKGLASS_OLD_MASTER_KEY": "the master key being replaced; required",
    "BREAKGLASS_HOST": "listen address (default 0.0.0.0)",
    "BREAKGLASS_PORT": "listen port (default 3000)",
    "BREAKGLASS_METRICS_ADDR": "host:port of the /metrics listener, or off (default 127.0.0.1:9464)",
    "BREAKGLASS_METRICS_TOKEN": "bearer token that also opens /metrics on the main port",
    "BREAKGLASS_LOG_LEVEL": "DEBUG, INFO, WARNING, ERROR or CRITICAL, any case (default INFO)",
    "BREAKGLASS_TRUSTED_PROXIES": "reverse proxies (IPs or networks, comma-separated) whose "
                                  "X-Forwarded-For is believed",
}
SERVE_ENV = ("SLACK_BOT_TOKEN", "SLACK_SIGNING_SECRET", "SLACK_APP_TOKEN", "SLACK_API_URL",
             "BREAKGLASS_POLICY", "BREAKGLASS_DATABASE_URL", "BREAKGLASS_MASTER_KEY",
             "BREAKGLASS_HOST", "BREAKGLASS_PORT", "BREAKGLASS_METRICS_ADDR",
             "BREAKGLASS_METRICS_TOKEN", "BREAKGLASS_LOG_LEVEL", "BREAKGLASS_TRUSTED_PROXIES")


def _command(sub: Any, name: str, summary: str, description: str,
             env: Sequence[str] = ()) -> argparse.ArgumentParser:
    """A subcommand whose --help says what it does and which variables it reads."""
    if env:
        width = max(len(v) for v in env)
        epilog = "environment:\n" + "\n".join(f"  {v:<{width}}  {ENV_HELP[v]}" for v in env)
        if name == "serve":
            epilog += ("\n  and the variables the policy's [[webhooks]] name in secret_env and "
                       "routing_key_env")
    else:
        epilog = "environment: reads no environment variables"
    return sub.add_parser(name, help=summary, description=textwrap.fill(description, 78),
                          epilog=epilog,  # type: ignore[no-any-return]
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("breakglass")
    except PackageNotFoundError:
        return "unknown (not installed)"


def cmd_db(args: argparse.Namespace) -> int:
    return asyncio.run(_db(args))


async def _db(args: argparse.Namespace) -> int:
    from .store import migrate
    from .store.db import DEFAULT_URL, Database

    url = os.environ.get("BREAKGLASS_DATABASE_URL") or DEFAULT_URL
    # `current` reads: it never creates a database; `upgrade` may create one where serve could.
    check = preflight.existing_database if args.db_cmd == "current" else preflight.database_to_create
    if (problem := check(url)) is not None:
        raise Exit(2, problem)
    db = Database(url)
    try:
        if args.db_cmd == "current":
            found = await migrate.version(db)
            state = ("current" if found.is_current else "empty: `breakglass serve` or "
                     "`breakglass db upgrade` creates the schema" if found.is_empty
                     else "behind: run `breakglass db upgrade`")
            print(f"schema version {found.current or 'none'}, newest {found.head} ({state})")
            return 0
        before, after = await migrate.upgrade(db)
        if before == after:
            print(f"schema already at the newest version, {after}")
        else:
            print(f"schema upgraded from {before or 'nothing'} to {after}")
        return 0
    finally:
        await db.dispose()


def _at_least_one(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, not {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="breakglass", description="Emergency (break-glass) access from Slack: short-lived, "
        "quorum-approved tokens. `breakglass COMMAND --help` says what each command does "
        "and which environment variables it reads.")
    p.add_argument("--version", action="version", version=f"breakglass {_version()}")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    s = _command(sub, "serve", "run the bot (HTTP mode, or Socket Mode with SLACK_APP_TOKEN)",
                 "Run the bot: Slack commands and clicks on POST /slack/events (or over Socket "
                 "Mode when SLACK_APP_TOKEN is set), token endpoints for relying services, "
                 "/healthz. Checks the environment, the database path, the policy, the bot "
                 "token (auth.test) and the bot's channels first; a problem is exit 2 and one "
                 "line per problem.", SERVE_ENV)
    s.add_argument("--log-level", default=None, metavar="LEVEL",
                   help="DEBUG, INFO, WARNING, ERROR or CRITICAL, any case "
                   "(default: BREAKGLASS_LOG_LEVEL, else INFO)")
    s.set_defaults(func=cmd_serve)
    d = _command(sub, "demo", "run the whole flow against a built-in Slack emulator",
                 "Run a request from command to expiry on this machine: a local Slack Web API "
                 "emulator, a temporary SQLite database, the real HTTP paths; prints what each "
                 "person would see. Needs no Slack workspace.")
    d.add_argument("--verbose", action="store_true", help="also show every Slack API call")
    d.set_defaults(func=cmd_demo)
    c = _command(sub, "check-policy", "validate a policy file without starting anything",
                 "Validate a policy file: exit 0 with a summary (and warnings, such as a channel "
                 "written as a name or example values left in place), or exit 2 listing every "
                 "problem with its key path.", ("BREAKGLASS_POLICY",))
    c.add_argument("file", nargs="?", help="the policy file (default: BREAKGLASS_POLICY, "
                   "else ./breakglass.toml)")
    c.set_defaults(func=cmd_check_policy)
    hs = _command(sub, "hash-secret", "hash a relying service's client secret for the policy",
                  "Read a client secret from standard input (one line; a trailing newline is "
                  "dropped) and print `secret_hash = \"scrypt$…\"` for its [clients.NAME] "
                  "entry: a slow, salted hash (scrypt). The secret is never printed or stored.")
    hs.add_argument("--ln", type=int, default=None, metavar="N",
                    help="log2 of scrypt's cost N, 12 to 22 (default 15: about 32 MiB per check)")
    hs.set_defaults(func=cmd_hash_secret)
    k = _command(sub, "keys", "signing and master keys",
                 "Manage the master key and the token signing keys. "
                 "`breakglass keys SUBCOMMAND --help` for each.")
    ks = k.add_subparsers(dest="keys_cmd", required=True, metavar="SUBCOMMAND")
    _command(ks, "new-master", "print a fresh random master key",
             "Print a fresh random master key for BREAKGLASS_MASTER_KEY. Touches no database.")
    _command(ks, "rotate", "make a new signing key current",
             "Make a new signing key current; older keys stay in JWKS until their tokens "
             "expire. The database must exist (a rotation into a new one would protect "
             "nothing).",
             ("BREAKGLASS_DATABASE_URL", "BREAKGLASS_MASTER_KEY", "BREAKGLASS_POLICY"))
    _command(ks, "rotate-master", "re-encrypt signing keys under a new master key",
             "Re-encrypt the signing keys and the audit key under a new master key: "
             "BREAKGLASS_OLD_MASTER_KEY opens them, BREAKGLASS_MASTER_KEY seals them again. "
             "All or nothing. The database must exist.",
             ("BREAKGLASS_DATABASE_URL", "BREAKGLASS_MASTER_KEY", "BREAKGLASS_OLD_MASTER_KEY",
              "BREAKGLASS_POLICY"))
    k.set_defaults(func=cmd_keys)
    a = _command(sub, "audit", "the tamper-evident audit log",
                 "Check or export the audit log. `breakglass audit SUBCOMMAND --help` for each.")
    asub = a.add_subparsers(dest="audit_cmd", required=True, metavar="SUBCOMMAND")
    v = _command(asub, "verify", "check the MAC chain; exit 1 naming the first bad row",
                 "Check the audit log's MAC chain: exit 0 when intact, 1 naming the first bad "
                 "sequence number, 2 when there is no database at the URL (nothing is created). "
                 "With --slack, also compare the checkpoints posted in the incident channel.",
                 ("BREAKGLASS_DATABASE_URL", "BREAKGLASS_MASTER_KEY", "BREAKGLASS_POLICY",
                  "SLACK_BOT_TOKEN", "SLACK_API_URL"))
    v.add_argument("--slack", action="store_true",
                   help="also compare the checkpoints the bot posted in the incident channel "
                   "(BREAKGLASS_POLICY, SLACK_BOT_TOKEN, SLACK_API_URL); exit 1 naming a "
                   "checkpoint's sequence number the database lacks or holds another MAC for, "
                   "and post an alert there")
    v.add_argument("--since", help="with --slack: only checkpoints posted at or after this "
                   "ISO-8601 time")
    v.add_argument("--no-alert", action="store_true",
                   help="with --slack: print a failure but raise no alert (no Slack post, no "
                   "audit row, no webhook event)")
    e = _command(asub, "export", "write rows as JSON Lines",
                 "Write the audit log's rows to standard output as JSON Lines; exit 2 when there "
                 "is no database at the URL (nothing is created).",
                 ("BREAKGLASS_DATABASE_URL", "BREAKGLASS_MASTER_KEY"))
    e.add_argument("--since", help="only rows at or after this ISO-8601 time, "
                   "like 2026-11-25T12:00:00Z")
    a.set_defaults(func=cmd_audit)
    o = _command(sub, "outbox", "Slack events waiting or dead-lettered",
                 "The outbox of Slack events. `breakglass outbox SUBCOMMAND --help` for each.")
    osub = o.add_subparsers(dest="outbox_cmd", required=True, metavar="SUBCOMMAND")
    _command(osub, "retry", "queue dead-lettered events again",
             "Queue every dead-lettered Slack event again; a running bot delivers them. Exit 2 "
             "when there is no database at the URL (nothing is created).",
             ("BREAKGLASS_DATABASE_URL",))
    o.set_defaults(func=cmd_outbox)
    dr = _command(sub, "drills", "past drills, and the scopes not rehearsed within "
                  "[drills] every", "List past drills (newest first) and the scopes not "
                  "rehearsed within the policy's [drills] every. Reads the bot's database; exit 2 "
                  "when there is none (nothing is created).",
                  ("BREAKGLASS_POLICY", "BREAKGLASS_DATABASE_URL"))
    dr.add_argument("--json", action="store_true", help="print JSON instead of text")
    dr.add_argument("--limit", type=_at_least_one, default=50, help="most recent drills shown (50)")
    dr.set_defaults(func=cmd_drills)
    b = _command(sub, "db", "the database schema (Alembic migrations)",
                 "The database schema. `breakglass serve` creates a missing schema and refuses "
                 "an older one; `breakglass db upgrade` brings it forward.")
    bsub = b.add_subparsers(dest="db_cmd", required=True, metavar="SUBCOMMAND")
    _command(bsub, "upgrade", "bring the schema to this version's",
             "Create the schema of an empty database, or bring an older one (including one made "
             "by breakglass 0.1.0) to this version's. Safe while replicas run: migrations take a "
             "lock (a PostgreSQL advisory lock, SQLite's write lock). Back up the database "
             "first; migrations only go forward.", ("BREAKGLASS_DATABASE_URL",))
    _command(bsub, "current", "print the schema version and whether it is current",
             "Print the database's schema version and the newest this breakglass knows.",
             ("BREAKGLASS_DATABASE_URL",))
    b.set_defaults(func=cmd_db)
    r = _command(sub, "reviews", "post-incident reviews waiting for sign-off; exit 1 when any "
                 "is overdue", "List the post-incident reviews not signed off yet (every "
                 "grant that ended needs one), oldest due first; exit 1 when any is overdue, "
                 "so a compliance job can run it. Exit 2 when there is no database at the URL "
                 "(nothing is created).", ("BREAKGLASS_DATABASE_URL",))
    r.add_argument("--overdue", action="store_true", help="only the overdue ones")
    r.add_argument("--json", action="store_true", help="JSON Lines")
    r.set_defaults(func=cmd_reviews)
    t = _command(sub, "tokens", "live grants: list them, revoke them",
                 "Live grants. `breakglass tokens SUBCOMMAND --help` for each.")
    tsub = t.add_subparsers(dest="tokens_cmd", required=True, metavar="SUBCOMMAND")
    tl = _command(tsub, "list", "every live grant",
                  "Every live grant: ID, scope, requester, incident, expires in, approvers, "
                  "uses. Exit 2 when there is no database at the URL (nothing is created).",
                  ("BREAKGLASS_DATABASE_URL",))
    tl.add_argument("--json", action="store_true", help="JSON Lines")
    tr = _command(tsub, "revoke", "revoke grants at once (lost laptop, leaked key)",
                  "Revoke the named grants (request IDs or token jtis), a user's, a scope's or "
                  "all live grants at once, through the same path as a revocation from Slack: "
                  "audited with the operator's OS user as actor (os:USER) and the reason, "
                  "announced in the incident channel, the DMs edited by the running bot. "
                  "--reason is required. An unknown or closed ID: exit 2, nothing revoked.",
                  ("BREAKGLASS_DATABASE_URL", "BREAKGLASS_MASTER_KEY", "BREAKGLASS_POLICY"))
    tr.add_argument("ids", nargs="*", metavar="ID", help="request IDs or token jtis")
    tr.add_argument("--user", help="every live grant of this Slack user ID")
    tr.add_argument("--scope", help="every live grant of this scope")
    tr.add_argument("--all", action="store_true", help="every live grant")
    tr.add_argument("--reason", help="why (required): audited and announced")
    t.set_defaults(func=cmd_tokens)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except Exit as exc:
        for line in exc.message.splitlines() or [""]:
            print(f"breakglass: {line}", file=sys.stderr)
        return exc.code
    except Exception as exc:
        from .store.migrate import SchemaError

        if not isinstance(exc, SchemaError):
            raise
        print(f"breakglass: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
