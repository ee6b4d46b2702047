"""The policy file (bot/core/policy.py): the contract's example loads, a minimal one
gets the defaults; invalid TOML names the file and line; every key is strictly typed;
unknown keys, bad durations, unknown group/trigger references, a quorum above the
approver pool, a TTL above the ceiling and subcommands used as scope names are errors
naming their key path, all collected at once; the helpers (scope_named, members,
usergroups, effective_ttl, summary) behave; and arbitrary dicts, TOML and text raise
only PolicyError (hypothesis)."""

import copy
import hashlib
import json
import tomllib
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.core.policy import (
    Client,
    Group,
    Policy,
    PolicyError,
    RequestSettings,
    Scope,
    SlackSettings,
    TokenSettings,
    Trigger,
    load_policy,
    parse_policy,
    validate_policy,
)

SECRET_SHA256 = hashlib.sha256(b"payments-api-secret").hexdigest()

# The example from contract section 2, verbatim but for the secret hash.
CONTRACT_EXAMPLE = """
[slack]
reviewer_channel = "C0REVIEWS"      # approval cards go here
incident_channel = "C0INCIDENT"     # live alerts go here

[tokens]
issuer = "https://breakglass.example.internal"
algorithm = "RS256"                 # or ES256, EdDSA
delivery = "reveal"                 # or "message"
default_ttl = "15m"
max_ttl = "1h"                      # hard ceiling, whatever a scope says

[requests]
expire_after = "30m"                # a request with no quorum by then is closed
escalate_after = "5m"               # optional: remind/escalate before that

[groups.oncall]
members = ["U01ONCALL1", "U01ONCALL2"]   # Slack user IDs
usergroup = "S01ONCALL"                  # optional Slack user group, resolved live

[groups.sre-leads]
members = ["U01LEAD1", "U01LEAD2", "U01LEAD3"]

[triggers.primary-auth-down]
description = "Primary auth provider fails its health check"
http = "http://127.0.0.1:8081/health"
holds_when = "down"   # down: connection error, timeout or status >= 400; up: status 2xx
timeout = "2s"

[scopes.payments-write]
description = "Write access to the payments API"
audience = "payments-api"
permissions = ["payments:read", "payments:write"]
requesters = ["oncall"]             # groups allowed to ask
approvers = ["sre-leads"]           # groups whose clicks count
quorum = 2                          # distinct approvers, never the requester
max_ttl = "30m"
triggers = ["primary-auth-down"]    # all must hold at request time

[clients.payments-api]              # a relying service
secret_sha256 = "<hex sha256 of the client secret>"
audiences = ["payments-api"]
""".replace("<hex sha256 of the client secret>", SECRET_SHA256)

MINIMAL = """
[slack]
reviewer_channel = "C1"
incident_channel = "C2"

[tokens]
issuer = "https://bg.example"

[groups.oncall]
members = ["U01A", "U01B"]

[scopes.read]
description = "Read"
audience = "api"
permissions = ["api:read"]
requesters = ["oncall"]
approvers = ["oncall"]
"""


def example_data() -> dict[str, Any]:
    return tomllib.loads(CONTRACT_EXAMPLE)


def errors_of(data: dict[str, Any] | str) -> list[str]:
    with pytest.raises(PolicyError) as info:
        if isinstance(data, str):
            parse_policy(data)
        else:
            validate_policy(data)
    assert info.value.errors, "a PolicyError always carries at least one message"
    assert str(info.value) == "\n".join(info.value.errors)
    return info.value.errors


# -- the contract example -------------------------------------------------


