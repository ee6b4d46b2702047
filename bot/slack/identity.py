"""Which workspace and app this bot is: learned from `auth.test` at start, and every
Slack payload from another one is refused (issue 13, item 10).

The signing secret belongs to the app, not to a workspace: an app installed in two
workspaces (or a secret reused across apps) signs both workspaces' requests alike. So
a signed payload is acted on only when its team is the bot token's team (or, for an
Enterprise Grid org-wide install, its enterprise is the token's), and its app, when
both sides name one, is the token's app. Anything else is answered and dropped: it
changes nothing and counts for nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from slack_sdk.web.async_client import AsyncWebClient

log = logging.getLogger(__name__)

NOT_OURS = ("This breakglass serves another Slack workspace or app; nothing was done. "
            "Use the breakglass installed in your own workspace.")
NOT_YET = ("breakglass has not yet confirmed which Slack workspace it serves (Slack's "
           "auth.test did not answer); nothing was done. Try again in a minute.")


@dataclass(frozen=True)
class Identity:
    team_id: str
    app_id: str | None = None
    enterprise_id: str | None = None
    enterprise_install: bool = False

    @classmethod
    def from_auth_test(cls, answer: Mapping[str, Any]) -> Identity:
        return cls(team_id=str(answer.get("team_id") or ""),
                   app_id=_str_or_none(answer.get("app_id")),
                   enterprise_id=_str_or_none(answer.get("enterprise_id")),
                   enterprise_install=bool(answer.get("is_enterprise_install")))

    def accepts(self, sender: Sender) -> bool:
        """True when the payload comes from this bot's own workspace and app."""
        if self.app_id and sender.app_id and sender.app_id != self.app_id:
            return False
        if sender.team_id and sender.team_id == self.team_id:
            return True
        return bool(self.enterprise_install and self.enterprise_id
                    and sender.enterprise_id == self.enterprise_id)


@dataclass(frozen=True)
class Sender:
    """The team, enterprise and app a payload says it comes from."""

    team_id: str | None
    enterprise_id: str | None
    app_id: str | None


def sender_of(form: Mapping[str, Any], payload: Mapping[str, Any] | None) -> Sender:
    """From a slash command's fields (`form`, values as parse_qs or Bolt gives them) or
    an interaction payload."""
    if payload is None:
        return Sender(_field(form, "team_id"), _field(form, "enterprise_id"),
                      _field(form, "api_app_id"))
    team = payload.get("team") if isinstance(payload.get("team"), Mapping) else {}
    enterprise = (payload.get("enterprise")
                  if isinstance(payload.get("enterprise"), Mapping) else {})
    view = payload.get("view") if isinstance(payload.get("view"), Mapping) else {}
    team_id = _str_or_none(team.get("id")) or _str_or_none(view.get("team_id"))
    app_id = _str_or_none(payload.get("api_app_id")) or _str_or_none(view.get("app_id"))
    return Sender(team_id, _str_or_none(enterprise.get("id")), app_id)


def sender_of_bolt_body(body: Mapping[str, Any]) -> Sender:
    """The same, from the body Bolt hands a middleware (a command's fields as strings,
    or the interaction payload itself)."""
    if "command" in body and "type" not in body:
        return sender_of(body, None)
    return sender_of({}, body)


async def learn(client: AsyncWebClient, timeout: float = 5.0) -> Identity:
    answer = await asyncio.wait_for(client.auth_test(), timeout)
    identity = Identity.from_auth_test(answer.data if hasattr(answer, "data") else answer)
    if not identity.team_id:
        raise ValueError("auth.test named no team_id")
    return identity


def _field(form: Mapping[str, Any], name: str) -> str | None:
    value = form.get(name)
    if isinstance(value, list):
        value = value[0] if value else None
    return _str_or_none(value)


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None
