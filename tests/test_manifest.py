"""manifest.yml: the Slack app it creates can do everything the code asks Slack for.

The scopes are checked against the code itself: every Slack Web API method
called anywhere under bot/ must be known to the table below, and its scope
must be granted in the manifest; a granted scope that no call needs fails too
(least privilege).

The manifest is read with a small reader for the plain YAML subset it is
written in (PyYAML is not a dependency of the project).
"""

from __future__ import annotations

import importlib.util
import json
import re
import time
import types
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient, TestServer
from slack_bolt.response import BoltResponse

from bot.http import build_web_app
from bot.slack.signature import compute_signature

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "manifest.yml"
BOT = ROOT / "bot"

# Slack Web API method -> bot scopes it needs (https://api.slack.com/methods).
# Add a row when the code starts calling a new method.
SCOPES_FOR_METHOD: dict[str, frozenset[str]] = {
    "auth.test": frozenset(),  # Bolt calls it on its own; no scope
    # Socket Mode: called with the app-level token (scope connections:write), not a bot scope.
    "apps.connections.open": frozenset(),
    "chat.postMessage": frozenset({"chat:write"}),  # a user ID as channel = the app's DM
    "chat.update": frozenset({"chat:write"}),
    "chat.postEphemeral": frozenset({"chat:write"}),
    "chat.delete": frozenset({"chat:write"}),
    "chat.getPermalink": frozenset(),  # "No scope required" (bot tokens)
    "views.open": frozenset(),  # needs a trigger_id, no scope
    "views.update": frozenset(),
    "views.push": frozenset(),
    "usergroups.users.list": frozenset({"usergroups:read"}),
    "usergroups.list": frozenset({"usergroups:read"}),
    "users.info": frozenset({"users:read"}),
    "conversations.open": frozenset({"im:write"}),
    # `audit verify --slack`: the incident channel may be public or private.
    "conversations.history": frozenset({"channels:history", "groups:history"}),
    # `serve` at start: is the bot in the reviewer and incident channels (public or private)?
    "conversations.info": frozenset({"channels:read", "groups:read"}),
}
# Called by slack_bolt itself, not by our code.
IMPLICIT_METHODS = frozenset({"auth.test"})
# Scopes that come from a manifest feature rather than a method call.
FEATURE_SCOPES = {"slash_commands": "commands"}

_CALL_PATTERNS = (
    re.compile(r"\bclient\.([A-Za-z][A-Za-z0-9_]*)\s*\("),  # client.x( and self.client.x(
    re.compile(r"\b_call\(\s*[\"']([A-Za-z][A-Za-z0-9_.]*)[\"']"),  # outbox: _call("x", ...)
)


# ---------------------------------------------------------------------------
# A reader for the YAML subset manifest.yml uses: block mappings and block
# sequences by indentation, plain / single- / double-quoted scalars, true,
# false, integers and comments. Anything else is an error, so the manifest
# stays readable by this reader.


class ManifestSyntaxError(ValueError):
    pass


def _strip_comment(line: str) -> str:
    quote: str | None = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[:i].rstrip()
    return line.rstrip()


def _scalar(text: str, lineno: int) -> Any:
    if text[:1] in "{[&*|>!%@`":
        raise ManifestSyntaxError(f"line {lineno}: {text!r} is outside the supported YAML subset")
    if text.startswith('"'):
        if len(text) < 2 or not text.endswith('"'):
            raise ManifestSyntaxError(f"line {lineno}: unterminated string {text!r}")
        return json.loads(text)
    if text.startswith("'"):
        if len(text) < 2 or not text.endswith("'"):
            raise ManifestSyntaxError(f"line {lineno}: unterminated string {text!r}")
        return text[1:-1].replace("''", "'")
    if text in ("true", "false"):
        return text == "true"
    if text in ("null", "~", "True", "False", "yes", "no", "on", "off"):
        raise ManifestSyntaxError(f"line {lineno}: write {text!r} as true, false or a quoted string")
    if re.fullmatch(r"-?[0-9]+", text):
        return int(text)
    if ": " in text or text.endswith(":"):
        raise ManifestSyntaxError(f"line {lineno}: quote {text!r}; it looks like a mapping")
    return text


