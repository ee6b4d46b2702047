"""The documentation, the example policy and the Dockerfile say what the code does.

* breakglass.example.toml is the contract's example, valid, and uses every key.
* Every `breakglass ...` command line in README.md and docs/*.md exists.
* Every environment variable is documented; every policy key and metric too.
* Relative links (and their #anchors) point at something that exists.
* The Dockerfile has the lines the docs rely on, and its health check works.
"""

from __future__ import annotations

import http.server
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import tomllib
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bot import audit
from bot.cli import build_parser
from bot.core.commands import RESERVED_WORDS
from bot.core.kdf import new_master_key
from bot.core.policy import (
    AlertSettings,
    Client,
    DrillSettings,
    Group,
    RequestSettings,
    ReviewSettings,
    Scope,
    SlackSettings,
    TokenSettings,
    Trigger,
    Webhook,
    load_policy,
)
from bot.keys import AUDIT_KEY_NAME, sealed_secret
from bot.store.db import Database

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
EXAMPLE = ROOT / "breakglass.example.toml"

# Contract section 1: every variable users may set.
CONTRACT_ENV = (
    "SLACK_BOT_TOKEN",
    "SLACK_SIGNING_SECRET",
    "SLACK_APP_TOKEN",
    "SLACK_API_URL",
    "BREAKGLASS_POLICY",
    "BREAKGLASS_DATABASE_URL",
    "BREAKGLASS_MASTER_KEY",
    "BREAKGLASS_HOST",
    "BREAKGLASS_PORT",
)

SECTION_MODELS = {
    "slack": SlackSettings,
    "tokens": TokenSettings,
    "requests": RequestSettings,
    "groups": Group,
    "triggers": Trigger,
    "scopes": Scope,
    "clients": Client,
    "alerts": AlertSettings,
    "webhooks": Webhook,
    "drills": DrillSettings,
    "reviews": ReviewSettings,
}


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bot", *args], cwd=ROOT, capture_output=True, text=True,
        timeout=120, env={**os.environ, **(env or {})},
    )


# ---------------------------------------------------------------------------
# The example policy.


def test_example_policy_is_valid():
    policy = load_policy(EXAMPLE)
    # The contract's example, section by section.
    assert policy.slack.reviewer_channel == "C0REVIEWS"
    assert policy.slack.incident_channel == "C0INCIDENT"
    assert policy.tokens.issuer == "https://breakglass.example.internal"
    assert (policy.tokens.algorithm, policy.tokens.delivery) == ("RS256", "reveal")
    assert set(policy.groups) == {"oncall", "sre-leads", "eng-directors"}
    assert policy.groups["oncall"].usergroup == "S01ONCALL"
    scope = policy.scopes["payments-write"]
    assert scope.audience == "payments-api"
    assert scope.permissions == ["payments:read", "payments:write"]
    assert (scope.requesters, scope.approvers, scope.quorum) == (["oncall"], ["sre-leads"], 2)
    assert scope.triggers == ["primary-auth-down"]
    assert scope.fallback_approvers == ["eng-directors"]
    assert policy.drills.every is not None and policy.drills.every.days == 30
    assert policy.triggers["primary-auth-down"].holds_when == "down"
    assert policy.clients["payments-api"].audiences == ["payments-api"]


def test_example_policy_shows_every_key():
    data = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    missing = []
    for section, model in SECTION_MODELS.items():
        tables = data.get(section, {})
        if section in ("slack", "tokens", "requests", "alerts", "drills", "reviews"):
            tables = {"": tables}
        elif section == "webhooks":
            tables = {str(i): t for i, t in enumerate(tables)}
        written = set().union(*(set(t) for t in tables.values())) if tables else set()
        missing += [f"{section}.{key}" for key in model.model_fields if key not in written]
    assert not missing, f"breakglass.example.toml does not show: {missing}"


def test_check_policy_accepts_the_example():
    result = run_cli("check-policy", "breakglass.example.toml")
    assert result.returncode == 0, result.stderr
    assert "breakglass.example.toml: OK" in result.stdout
    assert "payments-write (quorum 2, max 30m)" in result.stdout


