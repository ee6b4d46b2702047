"""HTTP Basic authentication of relying services on /oauth2/introspect and /oauth2/revoke,
with what stops someone guessing their secrets (issue 13, item 8).

* A secret is checked against the policy's `secret_hash` (scrypt: slow on purpose,
  in a worker thread, at most `MAX_CONCURRENT_HASHES` at once) or the older
  `secret_sha256`.
* A secret once verified is remembered (an HMAC of it under a key of this process,
  with the client and its stored hash): the next request with it costs a
  microsecond, so introspection keeps its throughput. A changed policy changes the
  stored hash, and so forgets it.
* Failures are throttled per client name and per remote address: past
  `MAX_FAILURES` within `WINDOW` seconds, a request with a wrong secret (or an unknown
  client name) is answered 429 with `Retry-After`, and counted as a failure again. The
  secret is still checked while throttled (through the same `MAX_CONCURRENT_HASHES`
  bound), so a request with the correct secret is never refused: neither guessing at
  a client's name nor failures from the same address (behind a proxy every request
  has the proxy's address) can lock a relying service out, even one whose secret this
  process has not verified yet (after a restart, on another replica).
* The address is the peer's; behind a reverse proxy listed in
  `BREAKGLASS_TRUSTED_PROXIES`, the client's address from its `X-Forwarded-For`
  (`client_address`), so one guesser does not throttle every address at once.
* Every failure is logged (client name as given, address, why; never the secret) and
  counted in `breakglass_client_auth_failures_total{reason}`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import ipaddress
import logging
import math
import os
import time
from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import unquote

from . import metrics
from .core import client_secrets
from .core.policy import Client

log = logging.getLogger(__name__)

WINDOW = 60.0  # seconds over which failures are counted
MAX_FAILURES = 10  # per client name, and per address, within WINDOW
MAX_CONCURRENT_HASHES = 2  # scrypt runs at once (each takes ~32 MiB and tens of ms)
VERIFIED_CACHE = 1024  # verified secrets remembered
TRACKED_KEYS = 10_000  # client names and addresses with failures remembered
# Compared against when the client name is unknown, so that takes the same work.
_DUMMY_HASH = client_secrets.ScryptHash(client_secrets.DEFAULT_LN, client_secrets.DEFAULT_R,
                                        client_secrets.DEFAULT_P, bytes(16), bytes(32))


@dataclass(frozen=True)
class Refused:
    status: int  # 401 or 429
    retry_after: int = 0


class _Failures:
    """Failure times per key within WINDOW, for a bounded number of keys."""

    def __init__(self) -> None:
        self._times: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, key: str, now: float) -> deque[float] | None:
        times = self._times.get(key)
        if times is None:
            return None
        while times and times[0] <= now - WINDOW:
            times.popleft()
        if not times:
            del self._times[key]
            return None
        return times

    def retry_after(self, key: str, now: float) -> int:
        """Seconds until `key` may try again; 0 when it may now."""
        times = self._recent(key, now)
        if times is None or len(times) < MAX_FAILURES:
            return 0
        return max(1, math.ceil(times[-MAX_FAILURES] + WINDOW - now))

    def add(self, key: str, now: float) -> None:
        times = self._times.get(key)
        if times is None:
            times = self._times[key] = deque(maxlen=MAX_FAILURES)
            if len(self._times) > TRACKED_KEYS:
                self._times.popitem(last=False)
        else:
            self._times.move_to_end(key)
        times.append(now)


class ClientAuthenticator:
    def __init__(self) -> None:
        self._key = os.urandom(32)  # what the verified-secret cache is keyed with
        self._verified: OrderedDict[bytes, None] = OrderedDict()
        self._by_client = _Failures()
        self._by_address = _Failures()
        self._hashing = asyncio.Semaphore(MAX_CONCURRENT_HASHES)

    async def authenticate(self, header: str, remote: str | None,
                           clients: Mapping[str, Client]) -> tuple[str, Client] | Refused:
        parsed = _basic(header)
        address = remote or "unknown"
        if parsed is None:
            return self._failed("malformed", None, address, time.monotonic())
        client_id, secret = parsed
        client = clients.get(client_id)
        stored = client.credential if client is not None else ""
        memo = hmac.new(self._key, f"{client_id}\0{stored}\0{secret}".encode(
            "utf-8", "surrogatepass"), hashlib.sha256).digest()
        if client is not None and memo in self._verified:
            self._verified.move_to_end(memo)
            return client_id, client
        now = time.monotonic()
        wait = max(self._by_address.retry_after(address, now),
                   self._by_client.retry_after(client_id, now))
        if wait:
            # Throttled: the secret is still checked (through the same bound on hashing),
            # so that whoever guesses cannot lock out a service that has its secret; only
            # a wrong one gets the 429. An unknown name needs no hashing to be wrong.
            if client is None or not await self._matches(secret, client):
                metrics.CLIENT_AUTH_FAILURES.labels(reason="throttled").inc()
                later = time.monotonic()
                self._by_address.add(address, later)
                self._by_client.add(client_id, later)
                return Refused(429, max(self._by_address.retry_after(address, later),
                                        self._by_client.retry_after(client_id, later), 1))
        elif not await self._matches(secret, client):
            return self._failed("unknown_client" if client is None else "bad_secret",
                                client_id, address, time.monotonic())
        assert client is not None
        self._verified[memo] = None
        if len(self._verified) > VERIFIED_CACHE:
            self._verified.popitem(last=False)
        return client_id, client

    async def _matches(self, secret: str, client: Client | None) -> bool:
        if client is not None and client.secret_sha256 is not None:
            digest = hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()
            return hmac.compare_digest(digest, client.secret_sha256)
        stored = (client_secrets.parse(client.secret_hash)
                  if client is not None and client.secret_hash else _DUMMY_HASH)
        async with self._hashing:
            ok = await asyncio.to_thread(client_secrets.verify, secret, stored)
        return ok and client is not None

    def _failed(self, reason: str, client_id: str | None, address: str, now: float) -> Refused:
        metrics.CLIENT_AUTH_FAILURES.labels(reason=reason).inc()
        self._by_address.add(address, now)
        if client_id is not None:
            self._by_client.add(client_id, now)
        log.warning("client authentication failed (%s) for client %r from %s", reason,
                    (client_id or "")[:64], address)
        return Refused(401)


def client_address(remote: str | None, forwarded_for: list[str],
                   trusted: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> str | None:
    """The address failures are counted against: the peer's, unless the peer is a
    trusted proxy (BREAKGLASS_TRUSTED_PROXIES); then the nearest address in its
    `X-Forwarded-For` that is not a trusted proxy (read from the right: a proxy appends
    the address it saw, so what a client wrote itself is further left and not read)."""
    if not trusted or remote is None or not _trusted(remote, trusted):
        return remote
    hops = [h.strip() for value in forwarded_for for h in value.split(",")]
    address = remote
    for hop in reversed(hops):
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            break  # not written by a proxy of ours: stop at the last address we trust
        address = hop
        if not _trusted(hop, trusted):
            break
    return address


def _trusted(address: str, trusted: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]
             ) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in trusted if net.version == ip.version)


def _basic(header: str) -> tuple[str, str] | None:
    """(client_id, secret) from an HTTP Basic header (RFC 6749 §2.3.1), or None."""
    if header[:6].lower() != "basic " or len(header) > 4096:
        return None
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    client_id, sep, secret = decoded.partition(":")
    if not sep:
        return None
    return unquote(client_id), unquote(secret)
