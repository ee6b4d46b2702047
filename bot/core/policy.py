"""The policy file (contract section 2): TOML in, frozen pydantic models out.

``parse_policy`` / ``load_policy`` either return a :class:`Policy` whose every
cross-reference holds, or raise :class:`PolicyError` listing *every* problem,
each as ``key.path: what is wrong`` with TOML key paths, e.g.::

    scopes.db-admin.approvers: unknown group 'leads' (defined groups: oncall, sre-leads)
    tokens.max_ttl: '1x' is not a duration: write it like 90s, 15m, 1h or 1h30m
    slack: missing required section
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from datetime import date, datetime, time, timedelta
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    WithJsonSchema,
    model_validator,
)
from pydantic_core import PydanticCustomError

from bot.core import client_secrets
from bot.core.alerts import QuietHours, QuietHoursError, parse_quiet_hours
from bot.core.commands import (
    DEFAULT_INCIDENT_PATTERN,
    RESERVED_WORDS,
    incident_regex,
)
from bot.core.durations import (
    MAX_DURATION,
    DurationError,
    format_duration,
    format_period,
    parse_duration,
    parse_period,
)
from bot.core.events import WEBHOOK_EVENTS
from bot.core.tokens import DRILL_AUDIENCE

__all__ = [
    "AlertSettings",
    "Client",
    "DrillSettings",
    "Group",
    "Policy",
    "PolicyError",
    "RequestSettings",
    "ReviewSettings",
    "Scope",
    "SlackSettings",
    "TokenSettings",
    "Trigger",
    "Webhook",
    "load_policy",
    "parse_policy",
    "validate_policy",
]

_SECTIONS = frozenset({"slack", "tokens", "requests", "groups", "triggers", "scopes", "clients",
                       "alerts", "webhooks", "drills", "reviews"})
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")
_USER_ID = re.compile(r"[UW][A-Z0-9]{2,}")
_USERGROUP_ID = re.compile(r"S[A-Z0-9]{2,}")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
WEBHOOK_MAX_TIMEOUT = timedelta(seconds=10)
# RFC 6749 section 3.3 scope-token: printable ASCII except space, '"' and '\'.
_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_SHOWN_CHARS = 60
_REFERENCES = "breakglass_references"
_NO_SCOPES = "scopes: define at least one scope"


class PolicyError(Exception):
    """The policy cannot be used. ``errors`` lists every problem found.

    Each entry reads ``key.path: what is wrong`` (or ``<file>: ...`` for a
    file that cannot be read or is not TOML); ``str()`` joins them with
    newlines.
    """

    def __init__(self, errors: Sequence[str] | str, source: str | None = None) -> None:
        self.errors: list[str] = [errors] if isinstance(errors, str) else list(errors)
        self.source = source
        super().__init__("\n".join(self.errors))


# --------------------------------------------------------------------------
# Field types. Every custom check raises a PydanticCustomError whose message
# is already user-facing; _convert() below turns the rest into plain words.


def _problem(message: str) -> PydanticCustomError:
    # The message goes through the context so braces in user input are safe.
    return PydanticCustomError("breakglass_value", "{message}", {"message": message})


def _shown(value: object) -> str:
    if isinstance(value, str):
        text = value if len(value) <= _SHOWN_CHARS else value[: _SHOWN_CHARS - 1] + "…"
        return f"'{text}'"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, datetime | date | time):
        return "a date/time"
    return type(value).__name__


def _to_duration(value: object) -> timedelta:
    if isinstance(value, timedelta):
        if value <= timedelta(0):
            raise _problem("duration must be longer than 0s")
        if value > MAX_DURATION:
            raise _problem(f"duration must be at most {format_duration(MAX_DURATION)}")
        return value
    if isinstance(value, str):
        try:
            return parse_duration(value)
        except DurationError as exc:
            raise _problem(str(exc)) from None
    raise _problem(f'must be a duration in quotes, like "15m" (got {_shown(value)})')


def _to_optional_duration(value: object) -> timedelta | None:
    return None if value is None else _to_duration(value)


_DURATION_SCHEMA = WithJsonSchema({"type": "string", "pattern": r"^(\d+h)?(\d+m)?(\d+s)?$"})
Duration = Annotated[timedelta, PlainValidator(_to_duration), _DURATION_SCHEMA]


def _to_period(value: object) -> timedelta:
    if isinstance(value, str):
        try:
            return parse_period(value)
        except DurationError as exc:
            raise _problem(str(exc)) from None
    raise _problem(f'must be a period in quotes, like "30d" (got {_shown(value)})')


Period = Annotated[
    timedelta,
    PlainValidator(_to_period),
    WithJsonSchema({"type": "string", "pattern": r"^(\d+d)?(\d+h)?(\d+m)?(\d+s)?$"}),
]
OptionalDuration = Annotated[
    timedelta | None, PlainValidator(_to_optional_duration), _DURATION_SCHEMA
]


def _non_empty(value: str) -> str:
    if not value.strip():
        raise _problem("must not be empty")
    return value


def _no_whitespace(value: str) -> str:
    if not value:
        raise _problem("must not be empty")
    if any(ch.isspace() for ch in value):
        raise _problem(f"{_shown(value)} must not contain spaces")
    return value


def _user_id(value: str) -> str:
    if not _USER_ID.fullmatch(value):
        raise _problem(f"{_shown(value)} is not a Slack user ID (like U01ABCDEF)")
    return value


def _usergroup_id(value: str | None) -> str | None:
    if value is not None and not _USERGROUP_ID.fullmatch(value):
        raise _problem(f"{_shown(value)} is not a Slack user group ID (like S01ABCDEF)")
    return value


def _sha256_hex(value: str) -> str:
    if not _SHA256_HEX.fullmatch(value):
        raise _problem(
            "must be the SHA-256 of the client secret as 64 lowercase hex characters "
            "(e.g. the output of `printf %s SECRET | sha256sum`)"
        )
    return value


def _sha256_hex_or_none(value: str | None) -> str | None:
    return None if value is None else _sha256_hex(value)


def _secret_hash(value: str | None) -> str | None:
    if value is not None:
        try:
            client_secrets.parse(value)
        except client_secrets.SecretHashError as exc:
            raise _problem(str(exc)) from None
    return value


def _http_url(value: str) -> str:
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise _problem(f"{_shown(value)} is not an http:// or https:// URL")
    if any(ch.isspace() for ch in value):
        raise _problem(f"{_shown(value)} must not contain spaces")
    return value


def is_loopback_host(host: str) -> bool:
    """localhost, 127.0.0.0/8 or ::1."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _webhook_url(value: str) -> str:
    value = _http_url(value)
    parts = urlsplit(value)
    if parts.scheme != "https" and not is_loopback_host(parts.hostname or ""):
        raise _problem(
            f"{_shown(value)} is not https: a webhook carries audit events, so it must use "
            "https:// (plain http:// only to a loopback address: 127.0.0.1, ::1, localhost)"
        )
    if parts.username or parts.password:
        raise _problem(
            f"{_shown(parts.scheme + '://' + (parts.hostname or ''))}…: no user or password in "
            "the URL; the webhook is authenticated by its signature (secret_env)"
        )
    return value


