"""RFC 7662 introspection and RFC 7009 revocation for relying services.

Anything that is not a live, revealed token of an audience the calling client
may see answers exactly `{"active": false}`, and so does every drill token
(audience `breakglass-drill`, claim `breakglass.drill: true`), for every client: expired, revoked, unknown,
malformed, wrong issuer, other audience all look the same from outside. Why a
token was refused is counted in `Introspector.rejections` (the reason texts of
`bot.core.tokens.InvalidToken`, which never hold token text), never returned.

The hot path
------------

A relying service introspects the same token many times, so the answer for a
token is worked out once and kept:

* **Verified-token cache**, keyed by the token's SHA-256 (`CACHE_SIZE`
  entries at most; an entry never outlives the token's `exp`). The first
  sighting of a token verifies the JWT and reads its row (one indexed query);
  every later introspection is pure memory: `exp`/`nbf` against the clock,
  `aud` against the calling client's audiences, and a freshness check.
* **Revocation.** An entry is re-read from the database (one query, shared by
  every concurrent request for that token) when it is older than
  `REVALIDATE_AFTER`, or when this process changed any state since (the
  service wakes the outbox after every committed change; the introspector
  listens there, see `_on_state_change`). So a token revoked *in this process*
  (Slack `/breakglass revoke`, `POST /oauth2/revoke`, policy reconciliation) is
  inactive for the very next introspection, and a token revoked or expired by
  *another* bot process on the same database is dropped from this cache within
  `store.closures.POLL_EVERY` (40 ms): the closing transaction appends the
  token's hash to `token_closures`, which every process polls (`closed`). The
  re-read after `REVALIDATE_AFTER` (1 s) is the backstop.
  A token whose state was read more than `REFRESH_AHEAD` ago is read again in
  the background, so requests do not wait for that read in steady state.
* **Uses.** The first active introspection of a token (per process) writes its
  `token_uses` row, its `used` audit row (`{"jti", "uses": 1, "first"}`) and,
  if it is the token's first use anywhere, the `used` post to the incident
  channel, in one transaction, before answering. Later uses are counted in
  memory and written every `FLUSH_EVERY` (150 ms) in one transaction: the
  `token_uses` counters and, with `audit.append_many`, one `used` audit row per
  token and client that stands for every use in that window
  (`{"jti", "uses": n, "first_at", "last_at"}`). So every use is in the audit
  log, to within 150 ms, and summing `uses` over a token's `used` rows gives
  its count; a row per use would cost more than the whole introspection
  (about 35 us each, mostly building and MACing the row). `flush()` writes what
  is counted; `Runtime.stop` calls it once the HTTP server stopped taking
  requests, so a clean shutdown loses no use. A crash can lose at most the last
  `FLUSH_EVERY` of uses. `summarise_uses` (the sweeper) posts the count of
  unreported uses at most once a minute per token.

Keys
----

A token is only checked against a key that is in the published key set
(`KeyRing.jwks`: the current key, and every key that signed a token which has
not expired, plus a minute): a retired key whose tokens have all expired
verifies nothing, even if its private half leaked. A `kid` this process does
not know (another process rotated the keys) reloads the key ring, at most once
every `RELOAD_EVERY` seconds.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, select
from sqlalchemy.exc import IntegrityError

from . import audit
from .core import tokens
from .core.clock import Clock
from .core.domain import State
from .core.errors import Refusal
from .core.policy import Client, Policy
from .delivery import outbox
from .governance import alerts
from .governance.live_policy import LivePolicy
from .keys import KeyRing
from .service import Service
from .slack import blocks
from .store import requests as store
from .store.schema import requests as requests_table
from .store.schema import token_uses

log = logging.getLogger(__name__)

INACTIVE: dict[str, Any] = {"active": False}
INACTIVE_BODY = b'{"active": false}'
LEEWAY = timedelta(seconds=0)
SUMMARY_EVERY = timedelta(minutes=1)  # per token
SUMMARY_LINES = 50  # tokens summarised in one message at most (the rest: next sweep)

CACHE_SIZE = 4096  # verified tokens kept in memory
REVALIDATE_AFTER = 1.0  # seconds: bound on seeing another process's revocation
REFRESH_AHEAD = 0.5  # seconds: past this age a token's state is re-read in the background
FLUSH_EVERY = 0.15  # seconds between writes of buffered uses
RELOAD_EVERY = 5.0  # seconds: at most one key-ring reload per this, on an unknown kid
KEYS_FRESH_FOR = 5.0  # seconds the set of published kids is reused
KEYS_REFRESH_AFTER = 1.0  # ... or this, when a token names a kid outside it

_ANSWER_CLAIMS = ("scope", "client_id", "sub", "aud", "iss", "exp", "iat", "nbf", "jti")

# Reasons counted in Introspector.rejections (besides InvalidToken's own texts).
NOT_A_STRING = "token is not a string"
EMPTY = "empty token"
WRONG_AUDIENCE = "audience not allowed for this client"
UNKNOWN_TOKEN = "no such token was revealed"
NOT_ACTIVE = "token revoked or expired"
KEY_OUT_OF_WINDOW = "key no longer published"
KEY_MISMATCH = "token signed by another key than recorded"
DRILL = "drill token (accepted by no service)"


@dataclass(slots=True, eq=False)
class _Entry:
    """What is known of one verified, revealed token."""

    digest: str
    request_id: str
    jti: str
    audiences: frozenset[str]
    exp: float
    nbf: float
    answer: dict[str, Any]
    body: bytes
    checked: float  # time.monotonic() of the last database read
    generation: int
    refresh: asyncio.Task[bool] | None = None  # a read of its state under way...
    refresh_generation: int = -1  # ...started at this generation
    recorded: bool = False  # the first use in this process is written
    recording: asyncio.Task[None] | None = None


@dataclass(slots=True)
class _Uses:
    """Uses of one token by one client since the last write."""

    request_id: str
    count: int
    first_at: datetime
    last_at: datetime


@dataclass
class _Timed:
    value: frozenset[str] = field(default_factory=frozenset)
    mono: float = -math.inf
    clock: float = -math.inf


class Introspector:
    def __init__(self, service: Service, keyring: KeyRing, policy: Policy | LivePolicy,
                 clock: Clock) -> None:
        self.service = service
        self.keyring = keyring
        self.live = LivePolicy.of(policy)
        self.clock = clock
        self.rejections: Counter[str] = Counter()
        self.reloads = 0
        self._cache: dict[str, _Entry] = {}
        self._admitting: dict[str, asyncio.Task[_Entry | None]] = {}
        self._generation = 0
        self._published = _Timed()
        self._keys_lock = asyncio.Lock()
        self._last_reload = -math.inf
        self._reload_lock = asyncio.Lock()
        # Uses counted since the last write, per (jti, client), in order of first use.
        self._uses: dict[tuple[str, str], _Uses] = {}
        self._flusher: asyncio.Task[None] | None = None
        self._flusher_writing = False
        self._write_lock = asyncio.Lock()
        # Every state change the service commits ends with a wake of the outbox:
        # listen there so that a revocation in this process is seen at once.
        self._wake_outbox: Callable[[], None] = service.wake_outbox
        service.wake_outbox = self._on_state_change

    @property
    def policy(self) -> Policy:
        return self.live.policy

    # -- cache invalidation ----------------------------------------------------

    def _on_state_change(self) -> None:
        self._generation += 1
        self._wake_outbox()

    def forget(self, token_hash: str) -> None:
        """Drop one token from the cache (it was revoked here)."""
        self._cache.pop(token_hash, None)

    def closed(self, token_hashes: Sequence[str]) -> None:
        """Tokens revoked or expired by any process (store/closures.py): dropped, so the
        next introspection of one reads its row and answers inactive."""
        for digest in token_hashes:
            self._cache.pop(digest, None)

    def invalidate(self) -> None:
        """Make every cached token be read again before its next active answer."""
        self._generation += 1

    # -- introspection ---------------------------------------------------------

    async def introspect(self, token: str, client_id: str, client: Client) -> dict[str, Any]:
        """The RFC 7662 answer, as a new dict."""
        entry = await self.check(token, client_id, client)
        return dict(entry.answer) if entry is not None else dict(INACTIVE)

    async def introspect_json(self, token: str, client_id: str, client: Client) -> bytes:
        """The RFC 7662 answer as JSON text (serialised once per token)."""
        entry = await self.check(token, client_id, client)
        return entry.body if entry is not None else INACTIVE_BODY

    def _reject(self, reason: str) -> None:
        self.rejections[reason] += 1

    async def check(self, token: str, client_id: str, client: Client) -> _Entry | None:
        """The cache entry of an active token this client may see (and count the use),
        or None."""
        if not isinstance(token, str):
            self._reject(NOT_A_STRING)
            return None
        if not token:
            self._reject(EMPTY)
            return None
        if len(token) > tokens.MAX_TOKEN_LENGTH:  # before hashing whatever was sent
            self._reject(f"token longer than {tokens.MAX_TOKEN_LENGTH} characters")
            return None
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()
        entry = self._cache.get(digest)
        if entry is None:
            entry = await self._admitted(token, digest)
            if entry is None:
                return None
        now = self.clock.now()
        t = now.timestamp()
        slack = LEEWAY.total_seconds()
        if entry.exp <= t - slack:
            self._cache.pop(digest, None)
            self._reject("token expired")
            return None
        if entry.nbf > t + slack:
            self._reject("token not yet valid (nbf)")
            return None
        if entry.audiences.isdisjoint(client.audiences):
            self._reject(WRONG_AUDIENCE)
            return None
        age = time.monotonic() - entry.checked
        if entry.generation != self._generation or age > REVALIDATE_AFTER:
            if not await self._still_revealed(entry):
                self._reject(NOT_ACTIVE)
                return None
        elif age > REFRESH_AHEAD and entry.refresh is None:
            self._refresh(entry)  # read it again in the background, before it goes stale
        if not entry.recorded:
            if entry.recording is None:
                entry.recording = asyncio.create_task(self._record_first(entry, client_id))
                await asyncio.shield(entry.recording)
                return entry
            await asyncio.shield(entry.recording)
            now = self.clock.now()
        self._buffer_use(entry, client_id, now)
        return entry

    # -- first sighting of a token ----------------------------------------------

    async def _admitted(self, token: str, digest: str) -> _Entry | None:
        """Verify a token not in the cache; concurrent requests for it share the work."""
        task = self._admitting.get(digest)
        if task is None:
            task = asyncio.create_task(self._admit(token, digest))
            self._admitting[digest] = task
            task.add_done_callback(lambda _t: self._admitting.pop(digest, None))
        return await asyncio.shield(task)

    async def _admit(self, token: str, digest: str) -> _Entry | None:
        claims, kid = await self._verify(token)
        if claims is None:
            return None
        if tokens.is_drill(claims):  # contract 7.4: inactive for every client, whatever its audiences
            self._reject(DRILL)
            return None
        checked = time.monotonic()
        generation = self._generation
        row = await self._row(digest)
        if row is None:
            self._reject(UNKNOWN_TOKEN)
            return None
        if row.state != State.REVEALED.value:
            self._reject(NOT_ACTIVE)
            return None
        if row.drill:  # the row says drill even if the claims did not: still inactive
            self._reject(DRILL)
            return None
        if row.kid is not None and row.kid != kid:
            self._reject(KEY_MISMATCH)
            return None
        answer = {k: claims[k] for k in _ANSWER_CLAIMS}
        answer.update(active=True, token_type="Bearer", username=claims["sub"],
                      breakglass=claims.get("breakglass", {}))
        entry = _Entry(
            digest=digest, request_id=row.id, jti=str(claims["jti"]),
            audiences=_audiences(claims["aud"]),
            exp=float(claims["exp"]), nbf=float(claims["nbf"]), answer=answer,
            body=json.dumps(answer, separators=(", ", ": ")).encode("utf-8"),
            checked=checked, generation=generation)
        self._remember(entry)
        return entry

    def _remember(self, entry: _Entry) -> None:
        if len(self._cache) >= CACHE_SIZE:
            t = self.clock.now().timestamp()
            for digest in [d for d, e in self._cache.items() if e.exp <= t]:
                del self._cache[digest]
            while len(self._cache) >= CACHE_SIZE:
                del self._cache[next(iter(self._cache))]  # the oldest
        self._cache[entry.digest] = entry

    async def _row(self, digest: str) -> Any:
        async with self.service.db.read() as conn:
            return (await conn.execute(
                select(requests_table.c.id, requests_table.c.state, requests_table.c.kid,
                       requests_table.c.drill)
                .where(requests_table.c.token_hash == digest))).first()

    async def _still_revealed(self, entry: _Entry) -> bool:
        task = entry.refresh
        if task is None or entry.refresh_generation != self._generation:
            task = self._refresh(entry)  # none under way, or it began before the last change
        return await asyncio.shield(task)

    def _refresh(self, entry: _Entry) -> asyncio.Task[bool]:
        """Read the token's state again; concurrent requests share one read."""
        task = asyncio.create_task(self._reread(entry))
        entry.refresh = task
        entry.refresh_generation = self._generation

        def done(t: asyncio.Task[bool]) -> None:
            if entry.refresh is t:
                entry.refresh = None
            if not t.cancelled() and t.exception() is not None:
                log.warning("could not read a token's state: %s", t.exception())

        task.add_done_callback(done)
        return task

    async def _reread(self, entry: _Entry) -> bool:
        checked = time.monotonic()
        generation = self._generation
        row = await self._row(entry.digest)
        if row is None or row.state != State.REVEALED.value:
            self._cache.pop(entry.digest, None)
            return False
        entry.checked = max(entry.checked, checked)
        entry.generation = generation
        return True

    # -- verification and keys ---------------------------------------------------

    async def _verify(self, token: str) -> tuple[dict[str, Any] | None, str | None]:
        """(claims, kid) of a token that passes every check but aud and state,
        else (None, kid) with the reason counted."""
        kid = _peek_kid(token)
        if kid is not None:
            if kid not in self.keyring.verification_keys:
                await self._maybe_reload()
            if kid in self.keyring.verification_keys and not await self._published_kid(kid):
                self._reject(KEY_OUT_OF_WINDOW)
                return None, kid
        try:
            claims = tokens.verify(token, self.keyring.verification_keys,
                                   issuer=self.policy.tokens.issuer, now=self.clock.now(),
                                   leeway=LEEWAY)
        except tokens.InvalidToken as exc:
            self._reject(str(exc))
            return None, kid
        return claims, kid

    async def _maybe_reload(self) -> None:
        """Another process may have rotated the keys: reload, at most every RELOAD_EVERY."""
        async with self._reload_lock:
            if time.monotonic() - self._last_reload < RELOAD_EVERY:
                return
            self._last_reload = time.monotonic()
            self.reloads += 1
            try:
                await self.keyring.reload(self.service.db, self.clock.now())
            except Exception as exc:  # noqa: BLE001 - keep the keys we have
                log.warning("could not reload the signing keys: %s", exc)
            self._published = _Timed()

    async def _published_kid(self, kid: str) -> bool:
        mono, now = time.monotonic(), self.clock.now().timestamp()
        known = self._published
        fresh = mono - known.mono < KEYS_FRESH_FOR and abs(now - known.clock) < KEYS_FRESH_FOR
        if fresh and kid in known.value:
            return True
        if fresh and mono - known.mono < KEYS_REFRESH_AFTER and abs(now - known.clock) < KEYS_REFRESH_AFTER:
            return False
        async with self._keys_lock:
            if self._published is known:  # nobody refreshed meanwhile
                jwks = await self.keyring.jwks(self.service.db, self.clock.now())
                self._published = _Timed(frozenset(k["kid"] for k in jwks["keys"]), mono, now)
        return kid in self._published.value

    # -- uses ------------------------------------------------------------------

    async def _record_first(self, entry: _Entry, client_id: str) -> None:
        """The first use in this process: counted, audited and (if it is the token's
        first use anywhere) posted to the incident channel, before the answer."""
        try:
            for _attempt in range(3):
                try:
                    posted = await self._write_first(entry, client_id)
                    break
                except IntegrityError:  # another process inserted the row just now
                    continue
            else:  # pragma: no cover - three lost races in a row
                raise RuntimeError("could not record a token use")
        except BaseException:
            entry.recording = None
            raise
        entry.recorded = True
        if posted:
            self._wake_outbox()

    async def _write_first(self, entry: _Entry, client_id: str) -> bool:
        now = self.clock.now()
        async with self.service.db.transaction() as conn:
            row = (await conn.execute(
                select(token_uses.c.jti).where(token_uses.c.jti == entry.jti))).first()
            first = row is None
            if first:
                await conn.execute(token_uses.insert().values(
                    jti=entry.jti, request_id=entry.request_id, count=1, reported=1,
                    first_at=now, last_at=now, last_client=client_id, reported_at=now))
                req = await store.load(conn, entry.request_id)
                if req is not None and req.token_expires_at is not None:
                    await outbox.post(conn, now, self.service.incident_channel,
                                      blocks.incident_used(req, client_id, 1, first=True))
                if req is not None:
                    await alerts.on_first_use(conn, self.service.audit_key, self.policy, now,
                                              request_id=req.id, requester=req.requester,
                                              scope=req.scope, client=client_id)
            else:
                await conn.execute(token_uses.update().where(token_uses.c.jti == entry.jti).values(
                    count=token_uses.c.count + 1, last_at=now, last_client=client_id))
            await audit.append(conn, self.service.audit_key, at=now, actor=_actor(client_id),
                               event="used", details={"jti": entry.jti, "uses": 1, "first": first},
                               request_id=entry.request_id)
            await alerts.on_uses(conn, self.service.audit_key, self.policy,
                                 [(entry.jti, entry.request_id, 1, now)])
        return first

    def _buffer_use(self, entry: _Entry, client_id: str, now: datetime) -> None:
        uses = self._uses.get((entry.jti, client_id))
        if uses is None:
            self._uses[(entry.jti, client_id)] = _Uses(entry.request_id, 1, now, now)
        else:
            uses.count += 1
            uses.last_at = now
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_later())

    @property
    def buffered(self) -> int:
        """Uses counted in memory, not yet written."""
        return sum(u.count for u in self._uses.values())

    async def _flush_later(self) -> None:
        try:
            await asyncio.sleep(FLUSH_EVERY)
        except asyncio.CancelledError:
            return  # flush() took over
        self._flusher_writing = True
        try:
            await self._write()
        except Exception as exc:  # noqa: BLE001 - the uses stay buffered; retried
            log.warning("could not write %d token use(s); will retry: %s", self.buffered, exc)
        finally:
            self._flusher_writing = False
            self._flusher = None
        if self._uses and self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_later())

    async def flush(self) -> int:
        """Write every counted use now; returns how many. Runtime.stop calls it once no
        introspection can start any more. Never raises: a use that cannot be written is
        logged (and stays counted in memory)."""
        task = self._flusher
        if task is not None and not task.done():
            if not self._flusher_writing:
                task.cancel()  # asleep, or not started yet
            await asyncio.gather(task, return_exceptions=True)
        self._flusher = None
        pending = [e.recording for e in self._cache.values()
                   if e.recording is not None and not e.recording.done()]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        try:
            return await self._write()
        except Exception as exc:  # noqa: BLE001 - shutting down: say so, do not crash
            log.error("could not write %d token use(s): %s", self.buffered, exc)
            return 0

    async def _write(self) -> int:
        """One transaction: the token_uses counters, and one `used` audit row per token
        and client with how many uses it stands for and when they were."""
        async with self._write_lock:
            uses = self._uses
            if not uses:
                return 0
            self._uses = {}
            per_token: dict[str, tuple[int, datetime, str]] = {}
            requests_of = {jti: u.request_id for (jti, _), u in uses.items()}
            events = []
            for (jti, client), u in uses.items():
                count, last_at, last_client = per_token.get(jti, (0, u.last_at, client))
                if u.last_at >= last_at:
                    last_at, last_client = u.last_at, client
                per_token[jti] = (count + u.count, last_at, last_client)
                events.append(audit.AuditEvent(
                    at=u.last_at, actor=_actor(client), event="used", request_id=u.request_id,
                    details={"jti": jti, "uses": u.count, "first_at": u.first_at,
                             "last_at": u.last_at}))
            try:
                async with self.service.db.transaction() as conn:
                    await conn.execute(
                        token_uses.update()
                        .where(token_uses.c.jti == bindparam("b_jti"))
                        .values(count=token_uses.c.count + bindparam("b_n"),
                                last_at=bindparam("b_at"), last_client=bindparam("b_client")),
                        [{"b_jti": jti, "b_n": n, "b_at": at, "b_client": client}
                         for jti, (n, at, client) in per_token.items()])
                    await audit.append_many(conn, self.service.audit_key, events)
                    await alerts.on_uses(conn, self.service.audit_key, self.policy, [
                        (jti, requests_of[jti], n, at) for jti, (n, at, _) in per_token.items()])
            except BaseException:
                self._requeue(uses)
                raise
            return sum(n for n, _, _ in per_token.values())

    def _requeue(self, uses: dict[tuple[str, str], _Uses]) -> None:
        for key, u in self._uses.items():  # counted while the write failed
            earlier = uses.get(key)
            if earlier is None:
                uses[key] = u
            else:
                earlier.count += u.count
                earlier.last_at = u.last_at
        self._uses = uses

    async def summarise_uses(self) -> int:
        """One incident-channel message with a line per token that has unreported uses,
        each token at most once a minute (SUMMARY_EVERY). Called every sweep: so at most
        one message a sweep, within Slack's one message a second per channel. Uses
        counted in memory are written within FLUSH_EVERY and reported in the next one.
        Returns how many tokens were summarised."""
        now = self.clock.now()
        db = self.service.db
        async with db.read() as conn:
            due = (await conn.execute(select(token_uses.c.jti).where(
                token_uses.c.count > token_uses.c.reported,
                token_uses.c.reported_at <= now - SUMMARY_EVERY)
                .order_by(token_uses.c.reported_at).limit(SUMMARY_LINES))).scalars().all()
        if not due:
            return 0
        lines = []
        async with db.transaction() as conn:
            for jti in due:
                # Read again under the write lock: another process may have summarised it.
                row = (await conn.execute(select(token_uses).where(
                    token_uses.c.jti == jti, token_uses.c.count > token_uses.c.reported,
                    token_uses.c.reported_at <= now - SUMMARY_EVERY))).first()
                if row is None:
                    continue
                done = await conn.execute(token_uses.update().where(
                    token_uses.c.jti == jti, token_uses.c.reported == row.reported)
                    .values(reported=row.count, reported_at=now))
                if done.rowcount != 1:
                    continue  # another process summarised it just now
                req = await store.load(conn, row.request_id)
                if req is not None and req.token_expires_at is not None:
                    lines.append(blocks.incident_used(req, row.last_client,
                                                      row.count - row.reported, first=False))
            if lines:
                await outbox.post(conn, now, self.service.incident_channel, "\n".join(lines))
        if lines:
            self._wake_outbox()
        return len(lines)

    # -- revocation --------------------------------------------------------------

    async def revoke(self, token: str, client_id: str, client: Client) -> bool:
        """RFC 7009: revoke a token of an audience this client may see. Anything else
        (unknown, malformed, already dead, other audience) is quietly ignored; the
        caller answers 200 either way. True when this call revoked it."""
        if not isinstance(token, str) or not token or len(token) > tokens.MAX_TOKEN_LENGTH:
            return False
        digest = tokens.token_hash(token)
        # Only a revealed token's text hashes to a stored token_hash: no signature
        # check is needed to know the text is ours, and an expired or rotated-out
        # token can still be revoked (a no-op once it is closed).
        async with self.service.db.read() as conn:
            req = await store.find_by_hash(conn, digest)
        if req is None or not req.has_token:
            return False
        grant = req.extra.get("grant")
        audience = grant.get("audience") if isinstance(grant, dict) else None
        if audience not in client.audiences:
            self._reject(WRONG_AUDIENCE)
            return False
        try:
            await self.service.revoke(req.id, _actor(client_id), via="oauth2")
        except Refusal:
            return False  # revoked or expired meanwhile: nothing left to do
        finally:
            self.forget(digest)
        return True


def _actor(client_id: str) -> str:
    return f"client:{client_id}"  # whole: the columns are Text on every backend


def _peek_kid(token: str) -> str | None:
    """The header's kid, without trusting anything else in it (None if unreadable)."""
    head = token.partition(".")[0]
    if not head or len(head) > 2048:
        return None
    try:
        header = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    except (ValueError, TypeError, RecursionError):
        return None
    kid = header.get("kid") if isinstance(header, dict) else None
    return kid if isinstance(kid, str) and kid else None


def _audiences(value: str | Iterable[str]) -> frozenset[str]:
    return frozenset([value] if isinstance(value, str) else value)
