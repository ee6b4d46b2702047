"""Live policy (contract §7.3): `breakglass serve` reloads its policy file on
SIGHUP and when the file changes, without a restart.

* **When.** `watch` looks at the file every `INTERVAL` (2 s): its mtime and size,
  and its SHA-256 whenever they changed and every `HASH_EVERY` checks anyway (an
  edit that keeps both). A file caught mid-write is read again once its stat
  stays still. SIGHUP (`Runtime.on_sighup`) reloads at once, even an unchanged
  file (which re-runs the reconciliation). Tests and the sandbox call
  `Runtime.reload_policy(text)`.
* **Refused.** A policy that does not validate changes nothing: the running
  policy stays, the errors are logged, audited (`policy_refused`) and posted to
  the incident channel as an alert (`:rotating_light:`). The same bad file is
  refused once, not at every check; of several replicas refusing it, the one
  that claims `policy-refused:<running sha>:<new sha>` in `periodic_runs`
  audits and alerts (one webhook `alert`), the others only log; again after
  `REFUSAL_ALERT_AGAIN` (an hour) if it is still refused then.
* **Applied.** The new policy replaces the old one in one step (`LivePolicy.swap`),
  is audited (`policy_reloaded`, old and new SHA-256), announced once, and then
  `reconcile.reconcile_policy` revokes every live grant it no longer covers and
  cancels pending requests for removed scopes; the membership re-check runs
  right after (a holder removed from a group's static `members`). A new
  `tokens.algorithm` makes that algorithm's newest key current (made if none:
  a rotation, audited `key_rotated` and alerted like `breakglass keys rotate`,
  once across replicas).
* **Several replicas** each reload by themselves; each revocation and
  cancellation is a conditional update, so it happens once, and the posts about
  the reload carry a key, so each is posted once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

from sqlalchemy.ext.asyncio import AsyncConnection

from .. import audit
from ..core.policy import Policy, PolicyError, parse_policy
from ..delivery import outbox
from ..delivery.webhooks import WebhookConfigError
from ..keys import Record
from ..slack import blocks
from ..store.periodic import claim_run
from .alerts import KEY_ROTATED, RELOAD_REFUSED, raise_alert, raise_alert_in
from .live_policy import text_sha256
from .reconcile import reconcile_policy

if TYPE_CHECKING:
    from ..runtime import Runtime

log = logging.getLogger(__name__)

INTERVAL = 2.0
HASH_EVERY = 5
MAX_SHOWN_ERRORS = 8
# The same bad file (over the same running policy) is audited and alerted once across
# replicas and SIGHUPs; only if it is still being refused this long after, again.
REFUSAL_ALERT_AGAIN = timedelta(hours=1)


@dataclass(frozen=True)
class ReloadResult:
    outcome: str  # "reloaded" | "unchanged" | "refused"
    sha256: str
    errors: tuple[str, ...] = ()
    revoked: int = 0
    cancelled: int = 0


class PolicyReloader:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.reloads = 0
        self.refusals = 0
        self._lock = asyncio.Lock()
        self._stat: tuple[int, int] | None = None
        # SHA-256 of the file as last read: at start, what the runtime was started with.
        self._file_sha: str | None = rt.live.sha256

    @property
    def path(self) -> str:
        return self.rt.settings.policy_path

    async def reload_text(self, text: str, *, source: str = "<policy>", trigger: str = "api",
                          force: bool = False) -> ReloadResult:
        async with self._lock:
            return await self._reload(text, source, trigger, force)

    async def _reload(self, text: str, source: str, trigger: str, force: bool) -> ReloadResult:
        rt, live = self.rt, self.rt.live
        sha = text_sha256(text)
        if sha == live.sha256 and not force:
            return ReloadResult("unchanged", sha)
        try:
            policy = parse_policy(text, source)
        except PolicyError as exc:
            return await self._refuse(sha, exc.errors, source, trigger)
        if sha != live.sha256:
            previous = live.policy
            try:
                # A webhook whose secret is not in the environment: refused, nothing changes.
                rt.webhooks.configure(policy.webhooks, rt.env)
            except WebhookConfigError as exc:
                return await self._refuse(sha, [str(exc)], source, trigger)
            if policy.tokens.algorithm != rt.keyring.alg:
                try:
                    await rt.keyring.use_algorithm(rt.db, policy.tokens.algorithm, rt.clock.now(),
                                                   record=self._key_rotation(policy, trigger))
                except Exception as exc:  # noqa: BLE001 - refused like any invalid policy
                    rt.webhooks.configure(previous.webhooks, rt.env)
                    return await self._refuse(sha, [f"tokens.algorithm: cannot switch to "
                                                    f"{policy.tokens.algorithm}: {exc}"],
                                              source, trigger)
            await self._apply(policy, text, source, trigger)
        done = await reconcile_policy(rt.service, yield_to=rt.foreground.wait)
        revoked = done.revoked + await rt.membership.run_once()
        log.info("policy reloaded (%s, sha256 %s): %d grant(s) revoked, %d request(s) cancelled",
                 trigger, sha[:12], revoked, done.cancelled)
        return ReloadResult("reloaded", sha, (), revoked, done.cancelled)

    def _key_rotation(self, policy: Policy, trigger: str) -> Record:
        """A new signing key made by the switch of `tokens.algorithm` is a rotation
        (§7.5, §7.7): audited `key_rotated` and alerted as `breakglass keys rotate` does,
        in the transaction that makes the key (once across replicas)."""
        rt = self.rt
        previous = rt.keyring.current.kid
        alg = policy.tokens.algorithm

        async def record(conn: AsyncConnection, kid: str) -> None:
            now = rt.clock.now()
            details = {"kid": kid, "previous": previous, "alg": alg, "trigger": trigger}
            await audit.append(conn, rt.audit_key, at=now, actor="breakglass",
                               event="key_rotated", details=details)
            await raise_alert_in(
                conn, rt.audit_key, now, policy.slack.incident_channel, KEY_ROTATED,
                f"signing key rotated by a policy reload (`tokens.algorithm = \"{alg}\"`): "
                f"`{kid}` signs new tokens; tokens signed by `{previous}` keep verifying "
                "until they expire.", {**details, "by": "policy reload"})

        return record

    async def _apply(self, policy: Policy, text: str, source: str, trigger: str) -> None:
        """Record the reload (audit row and the post, one transaction), then swap."""
        rt = self.rt
        previous, old_sha, new_sha = rt.live.policy, rt.live.sha256, text_sha256(text)
        removed = sorted(set(previous.scopes) - set(policy.scopes))
        added = sorted(set(policy.scopes) - set(previous.scopes))
        changes = "".join([f"; scopes removed: {', '.join(removed)}" if removed else "",
                           f"; scopes added: {', '.join(added)}" if added else ""])
        now = rt.clock.now()
        async with rt.service.write() as w:
            rt.service.record(w, "breakglass", "policy_reloaded", {
                "old_sha256": old_sha, "sha256": new_sha, "trigger": trigger, "source": source,
                "scopes": sorted(policy.scopes), "removed": removed, "added": added})
            w.rows.append(outbox.post_row(
                now, policy.slack.incident_channel,
                f":arrows_counterclockwise: *policy reloaded* (sha256 `{new_sha[:12]}`, was "
                f"`{old_sha[:12]}`){blocks.escape(changes)}",
                key=f"policy-reloaded:{old_sha[:16]}:{new_sha[:16]}"))
        rt.live.swap(policy, text)
        self.reloads += 1
        rt.service.wake_outbox()

    async def _refuse(self, sha: str, errors: list[str], source: str, trigger: str) -> ReloadResult:
        rt = self.rt
        self.refusals += 1
        running = rt.live.sha256
        log.error("policy reload refused (%s): %s does not validate; the running policy (sha256 "
                  "%s) stays: %s", trigger, source, running[:12], "; ".join(errors))
        now = rt.clock.now()
        shown = errors[:MAX_SHOWN_ERRORS]
        more = f"\n… and {len(errors) - len(shown)} more" if len(errors) > len(shown) else ""
        lines = "\n".join(f"• {blocks.escape(e)}" for e in shown)
        text = (f"policy reload refused: `{blocks.escape(source)}` does not validate, so the "
                f"running policy (sha256 `{running[:12]}`) stays. Fix the file; "
                f"`breakglass check-policy` lists every problem.\n{lines}{more}")
        async with rt.service.write() as w:
            # Every replica refuses the same file: the first to claim it audits and alerts
            # (one webhook `alert`, one incident); the others only log.
            if not await claim_run(w.conn, f"policy-refused:{running}:{sha}", now,
                                   REFUSAL_ALERT_AGAIN):
                return ReloadResult("refused", sha, tuple(errors))
            rt.service.record(w, "breakglass", "policy_refused", {
                "sha256": sha, "running_sha256": running, "trigger": trigger, "source": source,
                "errors": errors[:50]})
            raise_alert(w, now, rt.live.policy.slack.incident_channel, RELOAD_REFUSED, text,
                        {"sha256": sha, "errors": errors[:50]},
                        key=f"policy-refused:{running[:16]}:{sha[:16]}")
        rt.service.wake_outbox()
        return ReloadResult("refused", sha, tuple(errors))

    # -- the file ---------------------------------------------------------------

    def _read(self) -> tuple[str | None, list[str]]:
        try:
            with open(self.path, "rb") as handle:
                raw = handle.read()
        except FileNotFoundError:
            return None, [f"{self.path}: file not found"]
        except OSError as exc:
            return None, [f"{self.path}: cannot read: {exc.strerror or exc}"]
        try:
            return raw.decode("utf-8"), []
        except UnicodeDecodeError as exc:
            return None, [f"{self.path}: not UTF-8 text (byte {exc.start})"]

    async def reload_file(self, trigger: str = "sighup", force: bool = True) -> ReloadResult:
        """Read the policy file and apply it. Without `force`, only a file that changed
        since it was last read (a policy given by `reload_policy(text)` is not undone by
        a file that did not change)."""
        async with self._lock:
            text, errors = self._read()
            sha = text_sha256(text if text is not None else "\0".join(errors))
            if not force and sha == self._file_sha:
                return ReloadResult("unchanged", sha)
            self._file_sha = sha
            if text is None:
                return await self._refuse(sha, errors, self.path, trigger)
            return await self._reload(text, self.path, trigger, force)

    def _stat_now(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    async def watch(self, stop: asyncio.Event, interval: float = INTERVAL) -> None:
        self._stat = self._stat_now()
        checks = 0
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
            if stop.is_set():
                return
            checks += 1
            try:
                stat = self._stat_now()
                if stat == self._stat and checks % HASH_EVERY:
                    continue
                if stat != self._stat:
                    await asyncio.sleep(min(0.3, interval / 2))  # let a writer finish
                    if self._stat_now() != stat:
                        continue  # still changing: next check
                self._stat = stat
                await self.reload_file(trigger="file", force=False)
            except Exception:  # noqa: BLE001 - keep watching
                log.exception("policy file check failed")