def _env_name(value: str) -> str:
    if not _ENV_NAME.fullmatch(value):
        raise _problem(
            f"{_shown(value)} is not an environment variable name: write the name of the "
            "variable that holds the value (like BREAKGLASS_WEBHOOK_SECRET), not the value"
        )
    return value


def _webhook_events(values: list[str]) -> list[str]:
    _distinct(values)
    for value in values:
        if value not in WEBHOOK_EVENTS:
            raise _problem(
                f"unknown event {_shown(value)}: events are {', '.join(sorted(WEBHOOK_EVENTS))}"
            )
    return values


def _quiet_hours(value: object) -> QuietHours | None:
    if value is None or isinstance(value, QuietHours):
        return value
    if not isinstance(value, str):
        raise _problem(f'must be a time range in quotes, like "22:00-06:00" (got {_shown(value)})')
    try:
        return parse_quiet_hours(value)
    except QuietHoursError as exc:
        raise _problem(str(exc)) from None


def _webhook_timeout(value: object) -> timedelta:
    duration = _to_duration(value)
    if duration > WEBHOOK_MAX_TIMEOUT:
        raise _problem(f"at most {format_duration(WEBHOOK_MAX_TIMEOUT)} (a delivery's lease "
                       "must outlast it)")
    return duration


def _permission(value: str) -> str:
    if not _SCOPE_TOKEN.fullmatch(value):
        raise _problem(
            f"{_shown(value)} is not a permission: use printable ASCII with no spaces, "
            "quotes or backslashes (like payments:write)"
        )
    return value


