"""The ``/breakglass`` command grammar (contract section 3).

``parse_command`` turns the text after ``/breakglass`` into one of a few small
frozen dataclasses, or raises :class:`CommandError` whose text says what was
wrong and shows how to write it. Whether a scope may be requested is the
service's question; given the policy's scope names, an incomplete request for a
scope that does not exist is answered with that first.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Collection
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeAlias

from bot.core.durations import DurationError, parse_duration

__all__ = [
    "DEFAULT_INCIDENT_PATTERN",
    "DRILL_REASON",
    "EXAMPLE",
    "MAX_REASON_LENGTH",
    "NOT_SCOPE_WORDS",
    "RESERVED_WORDS",
    "USAGE",
    "Command",
    "CommandError",
    "Drill",
    "Help",
    "ListScopes",
    "OpenModal",
    "RequestAccess",
    "Review",
    "Revoke",
    "Status",
    "Tokens",
    "extract_incident",
    "incident_regex",
    "normalize_reason",
    "parse_command",
]

#: What an incident reference looks like unless the policy says otherwise.
DEFAULT_INCIDENT_PATTERN = r"[A-Z][A-Z0-9]+-\d+"

#: Longest reason accepted, in characters, after whitespace is collapsed.
MAX_REASON_LENGTH = 500

#: First words that are subcommands, so they can never be scope names.
RESERVED_WORDS = frozenset({"help", "scopes", "status", "revoke", "drill", "review", "tokens"})

#: First words people type meaning a subcommand that does not exist (or asking for help):
#: answered with the usage, unless a scope has that name (a scope may: the contract
#: reserves only :data:`RESERVED_WORDS`; `check-policy` warns about such a scope).
NOT_SCOPE_WORDS = frozenset({
    "list", "ls", "show", "get", "mine", "my", "me", "info", "usage", "version", "commands",
    "request", "requests", "new", "cancel", "approve", "deny", "token", "?", "h", "-h",
    "--help", "man", "whoami", "history",
})

#: The reason of a drill started without one.
DRILL_REASON = "drill"

_EXAMPLE_SCOPE = "payments-write"
_EXAMPLE_REST = "30m INC-4521 auth provider down"

#: A complete request, as shown in error messages.
EXAMPLE = f"`/breakglass {_EXAMPLE_SCOPE} {_EXAMPLE_REST}`"

USAGE = "\n".join(
    [
        "*Usage*",
        "• `/breakglass SCOPE DURATION REASON…` – request SCOPE for DURATION "
        "(like 90s, 15m, 1h or 1h30m); start REASON with the incident reference, "
        f"e.g. {EXAMPLE}",
        "• `/breakglass` – open a form with the same fields",
        "• `/breakglass scopes` – the scopes you may request, with their live trigger state",
        "• `/breakglass status` – your pending requests and active tokens",
        "• `/breakglass revoke ID` – revoke a token or cancel a request "
        "(ID: the request ID, or the token's jti)",
        "• `/breakglass drill SCOPE [REASON…]` – rehearse the whole flow for SCOPE; "
        "approvers approve as for real, and the token works for no service",
        "• `/breakglass review ID SUMMARY…` – sign off the post-incident review of a grant "
        "that ended (reviewers only, never its requester)",
        "• `/breakglass tokens` – every live grant (approvers and reviewers only)",
        "• `/breakglass help` – this message",
    ]
)


class CommandError(ValueError):
    """The command text cannot be used; ``str()`` is a message for the user."""


@dataclass(frozen=True, slots=True)
class Help:
    """``/breakglass help``: show :data:`USAGE`. ``unknown`` is the word typed when it was
    none of the subcommands but one of :data:`NOT_SCOPE_WORDS` (``/breakglass list``)."""

    unknown: str | None = None


@dataclass(frozen=True, slots=True)
class ListScopes:
    """``/breakglass scopes``."""


@dataclass(frozen=True, slots=True)
class Status:
    """``/breakglass status``."""


@dataclass(frozen=True, slots=True)
class OpenModal:
    """``/breakglass`` with no text: open the request form."""


@dataclass(frozen=True, slots=True)
class Revoke:
    """``/breakglass revoke ID``; ``target`` is the ID exactly as typed."""

    target: str


@dataclass(frozen=True, slots=True)
class Review:
    """``/breakglass review ID SUMMARY…``; ``target`` is the request ID or the token's jti."""

    target: str
    summary: str


