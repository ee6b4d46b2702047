"""RFC 7662 introspection and RFC 7009 revocation for relying services.

Anything that is not a live, revealed token of an audience the calling client
may see answers exactly `{"active": false}`: expired, revoked, unknown,
malformed, wrong issuer, other audience all look the same from outside.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from sqlalchemy import select

from . import audit, outbox
from .core import tokens
from .core.clock import Clock
from .core.domain import State
from .core.policy import Client, Policy
from .keys import KeyRing
from .service import Service
from .slack import blocks
from .store import requests as store
from .store.schema import requests as requests_table
from .store.schema import token_uses

log = logging.getLogger(__name__)

INACTIVE: dict[str, Any] = {"active": False}
LEEWAY = timedelta(seconds=0)
SUMMARY_EVERY = timedelta(minutes=1)  # per token: well inside Slack's 1 message/s per channel


class Introspector:
    def __init__(self, service: Service, keyring: KeyRing, policy: Policy, clock: Clock) -> None:
        self.service = service
        self.keyring = keyring
        self.policy = policy
        self.clock = clock

    def _verify(self, token: str) -> dict[str, Any] | None:
        try:
            return tokens.verify(token, self.keyring.verification_keys,
                                 issuer=self.policy.tokens.issuer, now=self.clock.now(),
                                 leeway=LEEWAY)
        except tokens.InvalidToken:
            return None

    async def introspect(self, token: str, client_id: str, client: Client) -> dict[str, Any]:
        claims = self._verify(token)
        if claims is None or claims.get("aud") not in client.audiences:
            return dict(INACTIVE)
        digest = tokens.token_hash(token)
        async with self.service.db.read() as conn:
            row = (await conn.execute(
                select(requests_table.c.id, requests_table.c.state,
                       requests_table.c.token_expires_at)
                .where(requests_table.c.token_hash == digest))).first()
        if row is None or row.state != State.REVEALED.value:
            return dict(INACTIVE)
        await self.record_use(row.id, str(claims["jti"]), client_id)
        answer = {k: claims[k] for k in ("scope", "client_id", "sub", "aud", "iss", "exp", "iat",
                                         "nbf", "jti")}
        answer.update(active=True, token_type="Bearer", username=claims["sub"],
                      breakglass=claims.get("breakglass", {}))
        return answer

    async def record_use(self, request_id: str, jti: str, client_id: str) -> None:
        """Audit each use; tell the incident channel at once on the first, summarise the rest."""
        now = self.clock.now()
        db = self.service.db
        async with db.transaction() as conn:
            row = (await conn.execute(select(token_uses).where(token_uses.c.jti == jti))).first()
            if row is None:
                await conn.execute(token_uses.insert().values(
                    jti=jti, request_id=request_id, count=1, reported=1, first_at=now,
                    last_at=now, last_client=client_id, reported_at=now))
                req = await store.load(conn, request_id)
                assert req is not None
                await outbox.post(conn, now, self.service.incident_channel,
                                  blocks.incident_used(req, client_id, 1, first=True))
            else:
                await conn.execute(token_uses.update().where(token_uses.c.jti == jti).values(
                    count=token_uses.c.count + 1, last_at=now, last_client=client_id))
            await audit.append(conn, self.service.audit_key, at=now, actor=f"client:{client_id}",
                               event="used", details={"jti": jti}, request_id=request_id)
        if row is None:
            self.service.wake_outbox()

    async def revoke(self, token: str, client_id: str, client: Client) -> None:
        claims = self._verify(token)
        if claims is None or claims.get("aud") not in client.audiences:
            return  # RFC 7009 §2.2: an invalid token is answered 200 all the same
        async with self.service.db.read() as conn:
            req = await store.find_by_hash(conn, tokens.token_hash(token))
        if req is None or not req.has_token:
            return
        from .core.errors import Refusal

        try:
            await self.service.revoke(req.id, f"client:{client_id}", via="oauth2")
        except Refusal:
            pass  # revoked or expired meanwhile: nothing left to do

    async def summarise_uses(self) -> int:
        """Post one line per token with unreported uses, at most once a minute per token."""
        now = self.clock.now()
        db = self.service.db
        async with db.read() as conn:
            rows = (await conn.execute(select(token_uses).where(
                token_uses.c.count > token_uses.c.reported,
                token_uses.c.reported_at <= now - SUMMARY_EVERY).limit(100))).all()
        posted = 0
        for row in rows:
            async with db.transaction() as conn:
                done = await conn.execute(token_uses.update().where(
                    token_uses.c.jti == row.jti, token_uses.c.reported == row.reported)
                    .values(reported=row.count, reported_at=now))
                if done.rowcount != 1:
                    continue
                req = await store.load(conn, row.request_id)
                if req is None or req.token_expires_at is None:
                    continue
                await outbox.post(conn, now, self.service.incident_channel, blocks.incident_used(
                    req, row.last_client, row.count - row.reported, first=False))
            posted += 1
        if posted:
            self.service.wake_outbox()
        return posted