def _distinct(values: list[str]) -> list[str]:
    seen: set[str] = set()
    for value in values:
        if value in seen:
            raise _problem(f"'{value}' is listed more than once")
        seen.add(value)
    return values


def _regex(value: str) -> str:
    try:
        compiled = incident_regex(value)
    except (re.error, RecursionError, OverflowError) as exc:
        raise _problem(f"{_shown(value)} is not a valid regular expression: {exc}") from None
    if compiled.match("") is not None:
        raise _problem(f"{_shown(value)} matches an empty string; it must match a reference")
    return value


def _name_check(kind: str) -> AfterValidator:
    def check(value: str) -> str:
        if not _NAME.fullmatch(value):
            raise _problem(
                f"{_shown(value)} is not a valid {kind} name: use lowercase letters, digits, "
                "'-' and '_', starting with a letter or digit"
            )
        if kind == "scope" and value in RESERVED_WORDS:
            raise _problem(
                f"'{value}' is a /breakglass subcommand, so it cannot be a scope name; pick another"
            )
        return value

    return AfterValidator(check)


def _client_name(value: str) -> str:
    if not value or ":" in value or any(ch.isspace() or not ch.isprintable() for ch in value):
        raise _problem(
            f"{_shown(value)} is not a valid client name: it is the HTTP Basic user name, "
            "so no ':' or spaces"
        )
    return value


NonEmptyStr = Annotated[str, AfterValidator(_non_empty)]
Token = Annotated[str, AfterValidator(_no_whitespace)]
UserId = Annotated[str, AfterValidator(_user_id)]
UsergroupId = Annotated[str | None, AfterValidator(_usergroup_id)]
HttpUrl = Annotated[str, AfterValidator(_http_url)]
Permission = Annotated[str, AfterValidator(_permission)]
ScopeName = Annotated[str, _name_check("scope")]
GroupName = Annotated[str, _name_check("group")]
TriggerName = Annotated[str, _name_check("trigger")]
ClientName = Annotated[str, AfterValidator(_client_name)]


class _Model(BaseModel):
    # strict: TOML has real types, so "2" is not a quorum and 1.0 is not a count.
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


# --------------------------------------------------------------------------
# The sections.


class SlackSettings(_Model):
    """``[slack]``: where cards and alerts go (channel IDs)."""

    reviewer_channel: Token
    incident_channel: Token


class TokenSettings(_Model):
    """``[tokens]``: how tokens are signed and handed over."""

    issuer: NonEmptyStr
    algorithm: Literal["RS256", "ES256", "EdDSA"] = "RS256"
    delivery: Literal["reveal", "message"] = "reveal"
    default_ttl: Duration = timedelta(minutes=15)
    """Lifetime when a request names none; when left out, at most ``max_ttl``."""
    max_ttl: Duration = timedelta(hours=1)
    warn_before: Duration = timedelta(minutes=5)
    """The requester is told this long before a token expires (a token that lives no
    longer than this gets no warning: its DM already says when it ends)."""

    @model_validator(mode="before")
    @classmethod
    def _default_within_max(cls, data: Any) -> Any:
        # An unwritten default_ttl follows a max_ttl set below 15m rather than
        # being reported as an error about a key the file does not contain.
        if isinstance(data, dict) and "default_ttl" not in data and "max_ttl" in data:
            try:
                ceiling = _to_duration(data["max_ttl"])
            except PydanticCustomError:
                return data
            if ceiling < timedelta(minutes=15):
                return {**data, "default_ttl": ceiling}
        return data


class RequestSettings(_Model):
    """``[requests]`` (optional): request lifetime, reminders, rate limit."""

    expire_after: Duration = timedelta(minutes=30)
    escalate_after: OptionalDuration = None
    rate_limit: int = Field(default=5, ge=1)
    """Most requests one user may make within ``rate_window``."""
    rate_window: Duration = timedelta(minutes=10)
    incident_pattern: Annotated[str, AfterValidator(_regex)] = DEFAULT_INCIDENT_PATTERN


