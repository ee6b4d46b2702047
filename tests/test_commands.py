"""The /breakglass command grammar (bot/core/commands.py), pure: empty text opens the
form; help, scopes, status, revoke and drill parse with their arguments; a request
parses its scope, duration, reason and incident reference; every malformed text raises
CommandError with a message that says how to write it (hypothesis checks it never
raises anything else)."""

from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bot.core.commands import (
    DEFAULT_INCIDENT_PATTERN,
    MAX_REASON_LENGTH,
    USAGE,
    CommandError,
    Help,
    ListScopes,
    OpenModal,
    RequestAccess,
    Revoke,
    Status,
    extract_incident,
    parse_command,
)


@pytest.mark.parametrize("text", ["", "   ", "\n\t ", "\u00a0"])
def test_empty_opens_the_modal(text: str) -> None:
    assert parse_command(text) == OpenModal()


@pytest.mark.parametrize("text", ["help", "HELP", " Help ", "help revoke"])
def test_help(text: str) -> None:
    assert parse_command(text) == Help()


@pytest.mark.parametrize(("text", "expected"), [("scopes", ListScopes()), ("Status", Status())])
def test_listing_commands(text: str, expected: object) -> None:
    assert parse_command(text) == expected


@pytest.mark.parametrize("text", ["scopes all", "status now"])
def test_listing_commands_take_no_arguments(text: str) -> None:
    with pytest.raises(CommandError, match="takes no arguments"):
        parse_command(text)


def test_revoke() -> None:
    assert parse_command("revoke R-01HXYZ") == Revoke(target="R-01HXYZ")
    assert parse_command("REVOKE  abc ") == Revoke(target="abc")


@pytest.mark.parametrize("text", ["revoke", "revoke a b"])
def test_revoke_needs_exactly_one_id(text: str) -> None:
    with pytest.raises(CommandError, match=r"`/breakglass revoke ID`"):
        parse_command(text)


def test_request() -> None:
    command = parse_command("payments-write 30m INC-4521 auth provider down")
    assert command == RequestAccess(
        scope="payments-write",
        duration=timedelta(minutes=30),
        reason="INC-4521 auth provider down",
        incident="INC-4521",
    )


def test_request_without_incident() -> None:
    command = parse_command("db-admin 1h30m  the  database\nis on fire ")
    assert isinstance(command, RequestAccess)
    assert command.duration == timedelta(hours=1, minutes=30)
    assert command.reason == "the database is on fire"
    assert command.incident is None


def test_scope_and_duration_are_case_insensitive() -> None:
    command = parse_command("Payments-Write 30M INC-1 x")
    assert isinstance(command, RequestAccess)
    assert command.scope == "payments-write"
    assert command.duration == timedelta(minutes=30)


def test_reason_is_required() -> None:
    with pytest.raises(CommandError) as info:
        parse_command("payments-write 30m")
    assert str(info.value) == (
        "A reason is required: `/breakglass payments-write 30m INC-4521 auth provider down`"
    )


def test_duration_and_reason_are_required() -> None:
    with pytest.raises(CommandError) as info:
        parse_command("db-admin")
    assert str(info.value) == (
        "A duration and a reason are required: "
        "`/breakglass db-admin 30m INC-4521 auth provider down`"
    )


def test_bad_duration_says_why_and_shows_usage() -> None:
    with pytest.raises(CommandError) as info:
        parse_command("payments-write soon INC-1 down")
    message = str(info.value)
    assert "'soon' is not a duration: write it like 90s, 15m, 1h or 1h30m" in message
    assert "`/breakglass payments-write 30m INC-4521 auth provider down`" in message


@pytest.mark.parametrize("text", ["payments-write 0m x", "payments-write 8d x", "p 999h x"])
def test_unusable_durations(text: str) -> None:
    with pytest.raises(CommandError, match="`/breakglass p"):
        parse_command(text)


def test_a_bad_duration_is_quoted_as_typed() -> None:
    with pytest.raises(CommandError, match="'INC-1' is not a duration"):
        parse_command("payments-write INC-1 auth down")


SCOPES = ("payments-write", "db-admin")


@pytest.mark.parametrize("text", ["paymnts-write", "paymnts-write 30m", "paymnts-write soon x",
                                  "Paymnts-Write INC-1 down"])
