"""Post-incident reviews (contract section 7.1): the use cases.

* When a grant ends (expiry, or a revocation from Slack, a relying service, a
  policy change or an operator), `grants_ended` runs in that transaction (for a
  revocation pass, in its follow-up's: `reconcile.follow_up`, right after the pass):
  a row in `reviews` (due `[reviews] due_after` after the end), a `review_opened`
  audit row, and the grant's timeline with a `Review` button, posted in the thread
  under its approval card (rendered when the outbox sends it: a reload may end
  thousands of grants in one pass, and their reviews are opened 25 at a time).
* `sign_off` (the modal, or `/breakglass review ID SUMMARY…`): a member of the
  reviewer groups other than the requester, with a summary. The timeline message
  is edited to show the review; `reviewed` is audited and posted to the incident
  channel.
* `sweep`: an overdue review gets one `review_overdue` event and alert, and
  reminders in the reviewer channel (once when it becomes overdue, then every
  `remind_every`). Each is claimed with a conditional update of its row, so any
  number of processes send it once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

from .. import audit
from ..core import reviews as rules
from ..core.domain import Request
from ..core.errors import Refusal
from ..core.policy import ReviewSettings
from ..core.reviews import ReviewState
from ..delivery import outbox
from ..delivery.outbox import Rendered
from ..service import Service, Writes, card_key
from ..slack import review_blocks
from ..store import requests as requests_store
from ..store import reviews as store
from . import alerts

log = logging.getLogger(__name__)

SECRET_IN_SUMMARY = "secret_in_summary"


RENDER = "review"  # payload["render"] of the timeline posts queued unrendered


def review_key(request_id: str) -> str:
    """The timeline message in the card's thread (edited when the review is signed off)."""
    return f"review:{request_id}"