class Group(_Model):
    """``[groups.NAME]``: static Slack user IDs and/or a live Slack user group."""

    members: Annotated[list[UserId], AfterValidator(_distinct)] = Field(default_factory=list)
    usergroup: UsergroupId = None

    @model_validator(mode="after")
    def _has_someone(self) -> Group:
        if not self.members and self.usergroup is None:
            raise _problem("a group needs members (Slack user IDs) or a usergroup")
        return self


class Trigger(_Model):
    """``[triggers.NAME]``: an HTTP probe that must hold for a request."""

    description: str
    http: HttpUrl
    holds_when: Literal["down", "up"] = "down"
    timeout: Duration = timedelta(seconds=2)


class Scope(_Model):
    """``[scopes.NAME]``: what may be requested, by whom, approved by whom."""

    description: str
    audience: Token
    permissions: list[Permission] = Field(min_length=1)
    requesters: list[str] = Field(min_length=1)
    approvers: list[str] = Field(min_length=1)
    quorum: int = Field(default=1, ge=1)
    max_ttl: OptionalDuration = None
    triggers: list[str] = Field(default_factory=list)
    fallback_approvers: list[str] = Field(default_factory=list)
    """Groups whose clicks count once the request is escalated (``requests.escalate_after``)."""


class DrillSettings(_Model):
    """``[drills]`` (optional): how often each scope should be rehearsed."""

    every: Period | None = None


class Client(_Model):
    """``[clients.NAME]``: a relying service allowed to introspect and revoke. Its secret
    is stored as `secret_hash` (scrypt, `breakglass hash-secret`), or, the older way,
    `secret_sha256`; exactly one of the two."""

    secret_hash: Annotated[str | None, AfterValidator(_secret_hash)] = None
    secret_sha256: Annotated[str | None, AfterValidator(_sha256_hex_or_none)] = None
    audiences: list[Token] = Field(min_length=1)

    @model_validator(mode="after")
    def _one_secret(self) -> Client:
        if (self.secret_hash is None) == (self.secret_sha256 is None):
            raise _problem("a client needs exactly one of secret_hash (from `breakglass "
                           "hash-secret`) or secret_sha256 (the older, fast hash)")
        return self

    @property
    def credential(self) -> str:
        """The stored form of its secret, whichever key holds it."""
        return self.secret_hash or self.secret_sha256 or ""


class AlertSettings(_Model):
    """``[alerts]`` (optional, contract §7.5): thresholds; an unset key raises no alert."""

    max_requests_per_day: int | None = Field(default=None, ge=1)
    """Per requester, all scopes, over the last 24 hours; each request past it alerts."""
    quiet_hours: Annotated[QuietHours | None, PlainValidator(_quiet_hours),
                           WithJsonSchema({"type": "string"})] = None
    """UTC window ("22:00-06:00"); a request or a token's first use inside it alerts."""
    max_uses_per_minute: int | None = Field(default=None, ge=1)
    """Per token; the use that passes it alerts (once per minute)."""
    refusals_per_hour: int | None = Field(default=None, ge=1)
    """Per person; the next refusal alerts, later ones are summarised once a minute."""
    membership_recheck: Duration = timedelta(seconds=60)
    """How often live tokens' holders are re-checked against the requester groups."""


class Webhook(_Model):
    """``[[webhooks]]`` (contract §7.6): where audited events are POSTed."""

    url: Annotated[str, AfterValidator(_webhook_url)]
    secret_env: Annotated[str | None, AfterValidator(lambda v: v if v is None else _env_name(v))] = None
    """The environment variable that holds the signing secret (never the secret itself)."""
    format: Literal["breakglass", "pagerduty"] = "breakglass"
    routing_key_env: Annotated[str | None,
                               AfterValidator(lambda v: v if v is None else _env_name(v))] = None
    """pagerduty: the environment variable that holds the integration's routing key."""
    events: Annotated[list[str], AfterValidator(_webhook_events)] = Field(min_length=1)
    timeout: Annotated[timedelta, PlainValidator(_webhook_timeout), _DURATION_SCHEMA] = (
        timedelta(seconds=5))
    """How long one POST may take before it counts as failed and is retried."""

    @model_validator(mode="after")
    def _format_keys(self) -> Webhook:
        if self.format == "breakglass" and self.secret_env is None:
            raise _problem("a webhook needs secret_env: the name of the environment variable "
                           "holding the secret its requests are signed with")
        if self.format == "pagerduty" and self.routing_key_env is None:
            raise _problem("format = \"pagerduty\" needs routing_key_env: the name of the "
                           "environment variable holding the PagerDuty integration key")
        if self.format != "pagerduty" and self.routing_key_env is not None:
            raise _problem("routing_key_env is only for format = \"pagerduty\"")
        return self