def test_an_incomplete_request_for_a_scope_that_does_not_exist_says_so_first(text: str) -> None:
    with pytest.raises(CommandError) as info:
        parse_command(text, scopes=SCOPES)
    message = str(info.value)
    assert message.startswith(f"There is no scope `{text.split()[0]}`.")
    assert "`db-admin`, `payments-write`" in message and "/breakglass scopes" in message
    assert "/breakglass paymnts-write" not in message.lower()  # no example with the typo


def test_a_known_scope_or_a_complete_request_is_not_judged_by_the_parser() -> None:
    with pytest.raises(CommandError, match="^A reason is required"):
        parse_command("DB-Admin 30m", scopes=SCOPES)
    with pytest.raises(CommandError, match="^Start with the scope"):
        parse_command("30m", scopes=SCOPES)
    # Complete: the service refuses the unknown scope (and audits the refusal).
    assert isinstance(parse_command("paymnts-write 30m INC-1 down", scopes=SCOPES), RequestAccess)


@pytest.mark.parametrize("text", ["30m payments-write outage", "30m"])
def test_duration_first_is_explained(text: str) -> None:
    with pytest.raises(CommandError, match="Start with the scope"):
        parse_command(text)


def test_reason_length_limit() -> None:
    ok = parse_command("s 1h " + "x" * MAX_REASON_LENGTH)
    assert isinstance(ok, RequestAccess)
    with pytest.raises(CommandError, match=f"keep it to {MAX_REASON_LENGTH}"):
        parse_command("s 1h " + "x" * (MAX_REASON_LENGTH + 1))
    # Collapsed whitespace does not count.
    spaced = parse_command("s 1h " + "a" + " " * 1000 + "b")
    assert isinstance(spaced, RequestAccess)
    assert spaced.reason == "a b"


@pytest.mark.parametrize(
    ("reason", "incident"),
    [
        ("INC-4521 auth provider down", "INC-4521"),
        ("INC-4521: auth provider down", "INC-4521"),
        ("INC-4521, again", "INC-4521"),
        ("INC-4521", "INC-4521"),
        ("SEV1-22 bad", "SEV1-22"),
        ("  INC-7 lead space", "INC-7"),
        ("auth down INC-4521", None),
        ("INC-4521x typo", None),
        ("inc-4521 lowercase", None),
        ("I-1 too short", None),
        ("INC4521 no dash", None),
        ("", None),
    ],
)
def test_extract_incident(reason: str, incident: str | None) -> None:
    assert extract_incident(reason, DEFAULT_INCIDENT_PATTERN) == incident


def test_extract_incident_with_custom_pattern() -> None:
    assert extract_incident("#4521 down", r"#\d+") == "#4521"
    assert extract_incident("PD-1 down", r"#\d+") is None
    command = parse_command("s 5m #77 down", incident_pattern=r"#\d+")
    assert isinstance(command, RequestAccess)
    assert command.incident == "#77"
    assert command.reason == "#77 down"


def test_usage_lists_every_form() -> None:
    for form in [
        "/breakglass SCOPE DURATION REASON",
        "`/breakglass`",
        "/breakglass scopes",
        "/breakglass status",
        "/breakglass revoke ID",
        "/breakglass help",
    ]:
        assert form in USAGE


def test_command_error_is_a_value_error() -> None:
    assert issubclass(CommandError, ValueError)


WORDS = st.sampled_from(
    [
        "help",
        "scopes",
        "status",
        "revoke",
        "payments-write",
        "30m",
        "1h30m",
        "0s",
        "INC-1",
        "x",
        "",
        " ",
        "\n",
        "HELP",
        "999999h",
        "-5m",
        "é",
        "\u2028",
        "\x00",
    ]
)


@given(st.one_of(st.text(), st.lists(WORDS, max_size=8).map(" ".join)))
def test_parse_command_raises_only_command_error(text: str) -> None:
    try:
        command = parse_command(text)
    except CommandError as exc:
        assert str(exc)
        return
    if isinstance(command, RequestAccess):
        assert command.reason and command.reason == command.reason.strip()
        assert len(command.reason) <= MAX_REASON_LENGTH
        assert timedelta(0) < command.duration <= timedelta(days=7)
        if command.incident is not None:
            assert command.reason.startswith(command.incident)