def test_contract_example_loads() -> None:
    policy = parse_policy(CONTRACT_EXAMPLE)
    assert policy.slack == SlackSettings(
        reviewer_channel="C0REVIEWS", incident_channel="C0INCIDENT"
    )
    assert policy.tokens.issuer == "https://breakglass.example.internal"
    assert policy.tokens.algorithm == "RS256"
    assert policy.tokens.delivery == "reveal"
    assert policy.tokens.default_ttl == timedelta(minutes=15)
    assert policy.tokens.max_ttl == timedelta(hours=1)
    assert policy.requests.expire_after == timedelta(minutes=30)
    assert policy.requests.escalate_after == timedelta(minutes=5)
    assert policy.requests.rate_limit == 5
    assert policy.requests.rate_window == timedelta(minutes=10)
    assert policy.groups["oncall"].members == ["U01ONCALL1", "U01ONCALL2"]
    assert policy.groups["oncall"].usergroup == "S01ONCALL"
    assert policy.groups["sre-leads"].usergroup is None
    trigger = policy.triggers["primary-auth-down"]
    assert trigger.http == "http://127.0.0.1:8081/health"
    assert trigger.holds_when == "down"
    assert trigger.timeout == timedelta(seconds=2)
    scope = policy.scopes["payments-write"]
    assert scope.audience == "payments-api"
    assert scope.permissions == ["payments:read", "payments:write"]
    assert scope.requesters == ["oncall"]
    assert scope.approvers == ["sre-leads"]
    assert scope.quorum == 2
    assert scope.max_ttl == timedelta(minutes=30)
    assert scope.triggers == ["primary-auth-down"]
    assert policy.clients["payments-api"] == Client(
        secret_sha256=SECRET_SHA256, audiences=["payments-api"]
    )


def test_minimal_policy_uses_defaults() -> None:
    policy = parse_policy(MINIMAL)
    assert policy.requests == RequestSettings()
    assert policy.requests.escalate_after is None
    assert policy.requests.incident_pattern == r"[A-Z][A-Z0-9]+-\d+"
    assert policy.triggers == {}
    assert policy.clients == {}
    assert policy.tokens == TokenSettings(issuer="https://bg.example")
    assert policy.scopes["read"].quorum == 1
    assert policy.scopes["read"].max_ttl is None
    assert policy.scopes["read"].triggers == []


def test_models_are_frozen() -> None:
    policy = parse_policy(MINIMAL)
    with pytest.raises(ValueError):
        policy.tokens.issuer = "x"


def test_load_policy(tmp_path: Path) -> None:
    path = tmp_path / "breakglass.toml"
    path.write_text(CONTRACT_EXAMPLE, encoding="utf-8")
    assert load_policy(path) == parse_policy(CONTRACT_EXAMPLE)
    assert load_policy(str(path)) == parse_policy(CONTRACT_EXAMPLE)


def test_load_policy_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert info.value.errors == [f"{path}: file not found"]


def test_load_policy_directory_and_binary(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="is a directory"):
        load_policy(tmp_path)
    binary = tmp_path / "b.toml"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(PolicyError, match="not UTF-8"):
        load_policy(binary)


def test_invalid_toml_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[slack]\nreviewer_channel = \n", encoding="utf-8")
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    (message,) = info.value.errors
    assert message.startswith(f"{path}: invalid TOML: ")
    assert "line 2" in message


def test_invalid_toml_default_source() -> None:
    (message,) = errors_of("a = [")
    assert message.startswith("<policy>: invalid TOML: ")


def test_deep_nesting_is_a_policy_error() -> None:
    (message,) = errors_of("a = " + "[" * 100_000)
    assert "invalid TOML" in message


# -- structural errors ----------------------------------------------------


def test_missing_sections() -> None:
    errors = errors_of("")
    assert errors == [
        "slack: missing required section",
        "tokens: missing required section",
        "groups: missing required section",
        "scopes: missing required section",
    ]


def test_requests_section_is_optional() -> None:
    data = example_data()
    del data["requests"]
    assert validate_policy(data).requests == RequestSettings()


def test_missing_issuer() -> None:
    data = example_data()
    del data["tokens"]["issuer"]
    assert errors_of(data) == ["tokens.issuer: missing required key"]


def test_unknown_keys() -> None:
    data = example_data()
    data["groups"]["oncall"]["colour"] = "red"
    data["extra"] = 1
    data["scopes"]["payments-write"]["ttl"] = "5m"
    assert errors_of(data) == [
        "groups.oncall.colour: unknown key",
        "scopes.payments-write.ttl: unknown key",
        "extra: unknown key",
    ]