@dataclass(frozen=True, slots=True)
class Tokens:
    """``/breakglass tokens``: every live grant."""


@dataclass(frozen=True, slots=True)
class RequestAccess:
    """``/breakglass SCOPE DURATION REASON…``.

    ``scope`` is lowercased but not checked against the policy. ``reason`` is
    the whole reason (incident reference included) with whitespace collapsed.
    """

    scope: str
    duration: timedelta
    reason: str
    incident: str | None


@dataclass(frozen=True, slots=True)
class Drill:
    """``/breakglass drill SCOPE [REASON…]``: a rehearsal of the whole flow.

    ``reason`` is :data:`DRILL_REASON` when none was given; the token's lifetime is
    the policy's default, so there is no duration.
    """

    scope: str
    reason: str
    incident: str | None


Command: TypeAlias = (Help | ListScopes | Status | OpenModal | Revoke | Review | Tokens
                      | RequestAccess | Drill)


@functools.lru_cache(maxsize=32)
def incident_regex(pattern: str) -> re.Pattern[str]:
    """``pattern`` compiled as :func:`extract_incident` uses it (re.error if invalid)."""
    # The reference must be a whole word: no word character right after it.
    return re.compile(rf"(?:{pattern})(?!\w)")


def extract_incident(reason: str, pattern: str = DEFAULT_INCIDENT_PATTERN) -> str | None:
    """The incident reference at the very start of ``reason``, if there is one.

    ``INC-4521 auth down`` and ``INC-4521: auth down`` give ``INC-4521``;
    ``auth down INC-4521`` and ``INC-4521x`` give ``None``. ``pattern`` is a
    regular expression (the policy's ``requests.incident_pattern``).
    """
    match = incident_regex(pattern).match(reason.lstrip())
    return match.group(0) if match else None


def normalize_reason(text: str) -> str:
    """Strip and collapse every run of whitespace to one space."""
    return " ".join(text.split())


def _example_for(scope: str) -> str:
    return f"`/breakglass {scope} {_EXAMPLE_REST}`"


def _no_arguments(word: str, args: list[str]) -> None:
    if args:
        raise CommandError(
            f"`/breakglass {word}` takes no arguments. Type `/breakglass help` for every form."
        )


def _looks_like_duration(word: str) -> bool:
    try:
        parse_duration(word.lower())
    except DurationError:
        return False
    return True


def _drill(args: list[str], incident_pattern: str) -> Drill:
    if not args:
        raise CommandError(
            "Say which scope to rehearse: `/breakglass drill SCOPE [REASON…]`, e.g. "
            f"`/breakglass drill {_EXAMPLE_SCOPE} quarterly drill`. "
            "`/breakglass scopes` lists the scopes you may request."
        )
    scope = args[0].lower()
    if scope in RESERVED_WORDS or _looks_like_duration(scope):
        raise CommandError(
            f"`{args[0]}` is not a scope. Write `/breakglass drill SCOPE [REASON…]`, e.g. "
            f"`/breakglass drill {_EXAMPLE_SCOPE} quarterly drill` (a drill takes no duration)."
        )
    reason = normalize_reason(" ".join(args[1:])) or DRILL_REASON
    if len(reason) > MAX_REASON_LENGTH:
        raise CommandError(
            f"The reason is {len(reason)} characters long; keep it to {MAX_REASON_LENGTH} "
            "or fewer."
        )
    return Drill(scope=scope, reason=reason, incident=extract_incident(reason, incident_pattern))