class ReviewSettings(_Model):
    """``[reviews]`` (optional): the post-incident review every ended grant needs."""

    due_after: Duration = timedelta(hours=24)
    """A grant not reviewed this long after it ended is overdue."""
    reviewers: list[str] | None = Field(default=None, min_length=1)
    """Groups who may sign a review off; default: the scope's approvers. Never the requester."""
    remind_every: OptionalDuration = None
    """Repeat the overdue reminder this often; unset: one reminder, when it becomes overdue."""
    hold_requests: bool = False
    """True: a requester with an overdue review is refused; false: the card warns."""


class Policy(_Model):
    """The whole policy file. Construct it with :func:`parse_policy`."""

    slack: SlackSettings
    tokens: TokenSettings
    requests: RequestSettings = Field(default_factory=RequestSettings)
    groups: dict[GroupName, Group]
    triggers: dict[TriggerName, Trigger] = Field(default_factory=dict)
    scopes: dict[ScopeName, Scope]
    clients: dict[ClientName, Client] = Field(default_factory=dict)
    alerts: AlertSettings = Field(default_factory=AlertSettings)
    webhooks: list[Webhook] = Field(default_factory=list)
    drills: DrillSettings = Field(default_factory=DrillSettings)
    reviews: ReviewSettings = Field(default_factory=ReviewSettings)

    @model_validator(mode="after")
    def _check_references(self) -> Policy:
        problems = [] if self.scopes else [_NO_SCOPES]
        problems += _webhook_duplicates(self.webhooks)
        problems += [
            f"reviews.reviewers: unknown group '{group}' ({_defined('group', self.groups)})"
            for group in self.reviews.reviewers or () if group not in self.groups]
        problems += _reference_errors(
            tokens=self.tokens,
            requests=self.requests,
            group_names=set(self.groups),
            groups=self.groups,
            trigger_names=set(self.triggers),
            scopes=self.scopes,
            clients=self.clients,
            audiences={scope.audience for scope in self.scopes.values()},
        )
        if problems:
            raise PydanticCustomError(
                _REFERENCES,
                "{summary}",
                {"summary": "; ".join(problems), "errors": tuple(problems)},
            )
        return self

    # -- helpers for the rest of the bot -----------------------------------

    def scope_named(self, name: str) -> Scope | None:
        """The scope called ``name`` (case-insensitive), or None."""
        return self.scopes.get(name.strip().lower())

    def static_members(self, group_names: Iterable[str]) -> frozenset[str]:
        """User IDs listed in ``members`` of these groups (unknown names add nobody).

        Members of a group's ``usergroup`` are not included: they are resolved
        live from Slack (see :meth:`usergroups`).
        """
        members: set[str] = set()
        for name in group_names:
            group = self.groups.get(name)
            if group is not None:
                members.update(group.members)
        return frozenset(members)

    def usergroups(self, group_names: Iterable[str]) -> tuple[str, ...]:
        """Distinct Slack user group IDs of these groups, in order."""
        found: list[str] = []
        for name in group_names:
            group = self.groups.get(name)
            if group is not None and group.usergroup and group.usergroup not in found:
                found.append(group.usergroup)
        return tuple(found)

    def reviewer_groups(self, scope_name: str) -> list[str]:
        """Groups whose members may sign off a review of a grant of ``scope_name``:
        ``[reviews] reviewers``, else the scope's approvers; for a scope no longer in the
        policy, every scope's approvers (so its review can still be signed off)."""
        if self.reviews.reviewers:
            return list(self.reviews.reviewers)
        scope = self.scope_named(scope_name)
        if scope is not None:
            return list(scope.approvers)
        return sorted({g for s in self.scopes.values() for g in s.approvers})

    def effective_ttl(self, scope: Scope, requested: timedelta | None) -> tuple[timedelta, bool]:
        """The lifetime a token for ``scope`` gets, and whether the request was cut.

        The lifetime is the smallest of ``requested`` (``tokens.default_ttl``
        when None), ``scope.max_ttl`` and ``tokens.max_ttl``. The flag is True
        only when an explicit ``requested`` was longer than that.
        """
        if requested is not None and requested <= timedelta(0):
            raise ValueError("requested duration must be longer than 0s")
        ceiling = self.tokens.max_ttl
        if scope.max_ttl is not None:
            ceiling = min(ceiling, scope.max_ttl)
        wanted = self.tokens.default_ttl if requested is None else requested
        ttl = min(wanted, ceiling)
        return ttl, requested is not None and ttl < requested

    def summary(self) -> str:
        """A few lines for ``breakglass check-policy``."""

        def counted(count: int, noun: str) -> str:
            return f"{count} {noun}" + ("" if count == 1 else "s")

        def group_text(name: str, group: Group) -> str:
            parts = []
            if group.members:
                parts.append(counted(len(group.members), "member"))
            if group.usergroup:
                parts.append(f"usergroup {group.usergroup}")
            return f"{name} ({', '.join(parts)})"

        def scope_text(name: str, scope: Scope) -> str:
            ttl = format_duration(scope.max_ttl or self.tokens.max_ttl)
            fallback = (f" with fallback {', '.join(scope.fallback_approvers)}"
                        if scope.fallback_approvers else "")
            return f"{name} (quorum {scope.quorum}, max {ttl}){fallback}"

        def names(items: Iterable[str]) -> str:
            listed = ", ".join(items)
            return f": {listed}" if listed else ""

        tokens = self.tokens
        requests = self.requests
        lines = [
            counted(len(self.scopes), "scope")
            + names(scope_text(n, s) for n, s in self.scopes.items()),
            counted(len(self.groups), "group")
            + names(group_text(n, g) for n, g in self.groups.items()),
            counted(len(self.triggers), "trigger") + names(self.triggers),
            counted(len(self.clients), "client") + names(self.clients),
            f"tokens: {tokens.algorithm}, {tokens.delivery} delivery, "
            f"default {format_duration(tokens.default_ttl)}, "
            f"max {format_duration(tokens.max_ttl)}, expiry warning "
            f"{format_duration(tokens.warn_before)} before, issuer {tokens.issuer}",
            f"requests: expire after {format_duration(requests.expire_after)}"
            + (
                f", escalate after {format_duration(requests.escalate_after)}"
                if requests.escalate_after
                else ""
            )
            + f", at most {requests.rate_limit} per user per "
            f"{format_duration(requests.rate_window)}",
            "drills: "
            + (f"every scope every {format_period(self.drills.every)}" if self.drills.every
               else "no schedule"),
            f"reviews: due {format_duration(self.reviews.due_after)} after a grant ends, "
            f"signed off by {', '.join(self.reviews.reviewers or ()) or 'each scope’s approvers'}"
            + (f", reminders every {format_duration(self.reviews.remind_every)}"
               if self.reviews.remind_every else "")
            + (", requests held while one is overdue" if self.reviews.hold_requests else ""),
        ]
        if self.webhooks:
            lines.append(counted(len(self.webhooks), "webhook") + names(
                f"{urlsplit(h.url).hostname} ({h.format}, {counted(len(h.events), 'event')})"
                for h in self.webhooks))
        set_alerts = [k for k in ("max_requests_per_day", "quiet_hours", "max_uses_per_minute",
                                  "refusals_per_hour") if getattr(self.alerts, k) is not None]
        if set_alerts:
            lines.append("alerts: " + ", ".join(f"{k} {getattr(self.alerts, k)}"
                                                for k in set_alerts))
        return "\n".join(lines)