def test_bad_duration() -> None:
    data = example_data()
    data["tokens"]["max_ttl"] = "1x"
    assert errors_of(data) == [
        "tokens.max_ttl: '1x' is not a duration: write it like 90s, 15m, 1h or 1h30m"
    ]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0s", "duration must be longer than 0s: write it like 90s, 15m, 1h or 1h30m"),
        (30, 'must be a duration in quotes, like "15m" (got 30)'),
        ("8d", "'8d' is not a duration: write it like 90s, 15m, 1h or 1h30m"),
        ("200h", "'200h' is too long: a duration can be at most 168h (7 days)"),
    ],
)
def test_more_bad_durations(value: object, message: str) -> None:
    data = example_data()
    data["triggers"]["primary-auth-down"]["timeout"] = value
    assert errors_of(data) == [f"triggers.primary-auth-down.timeout: {message}"]


def test_collects_all_errors_at_once() -> None:
    data = example_data()
    data["tokens"]["algorithm"] = "HS256"
    data["tokens"]["delivery"] = "email"
    data["groups"]["sre-leads"]["members"] = ["bob", "U01LEAD2"]
    data["triggers"]["primary-auth-down"]["http"] = "ftp://x"
    data["scopes"]["payments-write"]["quorum"] = 0
    data["scopes"]["payments-write"]["permissions"] = []
    data["clients"]["payments-api"]["secret_sha256"] = "ABC"
    del data["slack"]
    errors = errors_of(data)
    assert errors == [
        "slack: missing required section",
        "tokens.algorithm: must be one of 'RS256', 'ES256' or 'EdDSA' (got 'HS256')",
        "tokens.delivery: must be one of 'reveal' or 'message' (got 'email')",
        "groups.sre-leads.members[0]: 'bob' is not a Slack user ID (like U01ABCDEF)",
        "triggers.primary-auth-down.http: 'ftp://x' is not an http:// or https:// URL",
        "scopes.payments-write.permissions: must not be empty",
        "scopes.payments-write.quorum: must be at least 1 (got 0)",
        "clients.payments-api.secret_sha256: must be the SHA-256 of the client secret as "
        "64 lowercase hex characters (e.g. the output of `printf %s SECRET | sha256sum`)",
    ]


def test_structural_and_reference_errors_together() -> None:
    data = example_data()
    data["tokens"]["algorithm"] = "HS256"
    data["scopes"]["payments-write"]["approvers"] = ["leads"]
    assert errors_of(data) == [
        "tokens.algorithm: must be one of 'RS256', 'ES256' or 'EdDSA' (got 'HS256')",
        "scopes.payments-write.approvers: unknown group 'leads' "
        "(defined groups: oncall, sre-leads)",
    ]


def test_a_broken_group_is_not_also_reported_as_unknown() -> None:
    data = example_data()
    data["groups"]["sre-leads"]["colour"] = "red"
    assert errors_of(data) == ["groups.sre-leads.colour: unknown key"]


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("scopes", "quorum", "2", "must be a whole number (got '2')"),
        ("scopes", "quorum", True, "must be a whole number (got true)"),
        ("scopes", "quorum", 2.0, "must be a whole number (got 2.0)"),
        ("scopes", "description", 5, "must be a string (got 5)"),
        ("scopes", "requesters", "oncall", "must be a list (got 'oncall')"),
        ("scopes", "approvers", [], "must not be empty"),
        ("scopes", "audience", "", "must not be empty"),
        ("scopes", "audience", "a b", "'a b' must not contain spaces"),
    ],
)
def test_types_are_strict(section: str, key: str, value: object, message: str) -> None:
    data = example_data()
    data[section]["payments-write"][key] = value
    assert errors_of(data)[0] == f"{section}.payments-write.{key}: {message}"


def test_permission_must_be_a_scope_token() -> None:
    data = example_data()
    data["scopes"]["payments-write"]["permissions"] = ["payments:read", "pay write"]
    (message,) = errors_of(data)
    assert message.startswith(
        "scopes.payments-write.permissions[1]: 'pay write' is not a permission"
    )


