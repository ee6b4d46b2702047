"""Imports point down (docs/architecture.md).

* bot/core/ is pure: no Slack, HTTP or database library, and nothing from
  bot outside bot.core.
* The storage layer (bot/store/, bot/audit.py, bot/keys.py, bot/delivery/outbox.py)
  never reaches up into the use cases or the adapters.
* The ways out (bot/delivery/) and the infrastructure beside them (bot/directory.py,
  bot/triggers.py) never import a use case (bot/governance/, bot/service.py), the
  wiring or an adapter: what they need is passed in.
* No production module imports bot/local/ (the emulator, the sandbox, the demo):
  the local Slack world is for `breakglass demo`, the tests and the benches. Only
  bot/cli.py may, for its `demo` command.

Every import counts, including those inside functions and under
``if TYPE_CHECKING:``, because a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BOT = ROOT / "bot"

CORE_FORBIDDEN_LIBRARIES = ("slack_sdk", "slack_bolt", "aiohttp", "sqlalchemy")
STORAGE_MODULES = ("bot/store/*.py", "bot/audit.py", "bot/keys.py", "bot/delivery/outbox.py")
STORAGE_FORBIDDEN = (
    "bot.slack", "bot.http", "bot.service", "bot.runtime", "bot.governance", "bot.introspection", "bot.local",
)
BELOW_USE_CASES = ("bot/delivery/*.py", "bot/directory.py", "bot/triggers.py")
BELOW_USE_CASES_FORBIDDEN = STORAGE_FORBIDDEN
LOCAL = "bot.local"
# module -> why it may import bot.local
LOCAL_ALLOWED = {"bot.cli": "the `breakglass demo` command runs bot.local.demo"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[str, int]]:
    """Every module ``path`` imports, absolute, with its line number.

    ``from X import y`` yields both ``X`` and ``X.y`` (y may be a submodule).
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                if node.level > 1:
                    base = base[: -(node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((target, node.lineno))
            found.extend((f"{target}.{alias.name}", node.lineno) for alias in node.names)
    return found


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _where(path: Path, line: int) -> str:
    return f"{path.relative_to(ROOT)}:{line}"


def core_files() -> list[Path]:
    return sorted((BOT / "core").glob("*.py"))


def storage_files() -> list[Path]:
    files: set[Path] = set()
    for pattern in STORAGE_MODULES:
        files.update(ROOT.glob(pattern))
    return sorted(files)


def test_the_walk_sees_relative_and_lazy_imports():
    # Guards the checker: absolute, relative and in-function imports are all seen.
    assert "bot.core.durations" in {n for n, _ in imports_of(BOT / "core" / "commands.py")}
    names = {name for name, _ in imports_of(BOT / "store" / "db.py")}
    assert "bot.store.sqlite_driver" in names  # from . import sqlite_driver
    assert "bot.store.migrate" in names  # `from .migrate import ensure_current`, inside a method
    assert "bot.core.quorum" in {n for n, _ in imports_of(BOT / "service.py")}  # from .core import


def test_there_is_something_to_check():
    assert len(core_files()) >= 5
    assert {p.name for p in storage_files()} >= {"db.py", "audit.py", "keys.py", "outbox.py"}


def test_core_is_pure():
    problems = []
    for path in core_files():
        for name, line in imports_of(path):
            if any(_under(name, lib) for lib in CORE_FORBIDDEN_LIBRARIES):
                problems.append(f"{_where(path, line)} imports {name}")
            elif _under(name, "bot") and not _under(name, "bot.core"):
                problems.append(f"{_where(path, line)} imports {name} (outside bot.core)")
    assert not problems, "bot/core must stay pure:\n" + "\n".join(problems)


def test_storage_does_not_import_upwards():
    problems = []
    for path in storage_files():
        for name, line in imports_of(path):
            for upper in STORAGE_FORBIDDEN:
                if _under(name, upper):
                    problems.append(f"{_where(path, line)} imports {name}")
    assert not problems, "storage modules import an upper layer:\n" + "\n".join(problems)


def production_files() -> list[Path]:
    return sorted(p for p in BOT.rglob("*.py") if not _under(module_name(p), LOCAL))


def test_local_world_exists_and_is_seen():
    # Guards the checker: the local package is where the rule says, and cli's lazy import is seen.
    assert {p.name for p in (BOT / "local").glob("*.py")} >= {"emulator.py", "sandbox.py", "demo.py"}
    assert "bot.local.demo" in {n for n, _ in imports_of(BOT / "cli.py")}
    assert BOT / "service.py" in production_files()
    assert BOT / "local" / "sandbox.py" not in production_files()


def test_production_does_not_import_the_local_slack_world():
    problems = []
    for path in production_files():
        if module_name(path) in LOCAL_ALLOWED:
            continue
        for name, line in imports_of(path):
            if _under(name, LOCAL):
                problems.append(f"{_where(path, line)} imports {name}")
    assert not problems, "production modules import bot.local:\n" + "\n".join(problems)


def test_delivery_and_infrastructure_do_not_import_use_cases():
    files: set[Path] = set()
    for pattern in BELOW_USE_CASES:
        files.update(ROOT.glob(pattern))
    assert {p.name for p in files} >= {"outbox.py", "webhooks.py", "audit_slack.py", "directory.py"}
    problems = []
    for path in sorted(files):
        for name, line in imports_of(path):
            if any(_under(name, upper) for upper in BELOW_USE_CASES_FORBIDDEN):
                problems.append(f"{_where(path, line)} imports {name}")
    assert not problems, "delivery / infrastructure modules import an upper layer:\n" + "\n".join(problems)