def test_check_policy_names_the_key_path_of_each_problem(tmp_path):
    text = EXAMPLE.read_text(encoding="utf-8")
    bad = (text.replace('max_ttl = "1h"', 'max_ttl = "1x"')
               .replace('quorum = 2 ', 'quorum = 4 ')
               .replace('timeout = "2s"', 'timeout = "2s"\ncolour = "red"'))
    assert bad != text
    path = tmp_path / "bad.toml"
    path.write_text(bad, encoding="utf-8")
    result = run_cli("check-policy", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    assert "tokens.max_ttl: '1x' is not a duration" in result.stderr
    assert "scopes.payments-write.quorum: 4 exceeds the 3 members" in result.stderr
    assert "triggers.primary-auth-down.colour: unknown key" in result.stderr


# ---------------------------------------------------------------------------
# Commands named in the docs exist.

_FENCE = re.compile(r"^(`{3,}|~{3,})([^\n]*)\n(.*?)^\1[ \t]*$", re.M | re.S)
_SHELL_FENCES = {"sh", "shell", "bash", "console", "zsh"}
_SPAN = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
_STOP = {"&&", "||", ";", "|", ">", ">>", "<", "2>&1", "#"}


def command_snippets(text: str) -> list[tuple[str, bool]]:
    """(snippet, is_inline) for shell fences, line by line, and inline code spans."""
    snippets: list[tuple[str, bool]] = []
    for fence in _FENCE.finditer(text):
        if fence.group(2).strip().split(" ")[0] in _SHELL_FENCES:
            snippets.extend((line, False) for line in fence.group(3).splitlines())
    prose = _FENCE.sub("", text)
    snippets.extend((span, True) for span in _SPAN.findall(prose))
    return snippets


def _tokens(snippet: str, inline: bool) -> list[str]:
    text = snippet.replace("\\|", " | ") if inline else snippet.replace("\\|", " \\| ")
    return [t.strip("\"'$()") if t.strip("\"'$()") else t for t in text.split()]


def invocations(snippet: str, inline: bool) -> list[list[str]]:
    """The argument lists of every `breakglass` / `python -m bot` call in a snippet."""
    words = _tokens(snippet, inline)
    found = []
    for i, word in enumerate(words):
        if word == "breakglass":
            start = i + 1
        elif word == "bot" and words[max(0, i - 2):i] == ["python", "-m"]:
            start = i + 1
        else:
            continue
        rest = words[start:]
        if rest and rest[0] == "breakglass":
            continue  # `docker run ... breakglass breakglass check-policy`: the image name
        if rest and re.fullmatch(r"[a-z][a-z-]*", rest[0]):
            found.append(rest)
    return found


def _subcommands(parser) -> dict:  # type: ignore[no-untyped-def]
    for action in parser._actions:  # noqa: SLF001 - argparse offers no public way
        if action.__class__.__name__ == "_SubParsersAction":
            return dict(action.choices)
    return {}


def check_invocation(args: list[str], inline: bool) -> str | None:
    parser = build_parser()
    top = _subcommands(parser)
    if args[0] not in top:
        return f"unknown command {args[0]!r} (commands: {', '.join(top)})"
    current = top[args[0]]
    rest = args[1:]
    nested = _subcommands(current)
    if nested:
        alternatives = []
        while rest:
            if rest[0] not in nested:
                return f"unknown subcommand `{args[0]} {rest[0]}` (has: {', '.join(nested)})"
            alternatives.append(rest[0])
            rest = rest[1:]
            if inline and rest[:1] == ["|"] and len(rest) > 1:
                rest = rest[1:]
                continue
            break
        if not alternatives:
            return f"`{args[0]}` needs a subcommand ({', '.join(nested)})"
        current = nested[alternatives[-1]]
    for word in rest:
        if word in _STOP or word.startswith("#"):
            break
        option = word.lstrip("[").rstrip("]").split("=")[0]
        if option.startswith("--") and option not in current._option_string_actions:  # noqa: SLF001
            return f"`{' '.join(args)}`: no option {option}"
    return None


def test_the_command_scan_works():
    snippets = command_snippets(
        "Run `breakglass keys new-master \\| rotate` and `/breakglass help`.\n"
        "```sh\nbreakglass audit export --since 2026-01-01 | jq .\n"
        "docker run --rm breakglass breakglass check-policy\n```\n"
        "```\nbreakglass listening on 0.0.0.0:3000\n```\n"
    )
    calls = [(args, inline) for s, inline in snippets for args in invocations(s, inline)]
    assert [a[:2] for a, _ in calls] == [
        ["audit", "export"], ["check-policy"], ["keys", "new-master"]]
    assert all(check_invocation(a, i) is None for a, i in calls)
    assert check_invocation(["keys", "new-master", "|", "spin"], True) is not None
    assert check_invocation(["audit", "export", "--until", "x"], True) is not None
    assert check_invocation(["migrate"], True) is not None


def test_every_documented_command_exists():
    problems = []
    seen = 0
    for path in markdown_files():
        if not path.exists():
            continue
        for snippet, inline in command_snippets(path.read_text(encoding="utf-8")):
            for args in invocations(snippet, inline):
                seen += 1
                problem = check_invocation(args, inline)
                if problem:
                    problems.append(f"{path.relative_to(ROOT)}: {snippet!r}: {problem}")
    assert seen >= 10, "too few command lines found: is the scan broken?"
    assert not problems, "\n".join(problems)


def test_requester_guide_lists_every_slash_subcommand():
    guide = (DOCS / "requester-guide.md").read_text(encoding="utf-8")
    for word in sorted(RESERVED_WORDS):
        assert f"/breakglass {word}" in guide, word
    assert "/breakglass SCOPE DURATION REASON" in guide


# ---------------------------------------------------------------------------
# Environment, policy keys, metrics.


def test_setup_documents_every_contract_variable():
    setup = (DOCS / "setup.md").read_text(encoding="utf-8")
    missing = [name for name in CONTRACT_ENV if f"`{name}`" not in setup]
    assert not missing, f"docs/setup.md does not mention {missing}"


def test_every_variable_the_code_reads_is_documented():
    names = set()
    for path in (ROOT / "bot").rglob("*.py"):
        names |= set(re.findall(r"[\"']((?:SLACK|BREAKGLASS)_[A-Z_]+)[\"']",
                                path.read_text(encoding="utf-8")))
    assert set(CONTRACT_ENV) <= names | {"BREAKGLASS_HOST"}
    docs = (DOCS / "setup.md").read_text(encoding="utf-8") + (
        DOCS / "operations.md").read_text(encoding="utf-8")
    missing = sorted(n for n in names if n not in docs)
    assert not missing, f"read by the code but not in setup.md or operations.md: {missing}"


def test_policy_doc_covers_every_key():
    doc = (DOCS / "policy.md").read_text(encoding="utf-8")
    missing = [section for section in SECTION_MODELS if f"[{section}" not in doc]
    for model in SECTION_MODELS.values():
        missing += [key for key in model.model_fields if f"`{key}`" not in doc]
    assert not missing, f"docs/policy.md does not describe: {missing}"


def test_operations_doc_lists_every_metric():
    source = (ROOT / "bot" / "metrics.py").read_text(encoding="utf-8")
    metrics = re.findall(r"\"(breakglass_[a-z_]+)\"", source)
    assert len(metrics) >= 5
    doc = (DOCS / "operations.md").read_text(encoding="utf-8")
    missing = [m for m in metrics if f"`{m}`" not in doc]
    assert not missing, f"docs/operations.md does not list {missing}"


# ---------------------------------------------------------------------------
# Links.

_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def github_anchors(text: str) -> set[str]:
    anchors: set[str] = set()
    counts: dict[str, int] = {}
    for heading in _HEADING.findall(_FENCE.sub("", text)):
        plain = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
        slug = re.sub(r"[^\w\- ]", "", plain.lower()).replace(" ", "-")
        n = counts.get(slug, 0)
        counts[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def test_anchor_slugs_follow_github():
    text = "# 2. Create the Slack app from manifest.yml\n## `breakglass keys rotate`\n## Keys\n## Keys\n"
    assert github_anchors(text) == {
        "2-create-the-slack-app-from-manifestyml", "breakglass-keys-rotate", "keys", "keys-1"}


def test_relative_links_point_at_files_that_exist():
    broken = []
    for path in markdown_files():
        if not path.exists():
            broken.append(f"{path.relative_to(ROOT)} itself is missing")
            continue
        text = path.read_text(encoding="utf-8")
        for target in _LINK.findall(_FENCE.sub("", text)):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):
                continue  # https:, mailto:
            file_part, _, anchor = target.partition("#")
            linked = (path.parent / file_part).resolve() if file_part else path
            where = f"{path.relative_to(ROOT)} -> {target}"
            if not linked.exists():
                broken.append(f"{where}: no such file")
            elif anchor and linked.suffix == ".md":
                if anchor not in github_anchors(linked.read_text(encoding="utf-8")):
                    broken.append(f"{where}: no heading #{anchor}")
    assert not broken, "broken links:\n" + "\n".join(broken)


# ---------------------------------------------------------------------------
# The Dockerfile.


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    joined = re.sub(r"\\\n", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), " ".join(rest.split())))
    return out