def test_section_of_the_wrong_type() -> None:
    data = example_data()
    data["slack"] = "C0REVIEWS"
    data["groups"] = ["oncall"]
    errors = errors_of(data)
    assert "slack: must be a table (got 'C0REVIEWS')" in errors
    assert "groups: must be a table (got a list)" in errors


def test_group_needs_members_or_usergroup() -> None:
    data = example_data()
    data["groups"]["empty"] = {}
    data["groups"]["live"] = {"usergroup": "S0LIVE"}
    assert errors_of(data) == [
        "groups.empty: a group needs members (Slack user IDs) or a usergroup"
    ]


def test_group_member_and_usergroup_ids() -> None:
    data = example_data()
    data["groups"]["oncall"]["members"] = ["W01ENTERPRISE", "u01lower"]
    data["groups"]["oncall"]["usergroup"] = "G123"
    assert errors_of(data) == [
        "groups.oncall.members[1]: 'u01lower' is not a Slack user ID (like U01ABCDEF)",
        "groups.oncall.usergroup: 'G123' is not a Slack user group ID (like S01ABCDEF)",
    ]


def test_duplicate_member() -> None:
    data = example_data()
    data["groups"]["oncall"]["members"] = ["U01A", "U01A"]
    assert errors_of(data) == ["groups.oncall.members: 'U01A' is listed more than once"]


@pytest.mark.parametrize(
    ("section", "name"), [("scopes", "Payments"), ("groups", "sre leads"), ("scopes", "-x")]
)
def test_names(section: str, name: str) -> None:
    data = example_data()
    data[section][name] = copy.deepcopy(next(iter(data[section].values())))
    (message,) = errors_of(data)
    key = json.dumps(name) if " " in name else name
    assert message.startswith(f"{section}.{key}: '{name}' is not a valid ")
    assert "use lowercase letters, digits, '-' and '_'" in message


@pytest.mark.parametrize("word", ["help", "scopes", "status", "revoke"])
def test_subcommands_cannot_be_scope_names(word: str) -> None:
    data = example_data()
    data["scopes"][word] = copy.deepcopy(data["scopes"]["payments-write"])
    assert errors_of(data) == [
        f"scopes.{word}: '{word}' is a /breakglass subcommand, so it cannot be a scope name; "
        "pick another"
    ]


def test_client_name_cannot_hold_a_colon() -> None:
    data = example_data()
    data["clients"]["a:b"] = copy.deepcopy(data["clients"]["payments-api"])
    (message,) = errors_of(data)
    assert message.startswith('clients."a:b": ')


def test_at_least_one_scope() -> None:
    data = example_data()
    data["scopes"] = {}
    del data["clients"]
    assert errors_of(data) == ["scopes: define at least one scope"]


@pytest.mark.parametrize(
    ("pattern", "fragment"),
    [
        ("[A-Z", "is not a valid regular expression"),
        (".*", "matches an empty string"),
        ("(?i)INC-\\d+", "is not a valid regular expression"),
    ],
)
def test_incident_pattern_must_compile(pattern: str, fragment: str) -> None:
    data = example_data()
    data["requests"]["incident_pattern"] = pattern
    (message,) = errors_of(data)
    assert message.startswith("requests.incident_pattern: ")
    assert fragment in message


def test_rate_limit() -> None:
    data = example_data()
    data["requests"]["rate_limit"] = 0
    assert errors_of(data) == ["requests.rate_limit: must be at least 1 (got 0)"]
    data["requests"]["rate_limit"] = 2
    data["requests"]["rate_window"] = "1h"
    policy = validate_policy(data)
    assert policy.requests.rate_limit == 2
    assert policy.requests.rate_window == timedelta(hours=1)


def test_trigger_urls_and_holds_when() -> None:
    data = example_data()
    trigger = data["triggers"]["primary-auth-down"]
    trigger["http"] = "https://auth.example/health?deep=1"
    trigger["holds_when"] = "up"
    assert validate_policy(data).triggers["primary-auth-down"].holds_when == "up"
    for bad in ["auth.example/health", "http://", "http://host:99999/", "javascript:alert(1)"]:
        trigger["http"] = bad
        (message,) = errors_of(data)
        assert (
            message == f"triggers.primary-auth-down.http: '{bad}' is not an http:// or https:// URL"
        )


