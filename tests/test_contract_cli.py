"""Contract §1 from the command line, as a user meets it: the installed `breakglass`
script is the same program as `python -m bot` (same answers, same exit codes),
`breakglass demo` runs the whole story on this machine with no Slack workspace, every
variable left unset takes the contract's default, and `check-policy` without a FILE
reads `./breakglass.toml`."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

from bot.config import Settings
from bot.core.kdf import new_master_key

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "breakglass.example.toml"


def clean_env() -> dict[str, str]:
    """The environment without any breakglass or Slack variable."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("BREAKGLASS_", "SLACK_"))}


def run(argv: list[str], cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, env=clean_env(), capture_output=True, text=True,  # noqa: S603
                          timeout=timeout, check=False)


def script() -> str:
    """The `breakglass` console script that `pip install` put beside this Python."""
    found = shutil.which("breakglass", path=str(Path(sys.executable).parent))
    assert found, "pip install . did not install the `breakglass` script"
    return found


def test_the_breakglass_script_is_the_same_program_as_python_m_bot(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(EXAMPLE.read_text("utf-8").replace('max_ttl = "1h"', 'max_ttl = "1x"'),
                   encoding="utf-8")
    for args, code, says in [(["--help"], 0, "check-policy"),
                             (["check-policy", str(EXAMPLE)], 0, "OK"),
                             (["check-policy", str(bad)], 2, "tokens.max_ttl: '1x'"),
                             (["no-such-command"], 2, "no-such-command")]:
        by_script = run([script(), *args], tmp_path)
        by_module = run([sys.executable, "-m", "bot", *args], tmp_path)
        assert by_script.returncode == by_module.returncode == code, (args, by_script.stderr)
        assert by_script.stdout == by_module.stdout, args
        assert by_script.stderr == by_module.stderr, args
        assert says in by_script.stdout + by_script.stderr, (args, by_script.stderr)


def test_check_policy_reads_the_default_policy_file(tmp_path: Path) -> None:
    missing = run([script(), "check-policy"], tmp_path)
    assert missing.returncode == 2
    assert "./breakglass.toml" in missing.stderr and "not found" in missing.stderr
    assert "Traceback" not in missing.stderr
    shutil.copy(EXAMPLE, tmp_path / "breakglass.toml")
    found = run([script(), "check-policy"], tmp_path)
    assert found.returncode == 0, found.stderr
    assert "./breakglass.toml: OK" in found.stdout


def test_unset_variables_take_the_contracts_defaults() -> None:
    settings = Settings.from_env({"SLACK_BOT_TOKEN": "xoxb-" + secrets.token_hex(8),
                                  "SLACK_SIGNING_SECRET": secrets.token_hex(16),
                                  "BREAKGLASS_MASTER_KEY": new_master_key()})
    assert settings.app_token is None and not settings.socket_mode  # HTTP mode
    assert settings.api_url == "https://slack.com/api/"
    assert settings.policy_path == "./breakglass.toml"
    assert settings.database_url == "sqlite+aiosqlite:///./breakglass.db"
    assert (settings.host, settings.port) == ("0.0.0.0", 3000)  # noqa: S104
    assert settings.metrics_addr == "127.0.0.1:9464"


def test_demo_runs_the_whole_story_on_loopback(tmp_path: Path) -> None:
    """No Slack variable, no policy, no database: the demo brings its own, in a temporary
    directory, and leaves the working directory as it found it."""
    done = run([script(), "demo"], tmp_path, timeout=150)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    out = done.stdout
    assert "http://127.0.0.1:" in out  # the bot and the emulator, on loopback
    for step in ("/breakglass payments-write", "[Approve]", "[Reveal token]", "*issued*",
                 "*used*", "*revoked*", "*expired*", "*reviewed*", "MAC chain intact"):
        assert step in out, step
    assert "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []  # no breakglass.db or anything else left behind
