"""At start: is the bot in the channels the policy names? (issue 13, item 14)

A bot that is not in the reviewer channel cannot post approval cards there, and one not
in the incident channel cannot announce anything: every such message would be
dead-lettered (`not_in_channel`). `serve` asks Slack (`conversations.info`, scopes
`channels:read` and `groups:read`) once at start and logs a WARNING per problem naming
the channel and what to do. It is a warning, not a refusal to start: the bot's token
endpoints (introspection, revocation, JWKS) keep serving live tokens, and a restart in
the middle of an incident must not take them away. Messages that could not be posted
wait as dead letters; after `/invite @breakglass`, `breakglass outbox retry` sends them.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from slack_sdk.errors import SlackApiError

log = logging.getLogger(__name__)

INVITE = "/invite @breakglass"


async def problems(client: Any, channels: dict[str, str], timeout: float = 5.0) -> list[str]:
    """One line per channel (policy key -> channel ID) the bot cannot post to, or that
    could not be checked. Never raises: a check that fails is a problem line too."""
    found = await asyncio.gather(*(_check(client, key, channel, timeout)
                                   for key, channel in channels.items()))
    return [line for line in found if line is not None]


async def _check(client: Any, key: str, channel: str, timeout: float) -> str | None:
    where = f"slack.{key} {channel!r}"
    try:
        answer = await asyncio.wait_for(client.conversations_info(channel=channel), timeout)
    except SlackApiError as exc:
        error = exc.response.get("error") if exc.response is not None else None
        if error == "channel_not_found":
            return (f"{where}: Slack knows no such channel, or it is private and the bot is not "
                    f"in it: write the channel's ID (C…, from View channel details), and type "
                    f"{INVITE} in the channel")
        if error == "missing_scope":
            return (f"{where}: could not check that the bot is in it (missing_scope): add the "
                    "channels:read and groups:read scopes (manifest.yml) and reinstall the app")
        return f"{where}: could not check that the bot is in it (Slack said {error})"
    except Exception as exc:  # noqa: BLE001 - Slack unreachable: say so, keep starting
        return f"{where}: could not check that the bot is in it ({type(exc).__name__})"
    info = answer.get("channel") or {}
    name = info.get("name")
    shown = f"{where} (#{name})" if name else where
    if info.get("is_archived"):
        return f"{shown} is archived: unarchive it, or put another channel's ID in the policy"
    if not info.get("is_member"):
        return (f"{shown}: the bot is not in this channel, so its messages there would be "
                f"dead-lettered: type {INVITE} in it (then `breakglass outbox retry`)")
    return None