def test_algorithms() -> None:
    data = example_data()
    for algorithm in ["RS256", "ES256", "EdDSA"]:
        data["tokens"]["algorithm"] = algorithm
        assert validate_policy(data).tokens.algorithm == algorithm
    data["tokens"]["delivery"] = "message"
    assert validate_policy(data).tokens.delivery == "message"


# -- cross-references -----------------------------------------------------


def test_unknown_approver_group() -> None:
    data = example_data()
    data["scopes"]["db-admin"] = copy.deepcopy(data["scopes"]["payments-write"])
    data["scopes"]["db-admin"]["approvers"] = ["leads"]
    assert errors_of(data) == [
        "scopes.db-admin.approvers: unknown group 'leads' (defined groups: oncall, sre-leads)"
    ]


def test_unknown_requester_group() -> None:
    data = example_data()
    data["scopes"]["payments-write"]["requesters"] = ["oncall", "devs"]
    assert errors_of(data) == [
        "scopes.payments-write.requesters: unknown group 'devs' (defined groups: oncall, sre-leads)"
    ]


def test_unknown_trigger() -> None:
    data = example_data()
    data["scopes"]["payments-write"]["triggers"] = ["auth-down"]
    assert errors_of(data) == [
        "scopes.payments-write.triggers: unknown trigger 'auth-down' "
        "(defined triggers: primary-auth-down)"
    ]
    del data["triggers"]
    assert errors_of(data) == [
        "scopes.payments-write.triggers: unknown trigger 'auth-down' (no triggers defined)"
    ]


def test_scope_max_ttl_above_ceiling() -> None:
    data = example_data()
    data["scopes"]["payments-write"]["max_ttl"] = "2h"
    assert errors_of(data) == ["scopes.payments-write.max_ttl: 2h is above tokens.max_ttl (1h)"]


def test_default_ttl_above_ceiling() -> None:
    data = example_data()
    data["tokens"]["default_ttl"] = "1h30m"
    assert errors_of(data) == ["tokens.default_ttl: 1h30m is above tokens.max_ttl (1h)"]


def test_unwritten_default_ttl_follows_a_low_ceiling() -> None:
    data = example_data()
    del data["tokens"]["default_ttl"]
    data["tokens"]["max_ttl"] = "10m"
    data["scopes"]["payments-write"]["max_ttl"] = "5m"
    assert validate_policy(data).tokens.default_ttl == timedelta(minutes=10)


def test_escalate_after_must_come_before_expiry() -> None:
    data = example_data()
    data["requests"]["escalate_after"] = "30m"
    assert errors_of(data) == [
        "requests.escalate_after: 30m is not before requests.expire_after (30m)"
    ]


def test_client_audience_without_scope() -> None:
    data = example_data()
    data["clients"]["payments-api"]["audiences"] = ["payments-api", "ledger-api"]
    assert errors_of(data) == [
        "clients.payments-api.audiences: no scope has audience 'ledger-api' "
        "(scope audiences: payments-api)"
    ]


def test_quorum_above_approver_pool() -> None:
    data = example_data()
    data["groups"]["sre-leads"]["members"] = ["U01LEAD1", "U01LEAD2"]
    data["scopes"]["payments-write"]["quorum"] = 3
    assert errors_of(data) == [
        "scopes.payments-write.quorum: 3 exceeds the 2 members of approver groups [sre-leads]"
    ]


def test_quorum_pool_counts_distinct_members_across_groups() -> None:
    data = example_data()
    data["groups"]["dbas"] = {"members": ["U01LEAD1", "U01DBA1"]}
    data["scopes"]["payments-write"]["approvers"] = ["sre-leads", "dbas"]
    data["scopes"]["payments-write"]["quorum"] = 4
    assert validate_policy(data).scopes["payments-write"].quorum == 4
    data["scopes"]["payments-write"]["quorum"] = 5
    assert errors_of(data) == [
        "scopes.payments-write.quorum: 5 exceeds the 4 members of approver groups [sre-leads, dbas]"
    ]