# --------------------------------------------------------------------------
# Cross-references.


def _webhook_duplicates(webhooks: Sequence[Webhook]) -> list[str]:
    first: dict[str, int] = {}
    errors = []
    for i, hook in enumerate(webhooks):
        if hook.url in first:
            errors.append(f"webhooks[{i}].url: {_shown(hook.url)} is already webhooks"
                          f"[{first[hook.url]}]; list each URL once, with every event it needs")
        first.setdefault(hook.url, i)
    return errors


def _defined(kind: str, names: Iterable[str]) -> str:
    listed = sorted(names)
    return f"defined {kind}s: {', '.join(listed)}" if listed else f"no {kind}s defined"


def _reference_errors(
    *,
    tokens: TokenSettings | None,
    requests: RequestSettings | None,
    group_names: set[str],
    groups: Mapping[str, Group],
    trigger_names: set[str],
    scopes: Mapping[str, Scope],
    clients: Mapping[str, Client],
    audiences: set[str],
) -> list[str]:
    """Every broken cross-reference, as ``key.path: message``.

    ``group_names`` / ``trigger_names`` are every name defined in the file
    (valid or not); ``groups`` / ``scopes`` / ``clients`` hold only the
    entries that validated, so a broken entry is reported once, not again as
    a dangling reference.
    """
    errors: list[str] = []
    if tokens is not None and tokens.default_ttl > tokens.max_ttl:
        errors.append(
            f"tokens.default_ttl: {format_duration(tokens.default_ttl)} is above "
            f"tokens.max_ttl ({format_duration(tokens.max_ttl)})"
        )
    if (
        requests is not None
        and requests.escalate_after is not None
        and requests.escalate_after >= requests.expire_after
    ):
        errors.append(
            f"requests.escalate_after: {format_duration(requests.escalate_after)} is not "
            f"before requests.expire_after ({format_duration(requests.expire_after)})"
        )

    for name, scope in scopes.items():
        path = f"scopes.{_key(name)}"
        for field in ("requesters", "approvers", "fallback_approvers"):
            for group in getattr(scope, field):
                if group not in group_names:
                    errors.append(
                        f"{path}.{field}: unknown group '{group}' "
                        f"({_defined('group', group_names)})"
                    )
        if scope.audience == DRILL_AUDIENCE:
            errors.append(
                f"{path}.audience: '{DRILL_AUDIENCE}' is reserved for drill tokens, which no "
                "relying service accepts; pick the audience of the service this scope is for"
            )
        if scope.fallback_approvers and requests is not None and requests.escalate_after is None:
            errors.append(
                f"{path}.fallback_approvers: fallback approvers count only after "
                "requests.escalate_after, which is not set; set it (e.g. \"5m\") or remove "
                "fallback_approvers"
            )
        for trigger in scope.triggers:
            if trigger not in trigger_names:
                errors.append(
                    f"{path}.triggers: unknown trigger '{trigger}' "
                    f"({_defined('trigger', trigger_names)})"
                )
        if tokens is not None and scope.max_ttl is not None and scope.max_ttl > tokens.max_ttl:
            errors.append(
                f"{path}.max_ttl: {format_duration(scope.max_ttl)} is above "
                f"tokens.max_ttl ({format_duration(tokens.max_ttl)})"
            )
        approver_groups = list(dict.fromkeys(scope.approvers))
        if all(g in groups for g in approver_groups) and not any(
            groups[g].usergroup for g in approver_groups
        ):
            pool: set[str] = set()
            for g in approver_groups:
                pool.update(groups[g].members)
            if scope.quorum > len(pool):
                noun = "member" if len(pool) == 1 else "members"
                errors.append(
                    f"{path}.quorum: {scope.quorum} exceeds the {len(pool)} {noun} of "
                    f"approver groups [{', '.join(approver_groups)}]"
                )

    for name, client in clients.items():
        for audience in client.audiences:
            # A client may list the drill audience: its drill tokens still introspect inactive.
            if audience not in audiences and audience != DRILL_AUDIENCE:
                known = ", ".join(sorted(audiences)) or "none"
                errors.append(
                    f"clients.{_key(name)}.audiences: no scope has audience '{audience}' "
                    f"(scope audiences: {known})"
                )
    return errors


