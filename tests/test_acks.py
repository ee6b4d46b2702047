"""The answers given before any listener runs (slack/acks.py)."""

from __future__ import annotations

from bot.core import commands
from bot.slack import acks

PATTERN = r"INC-\d+"


def form(text: str, command: str = "/breakglass", user: str = "U0ALICE") -> dict[str, list[str]]:
    return {"command": [command], "text": [text], "user_id": [user]}


def test_a_request_is_answered_with_what_happens_next() -> None:
    assert acks.immediate(form("payments-write 30m INC-1 auth down"), None, PATTERN) == {
        "text": "Checking `payments-write` and its trigger conditions…", "response_type": "ephemeral"}


def test_bad_input_is_answered_with_what_to_do() -> None:
    answer = acks.immediate(form("payments-write forever INC-1 x"), None, PATTERN)
    assert answer is not None and answer["response_type"] == "ephemeral"
    assert "forever" in answer["text"]


def test_help_and_the_form() -> None:
    assert acks.immediate(form("help"), None, PATTERN) == {"text": commands.USAGE,
                                                          "response_type": "ephemeral"}
    assert acks.immediate(form(""), None, PATTERN) == {}  # the form opens; empty 200


def test_slack_escapes_are_undone_before_parsing() -> None:
    parsed = acks.parse("payments-write 30m INC-1 a &lt;b&gt; &amp; c", PATTERN)
    assert isinstance(parsed, commands.RequestAccess) and parsed.reason.endswith("a <b> & c")


def test_buttons_get_an_empty_answer_and_forms_wait_for_their_listener() -> None:
    assert acks.immediate({"payload": ["{}"]}, {"type": "block_actions"}, PATTERN) == {}
    assert acks.immediate({"payload": ["{}"]}, {"type": "view_submission"}, PATTERN) is None


def test_other_commands_and_anonymous_ones_go_to_bolt() -> None:
    assert acks.immediate(form("help", command="/other"), None, PATTERN) is None
    assert acks.immediate(form("help", user=""), None, PATTERN) is None