def read_manifest(text: str) -> Any:
    lines: list[tuple[int, str, int]] = []  # (indent, content, line number)
    for number, raw in enumerate(text.splitlines(), 1):
        if "\t" in raw:
            raise ManifestSyntaxError(f"line {number}: tabs are not allowed")
        content = _strip_comment(raw)
        if content.strip():
            lines.append((len(content) - len(content.lstrip(" ")), content.strip(), number))

    def block(i: int, indent: int) -> tuple[Any, int]:
        if lines[i][1].startswith("- ") or lines[i][1] == "-":
            return sequence(i, indent)
        return mapping(i, indent)

    def value_after(rest: str, i: int, indent: int, lineno: int) -> tuple[Any, int]:
        if rest:
            return _scalar(rest, lineno), i + 1
        if i + 1 < len(lines) and lines[i + 1][0] > indent:
            return block(i + 1, lines[i + 1][0])
        raise ManifestSyntaxError(f"line {lineno}: a key without a value")

    def mapping(i: int, indent: int) -> tuple[dict[str, Any], int]:
        out: dict[str, Any] = {}
        while i < len(lines) and lines[i][0] == indent:
            _, content, lineno = lines[i]
            if content.startswith("- "):
                raise ManifestSyntaxError(f"line {lineno}: a list item where a key was expected")
            key, sep, rest = content.partition(":")
            if not sep or (rest and not rest.startswith(" ")):
                raise ManifestSyntaxError(f"line {lineno}: expected `key: value`, got {content!r}")
            key = key.strip()
            if key in out:
                raise ManifestSyntaxError(f"line {lineno}: duplicate key {key!r}")
            out[key], i = value_after(rest.strip(), i, indent, lineno)
        if i < len(lines) and lines[i][0] > indent:
            raise ManifestSyntaxError(f"line {lines[i][2]}: unexpected indentation")
        return out, i

    def sequence(i: int, indent: int) -> tuple[list[Any], int]:
        out: list[Any] = []
        while i < len(lines) and lines[i][0] == indent and lines[i][1].startswith("-"):
            _, content, lineno = lines[i]
            rest = content[1:].strip()
            key, sep, after = rest.partition(":")
            if sep and (not after or after.startswith(" ")) and not rest.startswith(("'", '"')):
                # "- key: value" opens a mapping whose keys sit two columns in.
                lines[i] = (indent + 2, rest, lineno)
                item, i = mapping(i, indent + 2)
                out.append(item)
            elif rest:
                out.append(_scalar(rest, lineno))
                i += 1
            else:
                raise ManifestSyntaxError(f"line {lineno}: empty list item")
        return out, i

    if not lines:
        raise ManifestSyntaxError("empty manifest")
    if lines[0][0] != 0:
        raise ManifestSyntaxError(f"line {lines[0][2]}: the top level must not be indented")
    result, end = mapping(0, 0)
    if end != len(lines):
        raise ManifestSyntaxError(f"line {lines[end][2]}: unexpected content")
    return result