def test_dockerfile_has_the_lines_the_docs_rely_on():
    instructions = dockerfile_instructions()
    keywords = [k for k, _ in instructions]
    values = {k: [v for kk, v in instructions if kk == k] for k in keywords}
    assert instructions[0] == ("FROM", "python:3.11-slim")
    assert any(re.search(r"pip install --no-cache-dir \"?\.(\[postgres\])?\"?( |$)", v)
               for v in values["RUN"])
    assert values["EXPOSE"] == ["3000 9464"]  # the app, and /metrics on its own listener
    assert values["CMD"] == ['["breakglass", "serve"]']
    assert values["VOLUME"] == ['["/data"]']
    env = " ".join(values["ENV"])
    assert "BREAKGLASS_DATABASE_URL=sqlite+aiosqlite:////data/breakglass.db" in env
    assert "BREAKGLASS_POLICY=/config/breakglass.toml" in env
    # Runs as a non-root user, set after everything that needs root.
    user = values["USER"][-1].split(":")[0]
    assert user not in ("root", "0")
    assert keywords.index("USER") > max(i for i, k in enumerate(keywords) if k == "RUN")
    assert len(values["HEALTHCHECK"]) == 1 and "/healthz" in values["HEALTHCHECK"][0]


def test_dockerignore_sends_only_what_the_build_needs():
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[0] == "*"
    assert {"!pyproject.toml", "!README.md", "!bot"} <= set(lines)
    copied = [v for k, v in dockerfile_instructions() if k == "COPY"]
    assert copied == ["pyproject.toml README.md ./", "bot ./bot"]


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_dockerfile_healthcheck_command_works():
    line = dict(dockerfile_instructions())["HEALTHCHECK"]
    command = line.split(" CMD ", 1)[1]
    server = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        command = command.replace("python -c", f"{shlex.quote(sys.executable)} -c", 1)
        env = {**os.environ, "BREAKGLASS_PORT": str(port)}
        ok = subprocess.run(["sh", "-c", command], env=env, capture_output=True, timeout=30)
        _Health.status = 503
        unhealthy = subprocess.run(["sh", "-c", command], env=env, capture_output=True, timeout=30)
    finally:
        _Health.status = 200
        server.shutdown()
    assert ok.returncode == 0, ok.stderr
    assert unhealthy.returncode == 1
    with socket.socket() as s:  # nothing listening: unhealthy too
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    down = subprocess.run(["sh", "-c", command], env={**env, "BREAKGLASS_PORT": str(free)},
                          capture_output=True, timeout=30)
    assert down.returncode == 1


