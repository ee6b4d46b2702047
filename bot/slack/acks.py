"""What Slack is answered at once: the acknowledgement of a command or a click.

Slack waits for this answer (3 s, then an error for the user); nothing else
does. So over HTTP, a slash command or a button click is answered from here,
before Bolt runs its listeners, which then do the work in the background
(`Runtime.dispatch_later`). The listeners send the same acknowledgement
through Bolt's `ack()` (it is what Socket Mode returns); both come from here.

A modal submission is not answered here: its answer may be a validation
error that needs the policy and the trigger probes.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from ..core import commands
from ..core.commands import Command, CommandError
from .blocks import escape

COMMAND = "/breakglass"


def unescape(text: str) -> str:
    """Slack escapes &, < and > in command text; the Block Kit builders escape them again."""
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def parse(text: str, incident_pattern: str,
          scopes: Collection[str] = ()) -> Command | CommandError:
    try:
        return commands.parse_command(unescape(text), incident_pattern, scopes)
    except CommandError as exc:
        return exc


def command_ack(parsed: Command | CommandError) -> dict[str, Any]:
    """Keyword arguments for Bolt's `ack()`: an ephemeral line, or nothing (the form opens)."""
    # The person's own words come back in these lines: escaped, they ping nobody.
    if isinstance(parsed, CommandError):
        text = escape(str(parsed))
    elif isinstance(parsed, commands.Help):
        text = commands.USAGE
        if parsed.unknown is not None:
            text = (f"`{escape(parsed.unknown)}` is not a /breakglass command, and no scope is "
                    f"called so. Here is what there is:\n{text}")
    elif isinstance(parsed, commands.OpenModal):
        return {}
    elif isinstance(parsed, commands.ListScopes):
        text = "Checking the scopes you may request…"
    elif isinstance(parsed, commands.Status):
        text = "Looking up your requests…"
    elif isinstance(parsed, commands.Revoke):
        text = f"Revoking {escape(parsed.target)}…"
    elif isinstance(parsed, commands.Drill):
        text = f"DRILL: checking `{escape(parsed.scope)}` and its trigger conditions…"
    elif isinstance(parsed, commands.Review):
        text = f"Signing off the review of {escape(parsed.target)}…"
    elif isinstance(parsed, commands.Tokens):
        text = "Listing live grants…"
    else:
        text = f"Checking `{escape(parsed.scope)}` and its trigger conditions…"
    return {"text": text, "response_type": "ephemeral"}


def immediate(form: dict[str, list[str]], payload: dict[str, Any] | None,
              incident_pattern: str, scopes: Collection[str] = ()) -> dict[str, Any] | None:
    """The answer for an HTTP request that needs no listener to decide it, or None.

    `form` is the parsed body; `payload` the parsed interaction payload, if any.
    The body is what Bolt would send for the same `ack()`: {} is an empty 200."""
    if payload is None:
        if form.get("command", [""])[0] == COMMAND and form.get("user_id", [""])[0]:
            return command_ack(parse(form.get("text", [""])[0], incident_pattern, scopes))
        return None
    if payload.get("type") == "block_actions":
        return {}  # every button is acknowledged with an empty 200
    return None