def manifest() -> dict[str, Any]:
    return read_manifest(MANIFEST.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------
# What the code calls.


def python_sources() -> list[Path]:
    return sorted(p for p in BOT.rglob("*.py") if "__pycache__" not in p.parts)


def called_methods() -> dict[str, list[str]]:
    """Slack Web API method -> where it is called (file:line)."""
    found: dict[str, list[str]] = {}
    for path in python_sources():
        text = path.read_text(encoding="utf-8")
        for pattern in _CALL_PATTERNS:
            for match in pattern.finditer(text):
                method = match.group(1).replace("_", ".")
                line = text.count("\n", 0, match.start()) + 1
                found.setdefault(method, []).append(f"{path.relative_to(ROOT)}:{line}")
    return found


# ---------------------------------------------------------------------------
# The reader itself.


def test_reader_reads_the_subset():
    text = """
# comment
a:
  b: 1
  c: "x # not a comment"   # a comment
  d:
    - one
    - k: v
      w: false
  e: 'it''s'
f: https://example.com/slack/events
"""
    assert read_manifest(text) == {
        "a": {"b": 1, "c": "x # not a comment", "d": ["one", {"k": "v", "w": False}],
              "e": "it's"},
        "f": "https://example.com/slack/events",
    }


def test_reader_refuses_what_it_does_not_understand():
    for bad in ("a: b: c\n", "a: {b: 1}\n", "a: [1, 2]\n", "a: &x 1\n", "a: |\n  text\n", "a: 1\na: 2\n",
                "a:\n  b: 1\n    c: 2\n", "a: yes\n"):
        try:
            read_manifest(bad)
        except ManifestSyntaxError:
            continue
        raise AssertionError(f"accepted {bad!r}")


def test_reader_agrees_with_a_real_yaml_parser_when_one_is_installed():
    data = manifest()
    assert isinstance(data, dict)
    if importlib.util.find_spec("yaml") is not None:  # a cross-check, not a dependency
        import yaml

        assert yaml.safe_load(MANIFEST.read_text(encoding="utf-8")) == data


# ---------------------------------------------------------------------------
# The manifest.


def test_manifest_shape():
    m = manifest()
    assert m["_metadata"]["major_version"] == 1
    assert m["display_information"]["name"] == "breakglass"
    assert len(m["display_information"]["description"]) <= 140  # Slack's limit
    assert m["features"]["bot_user"]["display_name"] == "breakglass"
    settings = m["settings"]
    assert settings["interactivity"]["is_enabled"] is True
    assert settings["socket_mode_enabled"] is False
    assert settings["org_deploy_enabled"] is False
    assert settings["token_rotation_enabled"] is False
    # The bot takes no Events API events: only commands and interactivity.
    assert "event_subscriptions" not in settings


def test_slash_command_matches_the_code():
    commands = manifest()["features"]["slash_commands"]
    assert [c["command"] for c in commands] == ["/breakglass"]
    command = commands[0]
    assert command["should_escape"] is False
    assert command["usage_hint"] and command["description"]
    app_source = (BOT / "slack" / "app.py").read_text(encoding="utf-8")
    assert "app.command(COMMAND)" in app_source
    from bot.slack.acks import COMMAND

    assert COMMAND == "/breakglass"  # the listener, and the answer given before it runs


def test_request_urls_point_at_the_slack_events_route():
    m = manifest()
    urls = [m["features"]["slash_commands"][0]["url"], m["settings"]["interactivity"]["request_url"]]
    for url in urls:
        assert url.startswith("https://"), url
        assert url.endswith("/slack/events"), url
    assert urls[0] == urls[1]
    app = build_web_app(types.SimpleNamespace())  # type: ignore[arg-type]
    posts = {r.resource.canonical for r in app.router.routes() if r.method == "POST"}
    assert "/slack/events" in posts


def test_the_scan_finds_the_calls_it_should():
    # Guards the scan itself: if these disappear, the patterns stopped matching.
    found = called_methods()
    for method in ("chat.postMessage", "chat.update", "views.open", "usergroups.users.list"):
        assert method in found, f"{method} not found by the scan; check _CALL_PATTERNS"


def test_every_called_method_is_known_and_granted():
    granted = set(manifest()["oauth_config"]["scopes"]["bot"])
    found = called_methods()
    unknown = {m: where for m, where in found.items() if m not in SCOPES_FOR_METHOD}
    assert not unknown, (
        f"Slack methods called but not in SCOPES_FOR_METHOD: {unknown}; add each with its "
        "bot scopes from https://api.slack.com/methods"
    )
    missing = {
        m: sorted(SCOPES_FOR_METHOD[m] - granted)
        for m in set(found) | IMPLICIT_METHODS
        if SCOPES_FOR_METHOD[m] - granted
    }
    assert not missing, f"manifest.yml lacks bot scopes for: {missing}"


def test_no_scope_is_granted_that_nothing_needs():
    m = manifest()
    granted = m["oauth_config"]["scopes"]["bot"]
    assert len(granted) == len(set(granted)), "a scope is listed twice"
    needed: set[str] = set()
    for method in set(called_methods()) | IMPLICIT_METHODS:
        needed |= SCOPES_FOR_METHOD.get(method, frozenset())
    for feature, scope in FEATURE_SCOPES.items():
        if m["features"].get(feature):
            needed.add(scope)
    assert set(granted) == needed, (
        f"granted {sorted(granted)}, needed {sorted(needed)}: keep the app's scopes to what "
        "the code uses"
    )
    assert "user" not in m["oauth_config"]["scopes"], "breakglass needs no user-token scopes"


# ---------------------------------------------------------------------------
# Socket Mode (`socket_mode_enabled: true` and SLACK_APP_TOKEN). Slack then
# delivers commands and clicks over the WebSocket, and SLACK_SIGNING_SECRET
# may be left unset. The HTTP port stays open (health, JWKS, introspection),
# so its /slack/events must then refuse every request: with no secret there
# is nothing to check a signature against.


class _Guard:
    def first_time_here(self, signature: str, timestamp: float, now: float | None = None) -> bool:
        return True

    async def first_time(self, signature: str) -> bool:
        return True


class _Bolt:
    def __init__(self) -> None:
        self.dispatched = 0

    async def async_dispatch(self, request: Any) -> BoltResponse:
        self.dispatched += 1
        return BoltResponse(status=200, body="")


async def test_socket_mode_without_signing_secret_refuses_http_slack_events():
    # Regression: slack_events once verified with `rt.settings.signing_secret or ""`,
    # so in Socket Mode without SLACK_SIGNING_SECRET anyone could sign a request with
    # the empty key and act as any Slack user (approve, revoke, ...).
    from bot.foreground import Foreground

    bolt = _Bolt()
    rt = types.SimpleNamespace(
        settings=types.SimpleNamespace(signing_secret=None, app_token="xapp-test",
                                       socket_mode=True),
        replay_guard=_Guard(), bolt=bolt, foreground=Foreground())
    body = b"command=%2Fbreakglass&text=revoke+R2345678&user_id=U0MALLORY&response_url=x"
    timestamp = str(int(time.time()))
    headers = {"Content-Type": "application/x-www-form-urlencoded",
               "X-Slack-Request-Timestamp": timestamp,
               "X-Slack-Signature": compute_signature("", timestamp, body)}
    async with TestClient(TestServer(build_web_app(rt))) as client:  # type: ignore[arg-type]
        response = await client.post("/slack/events", data=body, headers=headers)
        status = response.status
    assert bolt.dispatched == 0, "a request signed with an empty secret was acted on"
    assert status in (401, 404), status