_M = TypeVar("_M", bound=BaseModel)


def _try(model: type[_M], raw: object) -> _M | None:
    try:
        return model.model_validate(raw)
    except ValidationError:
        return None


def _table(raw: object) -> dict[str, Any]:
    return raw if isinstance(raw, dict) else {}


def _partial_reference_errors(data: Mapping[str, Any]) -> list[str]:
    """Cross-reference errors of a policy that also has structural errors."""
    raw_groups = _table(data.get("groups"))
    raw_triggers = _table(data.get("triggers"))
    raw_scopes = _table(data.get("scopes"))
    raw_clients = _table(data.get("clients"))
    groups = {n: g for n, raw in raw_groups.items() if (g := _try(Group, raw)) is not None}
    scopes = {n: s for n, raw in raw_scopes.items() if (s := _try(Scope, raw)) is not None}
    clients = {n: c for n, raw in raw_clients.items() if (c := _try(Client, raw)) is not None}
    problems = [_NO_SCOPES] if "scopes" in data and raw_scopes == {} else []
    audiences = {
        raw["audience"]
        for raw in raw_scopes.values()
        if isinstance(raw, dict) and isinstance(raw.get("audience"), str)
    }
    return problems + _reference_errors(
        tokens=_try(TokenSettings, data.get("tokens")),
        requests=_try(RequestSettings, data.get("requests", {})),
        group_names=set(raw_groups),
        groups=groups,
        trigger_names=set(raw_triggers),
        scopes=scopes,
        clients=clients,
        audiences=audiences,
    )


