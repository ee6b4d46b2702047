"""Settings from the environment (contract §1)."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass

from .core.kdf import MasterKeyError, check_master_key
from .preflight import host_problem, parse_database_url
from .store.db import DEFAULT_URL

DEFAULT_API_URL = "https://slack.com/api/"
DEFAULT_METRICS_ADDR = "127.0.0.1:9464"  # /metrics on its own listener (contract §5)


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
    # GET /metrics: its own listener (None: none), and the bearer token that opens it on
    # the main port too (None: /metrics is 404 there).
    metrics_addr: str | None = DEFAULT_METRICS_ADDR
    metrics_token: str | None = None
    # Proxies whose X-Forwarded-For names the client's address (client_auth.py).
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

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
        metrics_addr: str | None = get("BREAKGLASS_METRICS_ADDR", DEFAULT_METRICS_ADDR)
        if metrics_addr and metrics_addr.lower() == "off":
            metrics_addr = None
        elif metrics_addr and (bad_addr := listen_addr_problem(metrics_addr)) is not None:
            problems.append(bad_addr)
        metrics_token = get("BREAKGLASS_METRICS_TOKEN")
        if metrics_token is not None and len(metrics_token) < 16:
            problems.append("BREAKGLASS_METRICS_TOKEN is too short to be a secret: use at least "
                            "16 random characters (e.g. `openssl rand -hex 32`), or unset it")
        trusted_proxies, bad_proxies = parse_trusted_proxies(
            get("BREAKGLASS_TRUSTED_PROXIES") or "")
        if bad_proxies:
            problems.append(bad_proxies)
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
            metrics_addr=metrics_addr,
            metrics_token=metrics_token,
            trusted_proxies=trusted_proxies,
        )


def parse_trusted_proxies(text: str) -> tuple[
        tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...], str | None]:
    """BREAKGLASS_TRUSTED_PROXIES: addresses or networks, separated by commas or spaces;
    (the networks, None) or ((), what is wrong)."""
    found = []
    for word in text.replace(",", " ").split():
        try:
            found.append(ipaddress.ip_network(word, strict=False))
        except ValueError:
            return (), (f"BREAKGLASS_TRUSTED_PROXIES: {word!r} is not an IP address or network: "
                        "list your reverse proxy's addresses, like 10.0.0.5 or 10.0.0.0/24, "
                        "separated by commas, or unset it")
    return tuple(found), None


def split_listen_addr(addr: str) -> tuple[str, int]:
    """`host:port` (an IPv6 host in brackets: `[::1]:9464`) as (host, port)."""
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(addr)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def listen_addr_problem(addr: str) -> str | None:
    try:
        host, _ = split_listen_addr(addr)
    except ValueError:
        host = ""
    if not host or host_problem(host) is not None:
        return (f"BREAKGLASS_METRICS_ADDR {addr!r} is not a listen address: write host:port, "
                "like 127.0.0.1:9464 (this machine only) or 0.0.0.0:9464, or off")
    return None
