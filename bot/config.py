"""Settings from the environment (contract §1)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from .core.kdf import MasterKeyError, check_master_key
from .preflight import host_problem, parse_database_url
from .store.db import DEFAULT_URL

DEFAULT_API_URL = "https://slack.com/api/"


class ConfigError(Exception):
    """Missing or invalid variables: one line per problem, each naming the variable and
    saying what to do (`problems`); every problem is reported at once, not one per run."""

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True)
class Settings:
    bot_token: str
    signing_secret: str | None
    app_token: str | None
    api_url: str
    policy_path: str
    database_url: str
    master_key: str
    host: str
    port: int

    @property
    def socket_mode(self) -> bool:
        return bool(self.app_token)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        problems: list[str] = []

        def get(name: str, default: str | None = None) -> str | None:
            value = env.get(name, "").strip()
            return value or default

        bot_token = get("SLACK_BOT_TOKEN") or ""
        if not bot_token:
            problems.append("SLACK_BOT_TOKEN is not set: set it to the bot token (xoxb-…) "
                            "from your Slack app's OAuth & Permissions page")
        elif not bot_token.startswith("xoxb-"):
            problems.append("SLACK_BOT_TOKEN must be a bot token starting with xoxb-")
        app_token = get("SLACK_APP_TOKEN")
        if app_token and not app_token.startswith("xapp-"):
            problems.append("SLACK_APP_TOKEN must be an app-level token starting with xapp-")
        signing_secret = get("SLACK_SIGNING_SECRET")
        if not app_token and not signing_secret:
            problems.append(
                "SLACK_SIGNING_SECRET is not set: HTTP mode needs the signing secret from "
                "your Slack app's Basic Information page (or set SLACK_APP_TOKEN for Socket Mode)")
        master_key = get("BREAKGLASS_MASTER_KEY") or ""
        if not master_key:
            problems.append("BREAKGLASS_MASTER_KEY is not set: generate one with "
                            "`breakglass keys new-master` and keep it outside the database's host")
        else:
            try:
                check_master_key(master_key)
            except MasterKeyError as exc:
                problems.append(str(exc))
        port_text = get("BREAKGLASS_PORT", "3000") or "3000"
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            problems.append(f"BREAKGLASS_PORT must be a port number (1-65535), not {port_text!r}")
        host = get("BREAKGLASS_HOST", "0.0.0.0") or "0.0.0.0"  # noqa: S104 - a server's default
        if (bad_host := host_problem(host)) is not None:
            problems.append(bad_host)
        database_url = get("BREAKGLASS_DATABASE_URL", DEFAULT_URL) or DEFAULT_URL
        if (bad_url := parse_database_url(database_url)[1]) is not None:
            problems.append(bad_url)
        api_url = get("SLACK_API_URL", DEFAULT_API_URL) or DEFAULT_API_URL
        if not api_url.startswith(("https://", "http://")):
            problems.append(f"SLACK_API_URL must be an http(s) URL like {DEFAULT_API_URL}, "
                            f"not {api_url!r}")
        if not api_url.endswith("/"):
            api_url += "/"
        if problems:
            raise ConfigError(problems)
        return cls(
            bot_token=bot_token,
            signing_secret=signing_secret,
            app_token=app_token,
            api_url=api_url,
            policy_path=get("BREAKGLASS_POLICY", "./breakglass.toml") or "./breakglass.toml",
            database_url=database_url,
            master_key=master_key,
            host=host,
            port=int(port_text),
        )
