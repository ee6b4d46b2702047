"""What `breakglass check-policy` (and `serve`, in its log) warns about in a policy that
is valid but almost certainly not what its author meant: a channel written as a name
instead of an ID, and the example file's placeholder values still in place.
Pure: it reads the parsed policy only."""

from __future__ import annotations

import re

from bot.core.commands import NOT_SCOPE_WORDS
from bot.core.policy import Policy

# Slack channel IDs: C… (public or private channels), G… (older private channels).
_CHANNEL_ID = re.compile(r"[CG][A-Z0-9]{2,}")

# The placeholders of breakglass.example.toml and of the contract's example policy.
EXAMPLE_CHANNELS = frozenset({"C0REVIEWS", "C0INCIDENT"})
EXAMPLE_USERS = frozenset({"U01ONCALL1", "U01ONCALL2", "U01LEAD1", "U01LEAD2", "U01LEAD3",
                           "U01DIR1", "U01DIR2"})
EXAMPLE_USERGROUPS = frozenset({"S01ONCALL", "S01DIRECTORS"})
EXAMPLE_HOSTS = ("example.internal", "example.com", "example.org")
ZERO_SECRET = "0" * 64
# breakglass.example.toml's secret_hash: the hash of "replace-me" with a salt of zeros.
EXAMPLE_SECRET_HASH = ("scrypt$ln=15,r=8,p=1$AAAAAAAAAAAAAAAAAAAAAA$"
                       "jIvb9x8CX7i0GmIZT5H34co/HeVboXVrouKoBj1vmeo")


def policy_warnings(policy: Policy) -> list[str]:
    """One line per problem, each starting with the key path, saying what to do."""
    out: list[str] = []
    for key in ("reviewer_channel", "incident_channel"):
        channel = getattr(policy.slack, key)
        path = f"slack.{key}"
        if channel in EXAMPLE_CHANNELS:
            out.append(f"{path}: {channel!r} is the example's placeholder: put your channel's ID "
                       "there (channel name → View channel details → the ID at the bottom, C…)")
        elif not _CHANNEL_ID.fullmatch(channel):
            out.append(f"{path}: {channel!r} looks like a channel name, not an ID: Slack wants "
                       "the ID (channel name → View channel details → the ID at the bottom, "
                       "C…), and the bot must be invited there (/invite @breakglass)")
    if any(host in policy.tokens.issuer for host in EXAMPLE_HOSTS):
        out.append(f"tokens.issuer: {policy.tokens.issuer!r} is the example's placeholder: use "
                   "your bot's public base URL (relying services check it)")
    for name in sorted(policy.scopes):
        if name in NOT_SCOPE_WORDS:
            out.append(f"scopes.{name}: people type '{name}' meaning a command (`/breakglass "
                       f"{name}` gets the usage when no scope is called so); this scope "
                       "works, but a clearer name avoids surprises (rename it when you can)")
    for name, group in policy.groups.items():
        users = sorted(set(group.members) & EXAMPLE_USERS)
        if users:
            out.append(f"groups.{name}.members: {', '.join(users)} are the example's "
                       "placeholders: put your people's Slack user IDs there (profile → ⋯ → "
                       "Copy member ID)")
        if group.usergroup in EXAMPLE_USERGROUPS:
            out.append(f"groups.{name}.usergroup: {group.usergroup!r} is the example's "
                       "placeholder: put your Slack user group's ID (S…) there, or remove it")
    for name, client in policy.clients.items():
        digest = getattr(client, "secret_sha256", None)
        if digest == ZERO_SECRET:
            out.append(f"clients.{name}.secret_sha256: the example's zeros match no secret: put "
                       "the SHA-256 of the client's secret there")
        elif digest is not None:
            out.append(f"clients.{name}.secret_sha256: a fast hash; anyone who reads the policy "
                       "can test guesses at GPU speed. Replace it with secret_hash from "
                       "`breakglass hash-secret` (the same secret works: the service changes "
                       "nothing)")
        if getattr(client, "secret_hash", None) == EXAMPLE_SECRET_HASH:
            out.append(f"clients.{name}.secret_hash: the example's placeholder: put the hash "
                       "of your client's secret there (`breakglass hash-secret`)")
    for i, hook in enumerate(getattr(policy, "webhooks", None) or []):
        url = str(getattr(hook, "url", ""))
        if any(f".{host}" in url or f"/{host}" in url for host in EXAMPLE_HOSTS):
            out.append(f"webhooks[{i}].url: {url!r} is the example's placeholder: put your "
                       "receiver's URL there, or remove the [[webhooks]] entry")
    return out