def parse_command(text: str, incident_pattern: str = DEFAULT_INCIDENT_PATTERN,
                  scopes: Collection[str] = ()) -> Command:
    """Parse the text Slack sends after ``/breakglass``. ``scopes``: the policy's scope
    names; a word of :data:`NOT_SCOPE_WORDS` that is one of them is that scope.

    Raises :class:`CommandError` (and nothing else, whatever ``text`` is) when
    the text cannot be used. ``incident_pattern`` must be a valid regular
    expression; the policy makes sure of that.
    """
    words = text.split()
    if not words:
        return OpenModal()
    first, args = words[0], words[1:]
    keyword = first.lower()

    if keyword == "help":
        return Help()
    if keyword == "scopes":
        _no_arguments(keyword, args)
        return ListScopes()
    if keyword == "status":
        _no_arguments(keyword, args)
        return Status()
    if keyword == "revoke":
        if len(args) != 1:
            what = "Say which token or request to revoke" if not args else "Revoke one ID at a time"
            raise CommandError(
                f"{what}: `/breakglass revoke ID`, with the request ID from the token "
                "message, the approval card or `/breakglass status`, or the token's jti."
            )
        return Revoke(target=args[0])
    if keyword == "drill":
        return _drill(args, incident_pattern)
    if keyword == "tokens":
        _no_arguments(keyword, args)
        return Tokens()
    if keyword == "review":
        if not args:
            raise CommandError(
                "Say which grant you review and what happened: `/breakglass review ID SUMMARY…`, "
                "with the ID from the review thread under the approval card."
            )
        summary = " ".join(text.split(None, 2)[2:]).strip()
        if not summary:
            raise CommandError(
                f"A review needs a summary: `/breakglass review {args[0]} what happened, what "
                "the access was used for, what follows`."
            )
        return Review(target=args[0], summary=summary)
    if keyword in NOT_SCOPE_WORDS and keyword not in scopes:
        return Help(unknown=first)

    try:
        return _request(first, args, incident_pattern)
    except CommandError:
        # A form that is incomplete and names a scope the policy does not have: say
        # that first (the example would name the missing scope again). A complete
        # one goes on to the service, which refuses it (and audits the refusal).
        known = {name.lower() for name in scopes}
        if known and keyword not in known and not _looks_like_duration(first):
            names = ", ".join(f"`{n}`" for n in sorted(scopes))
            raise CommandError(
                f"There is no scope `{first}`. Scopes: {names}. `/breakglass scopes` lists the "
                f"ones you may request; a request reads {EXAMPLE}."
            ) from None
        raise


def _request(first: str, args: list[str], incident_pattern: str) -> RequestAccess:
    """``/breakglass SCOPE DURATION REASON…`` (the scope not checked here)."""
    scope = first.lower()
    if not args:
        if _looks_like_duration(first):
            raise CommandError(
                f"Start with the scope, then the duration and the reason: {EXAMPLE}. "
                "`/breakglass scopes` lists the scopes you may request."
            )
        raise CommandError(f"A duration and a reason are required: {_example_for(scope)}")

    duration_word = args[0]
    try:
        duration = parse_duration(duration_word.lower())
    except DurationError as exc:
        if _looks_like_duration(first):
            raise CommandError(
                f"Start with the scope, then the duration and the reason: {EXAMPLE}"
            ) from None
        said = str(exc).replace(f"'{duration_word.lower()}'", f"'{duration_word}'", 1)  # as typed
        raise CommandError(f"{said}. For example: {_example_for(scope)}") from None

    reason = normalize_reason(" ".join(args[1:]))
    if not reason:
        raise CommandError(f"A reason is required: {_example_for(scope)}")
    if len(reason) > MAX_REASON_LENGTH:
        raise CommandError(
            f"The reason is {len(reason)} characters long; keep it to {MAX_REASON_LENGTH} "
            "or fewer and put the details in the incident."
        )
    return RequestAccess(
        scope=scope,
        duration=duration,
        reason=reason,
        incident=extract_incident(reason, incident_pattern),
    )
