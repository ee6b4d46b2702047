"""Settings from the environment (contract §1)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from .core.kdf import MasterKeyError, check_master_key
from .store.db import DEFAULT_URL

DEFAULT_API_URL = "https://slack.com/api/"


class ConfigError(Exception):
    """A missing or invalid variable; the message names it and says what to do."""


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

        def get(name: str, default: str | None = None) -> str | None:
            value = env.get(name, "").strip()
            return value or default

        bot_token = get("SLACK_BOT_TOKEN")
        if not bot_token:
            raise ConfigError(
                "SLACK_BOT_TOKEN is not set: set it to the bot token (xoxb-…) "
                "from your Slack app's OAuth & Permissions page"
            )
        if not bot_token.startswith("xoxb-"):
            raise ConfigError("SLACK_BOT_TOKEN must be a bot token starting with xoxb-")
        app_token = get("SLACK_APP_TOKEN")
        if app_token and not app_token.startswith("xapp-"):
            raise ConfigError("SLACK_APP_TOKEN must be an app-level token starting with xapp-")
        signing_secret = get("SLACK_SIGNING_SECRET")
        if not app_token and not signing_secret:
            raise ConfigError(
                "SLACK_SIGNING_SECRET is not set: HTTP mode needs the signing secret from "
                "your Slack app's Basic Information page (or set SLACK_APP_TOKEN for Socket Mode)"
            )
        master_key = get("BREAKGLASS_MASTER_KEY")
        if not master_key:
            raise ConfigError(
                "BREAKGLASS_MASTER_KEY is not set: generate one with "
                "`breakglass keys new-master` and keep it outside the database's host"
            )
        try:
            check_master_key(master_key)
        except MasterKeyError as exc:
            raise ConfigError(str(exc)) from None
        port_text = get("BREAKGLASS_PORT", "3000") or "3000"
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ConfigError(f"BREAKGLASS_PORT must be a port number, not {port_text!r}")
        api_url = get("SLACK_API_URL", DEFAULT_API_URL) or DEFAULT_API_URL
        if not api_url.endswith("/"):
            api_url += "/"
        return cls(
            bot_token=bot_token,
            signing_secret=signing_secret,
            app_token=app_token,
            api_url=api_url,
            policy_path=get("BREAKGLASS_POLICY", "./breakglass.toml") or "./breakglass.toml",
            database_url=get("BREAKGLASS_DATABASE_URL", DEFAULT_URL) or DEFAULT_URL,
            master_key=master_key,
            host=get("BREAKGLASS_HOST", "0.0.0.0") or "0.0.0.0",  # noqa: S104 - a server's default
            port=int(port_text),
        )