def test_quorum_check_skipped_for_live_usergroups() -> None:
    data = example_data()
    data["scopes"]["payments-write"]["approvers"] = ["oncall"]
    data["scopes"]["payments-write"]["quorum"] = 9
    assert validate_policy(data).scopes["payments-write"].quorum == 9


def test_all_reference_errors_are_collected() -> None:
    data = example_data()
    data["tokens"]["default_ttl"] = "2h"
    scope = data["scopes"]["payments-write"]
    scope["approvers"] = ["leads"]
    scope["requesters"] = ["devs"]
    scope["triggers"] = ["nope"]
    scope["max_ttl"] = "3h"
    data["clients"]["payments-api"]["audiences"] = ["other"]
    assert errors_of(data) == [
        "tokens.default_ttl: 2h is above tokens.max_ttl (1h)",
        "scopes.payments-write.requesters: unknown group 'devs' "
        "(defined groups: oncall, sre-leads)",
        "scopes.payments-write.approvers: unknown group 'leads' "
        "(defined groups: oncall, sre-leads)",
        "scopes.payments-write.triggers: unknown trigger 'nope' "
        "(defined triggers: primary-auth-down)",
        "scopes.payments-write.max_ttl: 3h is above tokens.max_ttl (1h)",
        "clients.payments-api.audiences: no scope has audience 'other' "
        "(scope audiences: payments-api)",
    ]


def test_model_validate_directly_also_checks_references() -> None:
    data = example_data()
    data["scopes"]["payments-write"]["approvers"] = ["leads"]
    with pytest.raises(ValueError, match="unknown group 'leads'"):
        Policy.model_validate(data)


# -- helpers --------------------------------------------------------------


def test_scope_named() -> None:
    policy = parse_policy(CONTRACT_EXAMPLE)
    assert policy.scope_named("payments-write") is policy.scopes["payments-write"]
    assert policy.scope_named("Payments-Write") is policy.scopes["payments-write"]
    assert policy.scope_named("nope") is None


def test_static_members_and_usergroups() -> None:
    policy = parse_policy(CONTRACT_EXAMPLE)
    assert policy.static_members(["oncall"]) == frozenset({"U01ONCALL1", "U01ONCALL2"})
    assert policy.static_members(["oncall", "sre-leads", "unknown"]) == frozenset(
        {"U01ONCALL1", "U01ONCALL2", "U01LEAD1", "U01LEAD2", "U01LEAD3"}
    )
    assert policy.static_members([]) == frozenset()
    assert policy.usergroups(["oncall", "sre-leads", "oncall"]) == ("S01ONCALL",)
    assert policy.usergroups(["sre-leads"]) == ()


def test_effective_ttl() -> None:
    policy = parse_policy(CONTRACT_EXAMPLE)
    scope = policy.scopes["payments-write"]  # max_ttl 30m, tokens.max_ttl 1h, default 15m
    assert policy.effective_ttl(scope, None) == (timedelta(minutes=15), False)
    assert policy.effective_ttl(scope, timedelta(minutes=10)) == (timedelta(minutes=10), False)
    assert policy.effective_ttl(scope, timedelta(minutes=30)) == (timedelta(minutes=30), False)
    assert policy.effective_ttl(scope, timedelta(hours=2)) == (timedelta(minutes=30), True)
    unbounded = scope.model_copy(update={"max_ttl": None})
    assert policy.effective_ttl(unbounded, timedelta(hours=2)) == (timedelta(hours=1), True)
    tight = scope.model_copy(update={"max_ttl": timedelta(minutes=5)})
    assert policy.effective_ttl(tight, None) == (timedelta(minutes=5), False)
    with pytest.raises(ValueError):
        policy.effective_ttl(scope, timedelta(0))


