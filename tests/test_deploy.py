"""compose.yaml (PostgreSQL, a migration job, two replicas, a proxy) is consistent with
the code and the docs: there is no Docker engine here to run it, so what can be
checked without one is checked: the services, their order and health checks, the
command the migration job runs, the proxy's upstreams, and the variables they set."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from bot.cli import build_parser

ROOT = Path(__file__).parents[1]
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())
SETUP = (ROOT / "docs" / "setup.md").read_text() + (ROOT / "docs" / "operations.md").read_text()


def test_services_and_their_order() -> None:
    services = COMPOSE["services"]
    assert set(services) == {"postgres", "migrate", "bot-1", "bot-2", "proxy"}
    assert services["postgres"]["volumes"] == ["pgdata:/var/lib/postgresql/data"]
    assert "pgdata" in COMPOSE["volumes"]
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    for name in ("bot-1", "bot-2"):
        bot = services[name]
        assert bot["depends_on"] == {"migrate": {"condition": "service_completed_successfully"}}
        assert bot["environment"]["BREAKGLASS_DATABASE_URL"].startswith("postgresql+asyncpg://")
        assert "/healthz" in " ".join(bot["healthcheck"]["test"])
        assert services["proxy"]["depends_on"][name] == {"condition": "service_healthy"}
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])


def test_the_migration_job_runs_a_real_command() -> None:
    command = COMPOSE["services"]["migrate"]["command"]
    assert command[:1] == ["breakglass"]
    args = build_parser().parse_args(command[1:])
    assert (args.cmd, args.db_cmd) == ("db", "upgrade")


def test_the_proxy_sends_to_every_replica() -> None:
    conf = (ROOT / "deploy" / "nginx.conf").read_text()
    upstreams = set(re.findall(r"server (bot-\d+):3000", conf))
    assert upstreams == {"bot-1", "bot-2"}
    [retry] = re.findall(r"^\s*proxy_next_upstream ([^;]*);", conf, re.M)
    assert "non_idempotent" not in retry  # a POST that reached a replica is never resent


def test_every_variable_is_documented() -> None:
    env_example = (ROOT / "deploy" / "breakglass.env.example").read_text()
    names = set(re.findall(r"^#? ?([A-Z][A-Z0-9_]+)=", env_example, re.M))
    names |= set(COMPOSE["x-bot"]["environment"])
    assert {"SLACK_BOT_TOKEN", "SLACK_SIGNING_SECRET", "BREAKGLASS_MASTER_KEY"} <= names
    for name in names:
        assert f"`{name}`" in SETUP, f"{name} is not documented in docs/setup.md or operations.md"


def test_the_replicas_trust_exactly_the_proxys_forwarded_for() -> None:
    import ipaddress

    from bot.config import parse_trusted_proxies

    trusted, problem = parse_trusted_proxies(
        COMPOSE["x-bot"]["environment"]["BREAKGLASS_TRUSTED_PROXIES"])
    assert problem is None
    proxy = COMPOSE["services"]["proxy"]["networks"]["default"]["ipv4_address"]
    [subnet] = COMPOSE["networks"]["default"]["ipam"]["config"]
    assert [str(n) for n in trusted] == [f"{proxy}/32"]
    assert ipaddress.ip_address(proxy) in ipaddress.ip_network(subnet["subnet"])
    conf = (ROOT / "deploy" / "nginx.conf").read_text()
    assert "X-Forwarded-For $proxy_add_x_forwarded_for" in conf