# ---------------------------------------------------------------------------
# A documented procedure: docs/operations.md, "breakglass keys rotate-master".


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
async def test_rotate_master_keeps_the_audit_log_verifiable(tmp_path):
    # The audit MAC key is a sealed secret in the database: rotate-master
    # re-encrypts it, so the chain written before the rotation still verifies.
    url = f"sqlite+aiosqlite:///{tmp_path / 'breakglass.db'}"
    old, new = new_master_key(), new_master_key()
    db = Database(url)
    await db.create_schema()
    key = await sealed_secret(db, old, AUDIT_KEY_NAME)
    async with db.transaction() as conn:
        await audit.append(conn, key, at=datetime.now(UTC), actor="breakglass",
                           event="started", details={})
    await db.dispose()
    base = {"BREAKGLASS_DATABASE_URL": url}
    before = run_cli("audit", "verify", env={**base, "BREAKGLASS_MASTER_KEY": old})
    assert before.returncode == 0, before.stdout + before.stderr
    rotated = run_cli("keys", "rotate-master", env={
        **base, "BREAKGLASS_MASTER_KEY": new, "BREAKGLASS_OLD_MASTER_KEY": old})
    assert rotated.returncode == 0, rotated.stderr
    after = run_cli("audit", "verify", env={**base, "BREAKGLASS_MASTER_KEY": new})
    assert after.returncode == 0, f"after rotate-master: {after.stdout.strip()}"


def test_rotate_master_with_a_bad_old_key_is_one_clear_line(tmp_path):
    # BUG (bot/cli.py / bot/keys.py, not owned here): a BREAKGLASS_OLD_MASTER_KEY
    # shorter than 32 characters escapes as a MasterKeyError traceback (exit 1)
    # whose text blames BREAKGLASS_MASTER_KEY. docs/operations.md promises exit 2
    # and one line naming the variable.
    url = f"sqlite+aiosqlite:///{tmp_path / 'breakglass.db'}"
    result = run_cli("keys", "rotate-master", env={
        "BREAKGLASS_DATABASE_URL": url, "BREAKGLASS_MASTER_KEY": new_master_key(),
        "BREAKGLASS_OLD_MASTER_KEY": "too-short"})
    assert result.returncode == 2, result.stderr[-400:]
    assert "Traceback" not in result.stderr
    assert "BREAKGLASS_OLD_MASTER_KEY" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------
# Test files say what they do (issue 13, "tests that guard each layer").


def test_every_test_file_says_what_it_does():
    import ast

    vague = ("left failing on purpose", "todo", "xfail", "placeholder")
    problems = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        if len(doc) < 40:
            problems.append(f"{path.name}: no module docstring saying what it tests")
        elif any(word in doc.lower() for word in vague):
            problems.append(f"{path.name}: its docstring says it is unfinished: {doc[:80]!r}")
    assert not problems, "\n".join(problems)