# --------------------------------------------------------------------------
# Pydantic errors in the file's words.


def _key(segment: str) -> str:
    return segment if _BARE_KEY.fullmatch(segment) else json.dumps(segment, ensure_ascii=False)


def _path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for segment in loc:
        if segment == "[key]":
            continue
        if isinstance(segment, int):
            path += f"[{segment}]"
        else:
            path += ("." if path else "") + _key(segment)
    return path


_TYPE_WORDS = {
    "string_type": "must be a string",
    "int_type": "must be a whole number",
    "bool_type": "must be true or false",
    "list_type": "must be a list",
    "dict_type": "must be a table",
    "model_type": "must be a table",
    "model_attributes_type": "must be a table",
}


def _message(error: Mapping[str, Any]) -> str:
    kind = error["type"]
    loc = tuple(error["loc"])
    ctx = error.get("ctx") or {}
    if kind == "breakglass_value":
        return str(error["msg"])
    if kind == "missing":
        top = len(loc) == 1 and loc[0] in _SECTIONS
        return "missing required section" if top else "missing required key"
    if kind == "extra_forbidden":
        return "unknown key"
    if kind in _TYPE_WORDS:
        return f"{_TYPE_WORDS[kind]} (got {_shown(error.get('input'))})"
    if kind == "too_short":
        return "must not be empty"
    if kind == "greater_than_equal":
        return f"must be at least {ctx.get('ge')} (got {_shown(error.get('input'))})"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')} (got {_shown(error.get('input'))})"
    message = str(error["msg"])
    return message[:1].lower() + message[1:]


def _convert(exc: ValidationError) -> tuple[list[str], bool]:
    """(messages, whether the cross-reference check ran)."""
    messages: list[str] = []
    checked_references = False
    for error in exc.errors():
        if error["type"] == _REFERENCES:
            checked_references = True
            messages.extend(error["ctx"]["errors"])
            continue
        path = _path(tuple(error["loc"]))
        line = f"{path}: {_message(error)}" if path else _message(error)
        if line not in messages:
            messages.append(line)
    return messages, checked_references


# --------------------------------------------------------------------------
# Entry points.


def validate_policy(data: Mapping[str, Any], source: str = "<policy>") -> Policy:
    """Validate already-parsed TOML data (a dict); raise PolicyError listing every problem."""
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        errors, checked_references = _convert(exc)
    if not checked_references and isinstance(data, Mapping):
        errors.extend(e for e in _partial_reference_errors(data) if e not in errors)
    raise PolicyError(errors or [f"{source}: invalid policy"], source)


def parse_policy(text: str, source: str = "<policy>") -> Policy:
    """Parse and validate policy TOML; ``source`` names it in TOML syntax errors."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError([f"{source}: invalid TOML: {exc}"], source) from None
    except RecursionError:
        raise PolicyError([f"{source}: invalid TOML: nested too deeply"], source) from None
    return validate_policy(data, source)


def load_policy(path: str | os.PathLike[str]) -> Policy:
    """Read and validate the policy file at ``path``."""
    source = os.fspath(path)
    try:
        with open(source, "rb") as handle:
            raw = handle.read()
    except FileNotFoundError:
        raise PolicyError([f"{source}: file not found"], source) from None
    except IsADirectoryError:
        raise PolicyError([f"{source}: is a directory, not a policy file"], source) from None
    except PermissionError:
        raise PolicyError([f"{source}: permission denied"], source) from None
    except OSError as exc:
        raise PolicyError([f"{source}: cannot read: {exc.strerror or exc}"], source) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyError([f"{source}: not UTF-8 text (byte {exc.start})"], source) from None
    return parse_policy(text, source)