def test_summary() -> None:
    summary = parse_policy(CONTRACT_EXAMPLE).summary()
    assert "1 scope: payments-write" in summary
    assert "2 groups: oncall (2 members, usergroup S01ONCALL), sre-leads (3 members)" in summary
    assert "1 trigger: primary-auth-down" in summary
    assert "1 client: payments-api" in summary
    assert "0 clients" in parse_policy(MINIMAL).summary()


def test_models_can_be_built_in_code() -> None:
    group = Group(members=["U01A"])
    assert group.usergroup is None
    trigger = Trigger(description="d", http="http://localhost:1/")
    assert trigger.timeout == timedelta(seconds=2)
    scope = Scope(
        description="d", audience="a", permissions=["p"], requesters=["g"], approvers=["g"]
    )
    assert scope.quorum == 1
    assert TokenSettings(issuer="i", max_ttl=timedelta(minutes=20)).max_ttl == timedelta(minutes=20)


# -- properties -----------------------------------------------------------

SCALARS = st.one_of(
    st.text(max_size=12),
    st.sampled_from(
        [
            "15m",
            "1x",
            "0s",
            "RS256",
            "U01A",
            "S01A",
            "oncall",
            "sre-leads",
            "payments-api",
            "http://127.0.0.1/",
            SECRET_SHA256,
            "[A-Z",
        ]
    ),
    st.integers(min_value=-3, max_value=10**20),
    st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False),
)
KEYS = st.one_of(
    st.sampled_from(
        sorted(
            {
                "slack",
                "tokens",
                "requests",
                "groups",
                "triggers",
                "scopes",
                "clients",
                "members",
                "usergroup",
                "quorum",
                "approvers",
                "requesters",
                "max_ttl",
                "audience",
                "audiences",
                "help",
            }
        )
    ),
    st.text(max_size=8),
)
TOML_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(KEYS, inner, max_size=4)),
    max_leaves=20,
)


@given(st.dictionaries(KEYS, TOML_VALUES, max_size=8))
def test_validate_policy_raises_only_policy_error_on_arbitrary_dicts(data: dict[str, Any]) -> None:
    try:
        validate_policy(data)
    except PolicyError as exc:
        assert exc.errors
        assert all(isinstance(e, str) and e for e in exc.errors)


def _mutations() -> st.SearchStrategy[list[tuple[list[str], object]]]:
    paths = st.lists(
        st.sampled_from(
            [
                "slack",
                "tokens",
                "requests",
                "groups",
                "triggers",
                "scopes",
                "clients",
                "oncall",
                "sre-leads",
                "payments-write",
                "primary-auth-down",
                "payments-api",
                "quorum",
                "max_ttl",
                "members",
                "approvers",
                "audiences",
                "default_ttl",
                "issuer",
            ]
        ),
        min_size=1,
        max_size=3,
    )
    return st.lists(st.tuples(paths, st.one_of(st.just(None), TOML_VALUES)), max_size=4)


@settings(max_examples=300)
@given(_mutations())
def test_mutated_contract_example_raises_only_policy_error(
    mutations: list[tuple[list[str], object]],
) -> None:
    data: Any = example_data()
    for path, value in mutations:
        target = data
        for key in path[:-1]:
            if not isinstance(target, dict) or not isinstance(target.get(key), dict):
                break
            target = target[key]
        else:
            if isinstance(target, dict):
                if value is None:
                    target.pop(path[-1], None)
                else:
                    target[path[-1]] = value
    try:
        validate_policy(data)
    except PolicyError as exc:
        assert exc.errors


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value) if isinstance(value, int) else json.dumps(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return (
            "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
        )
    raise TypeError(value)


@given(st.dictionaries(KEYS, TOML_VALUES, max_size=8))
def test_parse_policy_raises_only_policy_error_on_arbitrary_toml(data: dict[str, Any]) -> None:
    text = "\n".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in data.items())
    try:
        parse_policy(text)
    except PolicyError as exc:
        assert exc.errors


@given(st.text())
def test_parse_policy_raises_only_policy_error_on_arbitrary_text(text: str) -> None:
    try:
        parse_policy(text)
    except PolicyError as exc:
        assert exc.errors