class Reviews:
    def __init__(self, service: Service) -> None:
        self.service = service
        service.on_grant_end.append(self.grants_ended)
        service.renderers[RENDER] = self.render_opened

    @property
    def settings(self) -> ReviewSettings:
        return self.service.policy.reviews

    def reviewer_label(self, scope: str) -> str:
        groups = self.service.policy.reviewer_groups(scope)
        return ", ".join(groups) if groups else "the reviewers"

    async def reviewers(self, scope: str) -> frozenset[str]:
        return await self.service.directory.members(self.service.policy.reviewer_groups(scope))

    # -- a grant ends -------------------------------------------------------------

    async def grants_ended(self, w: Writes, reqs: Sequence[Request]) -> None:
        """In the transaction that ended `reqs` (one, or a reload's batch): their reviews
        (one insert), a `review_opened` audit row each, and each timeline's post in the
        thread under its card. The post is queued unrendered and made when it is sent
        (`render_opened`): the timeline is read then, so a batch of grants costs one
        insert here, not a timeline read and a rendering per grant. What it shows is
        what it would have shown now: a grant's timeline does not change once it ended
        (an ended token has no more uses), only its review's sign-off may come in."""
        ended = [req for req in reqs if rules.needs_review(req)]
        if not ended:
            return
        now = self.service.clock.now()
        due_after = self.settings.due_after
        opened = [ReviewState(req.id, req.requester, req.scope, req.closed_at or now,
                              rules.due_at(req.closed_at or now, due_after)) for req in ended]
        await store.insert_reviews(w.conn, opened)
        channel = self.service.reviewer_channel
        for review in opened:
            w.rows.append(outbox.render_post_row(now, channel, review_key(review.request_id),
                                                 RENDER, thread_key=card_key(review.request_id),
                                                 request_id=review.request_id))
            self.service.record(w, "breakglass", "review_opened",
                                {"scope": review.scope, "due_at": review.due_at.isoformat()},
                                review.request_id)

    async def render_opened(self, payload: dict[str, Any]) -> Rendered | None:
        """The timeline post `grants_ended` queued, as it stands when it is sent."""
        async with self.service.db.read() as conn:
            req = await requests_store.load(conn, str(payload.get("request_id")))
            review = await store.load_review(conn, req.id) if req is not None else None
            if req is None or review is None:
                return None
            tl = await store.timeline(conn, req)
        text, blocks = review_blocks.timeline(tl, review, self.reviewer_label(req.scope))
        return Rendered(text, blocks)

    # -- sign-off -------------------------------------------------------------------

    async def sign_off(self, ident: str, user: str, summary: str) -> tuple[Request, ReviewState]:
        service = self.service
        if audit.looks_like_token(summary):
            # The audit log refuses token-shaped text: refused before anything is read or
            # written, with what to do (not "unexpected error").
            raise Refusal(SECRET_IN_SUMMARY, "Your summary looks like it contains a token (a "
                          "JWT or a Slack token). Remove the token text and sign off again "
                          "(describe it instead, e.g. its jti); nothing was recorded. If it "
                          "is a live token, revoke it: it was sent to Slack.")
        async with service.db.read() as conn:
            found = await store.find_grant(conn, ident)
        if found is None:
            raise Refusal("unknown_request", f"There is no grant `{ident}`: give the request "
                          "ID (like R7K2QX9) or the token's jti, as the review thread shows.")
        # Slack user groups may be asked: outside the transaction.
        reviewers = await self.reviewers(found.scope)
        label = self.reviewer_label(found.scope)
        now = service.clock.now()
        refusal: Refusal | None = None
        async with service.write() as w:
            req = await requests_store.load(w.conn, found.id)
            review = await store.load_review(w.conn, found.id)
            assert req is not None
            try:
                rules.judge_sign_off(review, req, user, reviewers, label, summary)
            except Refusal as exc:
                refusal = exc
            else:
                assert review is not None
                text = rules.clean_summary(summary)
                if not await store.sign_off(w.conn, req.id, user, text, now):
                    refusal = Refusal("already_reviewed",
                                      f"The review of {req.id} was signed off a moment ago.")
                else:
                    review = replace(review, reviewed_at=now, reviewed_by=user, summary=text)
                    tl = await store.timeline(w.conn, req)
                    service.record(w, user, "reviewed",
                                   {"scope": req.scope, "summary": text}, req.id)
                    body, blocks = review_blocks.timeline(tl, review, label)
                    w.rows.append(outbox.update_row(now, review_key(req.id),
                                                    service.reviewer_channel, body, blocks))
                    service.post_incident(w, review_blocks.incident_reviewed(tl, review))
        if refusal is not None:
            raise await service.refuse(user, refusal, {"action": "review"}, found.id)
        service.wake_outbox()
        assert review is not None
        return req, review

    async def check_modal(self, ident: str, user: str) -> Request:
        """Before the Review modal opens: would this person's sign-off count (given a
        summary)? Raises the Refusal they would get, so they do not write for nothing."""
        async with self.service.db.read() as conn:
            req = await store.find_grant(conn, ident)
            review = await store.load_review(conn, req.id) if req is not None else None
        if req is None:
            raise Refusal("unknown_request", f"There is no grant `{ident}`.")
        reviewers = await self.reviewers(req.scope)
        rules.judge_sign_off(review, req, user, reviewers, self.reviewer_label(req.scope),
                             "(summary to come)")
        return req

    # -- overdue ---------------------------------------------------------------------

    async def sweep(self) -> int:
        """Alerts and reminders for overdue reviews; returns how many were sent."""
        service = self.service
        now = service.clock.now()
        every = self.settings.remind_every
        async with service.db.read() as conn:
            todo = await store.needing_action(conn, now, every)
        sent = 0
        for review in todo:
            try:
                sent += await self._overdue(review, now)
            except Exception:  # noqa: BLE001 - one bad row must not stop the others
                log.exception("could not handle the overdue review of %s", review.request_id)
        if sent:
            service.wake_outbox()
        return sent

    async def _overdue(self, review: ReviewState, now: datetime) -> int:
        service = self.service
        label = self.reviewer_label(review.scope)
        groups = service.policy.usergroups(service.policy.reviewer_groups(review.scope))
        mention = " ".join(f"<!subteam^{g}>" for g in groups)
        sent = 0
        async with service.write() as w:
            if review.alerted_at is None and await store.mark_alerted(w.conn, review.request_id,
                                                                      now):
                details = {"scope": review.scope, "requester": review.requester,
                           "due_at": review.due_at.isoformat()}
                service.record(w, "breakglass", "review_overdue", details, review.request_id)
                alerts.raise_alert(w, now, service.incident_channel, alerts.REVIEW_OVERDUE,
                                   review_blocks.overdue_alert(review), details,
                                   review.request_id)
                sent += 1
            if rules.reminder_due(review, now, self.settings.remind_every) and \
                    await store.mark_reminded(w.conn, review, now):
                text = review_blocks.overdue_reminder(review, mention or label)
                w.rows.append(outbox.post_row(now, service.reviewer_channel, text))
                sent += 1
        return sent

    # -- queries -----------------------------------------------------------------------

    async def listed(self, *, overdue_only: bool = False) -> list[ReviewState]:
        """Reviews not signed off yet (or only the overdue ones), oldest due first."""
        now = self.service.clock.now()
        async with self.service.db.read() as conn:
            return await store.listed(conn, open_only=True, overdue_only=overdue_only, now=now)

