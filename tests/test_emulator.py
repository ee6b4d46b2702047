"""The Slack emulator, driven over real loopback HTTP."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from urllib.parse import parse_qs

import aiohttp
import pytest
from aiohttp import web
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from bot.local.emulator import SlackEmulator, SlackSender
from bot.slack.signature import SignatureError, verify_signature

TOKEN = "xoxb-emulator-test"
SECRET = "test-signing-secret"


@pytest.fixture
async def emu() -> AsyncIterator[SlackEmulator]:
    async with SlackEmulator(bot_token=TOKEN) as emulator:
        yield emulator


@pytest.fixture
def client(emu: SlackEmulator) -> AsyncWebClient:
    return AsyncWebClient(token=TOKEN, base_url=emu.api_url)


async def test_auth_test_and_bad_tokens(emu: SlackEmulator, client: AsyncWebClient) -> None:
    answer = await client.auth_test()
    assert answer["user_id"] == "UBOT" and answer["team_id"] == "T0EMU" and answer["bot_id"]
    assert emu.calls_to("auth.test")[0].token == TOKEN

    with pytest.raises(SlackApiError) as err:
        await AsyncWebClient(token="xoxb-wrong", base_url=emu.api_url).auth_test()
    assert err.value.response["error"] == "invalid_auth"
    async with aiohttp.ClientSession() as session:
        async with session.post(emu.api_url + "auth.test") as resp:
            assert (await resp.json()) == {"ok": False, "error": "invalid_auth"}
    assert len(emu.calls_to("auth.test")) == 3


async def test_any_bot_token_accepted_without_configured_token() -> None:
    async with SlackEmulator() as emu:
        assert (await AsyncWebClient(token="xoxb-x", base_url=emu.api_url).auth_test())["ok"]
        with pytest.raises(SlackApiError):
            await AsyncWebClient(token="xoxp-user", base_url=emu.api_url).auth_test()


async def test_post_update_delete_keeps_a_transcript(
    emu: SlackEmulator, client: AsyncWebClient
) -> None:
    blocks = [{"type": "section", "text": {"type": "mrkdwn", "text": "*request*"}}]
    first = await client.chat_postMessage(channel="C1", text="request", blocks=blocks)
    second = await client.chat_postMessage(channel="C1", text="other")
    assert first["channel"] == "C1" and first["message"]["blocks"] == blocks
    assert first["ts"] < second["ts"] and len(first["ts"].split(".")[1]) == 6

    updated = await client.chat_update(channel="C1", ts=first["ts"], text="approved")
    assert updated["ts"] == first["ts"] and updated["message"]["text"] == "approved"
    msg = emu.messages("C1")[0]
    assert msg.text == "approved" and msg.blocks == [] and msg.user == "UBOT"
    assert [(v.text, v.blocks) for v in msg.history] == [("request", blocks)]

    with pytest.raises(SlackApiError) as err:
        await client.chat_update(channel="C1", ts="1.000001", text="x")
    assert err.value.response["error"] == "message_not_found"
    with pytest.raises(SlackApiError):
        await client.chat_update(channel="C2", ts=first["ts"], text="x")

    await client.chat_delete(channel="C1", ts=second["ts"])
    assert emu.messages("C1")[1].deleted
    with pytest.raises(SlackApiError):
        await client.chat_update(channel="C1", ts=second["ts"], text="x")
    assert emu.calls_to("chat.update")[0].params["text"] == "approved"


async def test_conversations_history_pages_newest_first_like_slack(
    emu: SlackEmulator, client: AsyncWebClient
) -> None:
    posted = [await client.chat_postMessage(channel="C1", text=f"bot {i}") for i in range(3)]
    people = [emu.post_as("U0ALICE", "C1", f"person {i}") for i in range(4)]
    await client.chat_postMessage(channel="C1", text="reply", thread_ts=posted[0]["ts"])
    await client.chat_delete(channel="C1", ts=posted[1]["ts"])
    await client.chat_postMessage(channel="C2", text="elsewhere")

    seen: list[dict] = []
    cursors: list[str] = []
    cursor = None
    while True:
        page = await client.conversations_history(channel="C1", limit=2, cursor=cursor)
        seen += page["messages"]
        cursor = page["response_metadata"]["next_cursor"]
        assert page["has_more"] is bool(cursor)
        if not cursor:
            break
        cursors.append(cursor)
    # Newest first; no thread reply, no deleted message, nothing from another channel.
    assert [m["text"] for m in seen] == ["person 3", "person 2", "person 1", "person 0",
                                         "bot 2", "bot 0"]
    assert len(cursors) == 2 and len(set(cursors)) == 2
    by_person = [m for m in seen if m["text"].startswith("person")]
    assert all(m["user"] == "U0ALICE" and "bot_id" not in m for m in by_person)
    assert all(m["user"] == "UBOT" and m["bot_id"] for m in seen if m["text"].startswith("bot"))
    assert people[0].ts == by_person[-1]["ts"]

    newer = await client.conversations_history(channel="C1", oldest=people[1].ts)
    assert [m["text"] for m in newer["messages"]] == ["person 3", "person 2"]
    for bad, error in (({"cursor": "not-a-cursor"}, "invalid_cursor"),
                       ({"oldest": "yesterday"}, "invalid_ts_oldest"),
                       ({"limit": "many"}, "invalid_limit")):
        with pytest.raises(SlackApiError) as err:
            await client.conversations_history(channel="C1", **bad)
        assert err.value.response["error"] == error
    assert (await client.conversations_history(channel="C9"))["messages"] == []


async def test_channel_membership_like_slack(emu: SlackEmulator, client: AsyncWebClient) -> None:
    emu.channel_names["C0REVIEWS"] = "break-glass-reviews"
    info = await client.conversations_info(channel="C0REVIEWS")
    assert info["channel"]["is_member"] is True and info["channel"]["name"] == "break-glass-reviews"
    emu.outside_channels.add("C0REVIEWS")
    assert (await client.conversations_info(channel="C0REVIEWS"))["channel"]["is_member"] is False
    with pytest.raises(SlackApiError) as err:
        await client.chat_postMessage(channel="C0REVIEWS", text="card")
    assert err.value.response["error"] == "not_in_channel"
    assert emu.messages("C0REVIEWS") == []
    with pytest.raises(SlackApiError) as err:  # a name is not an ID
        await client.conversations_info(channel="#break-glass-reviews")
    assert err.value.response["error"] == "channel_not_found"
    emu.outside_channels.discard("C0REVIEWS")
    assert (await client.chat_postMessage(channel="C0REVIEWS", text="card"))["ok"]


async def test_dm_by_user_id_and_conversations_open(
    emu: SlackEmulator, client: AsyncWebClient
) -> None:
    opened = await client.conversations_open(users="U123")
    assert opened["channel"]["id"] == "D123" == emu.dm_channel_for("U123")
    posted = await client.chat_postMessage(channel="U123", text="hi")
    assert posted["channel"] == "D123"
    assert [m.text for m in emu.messages("D123")] == ["hi"]
    assert emu.messages("U123") == emu.messages("D123")
    await client.chat_update(channel="D123", ts=posted["ts"], text="hello")

    eph = await client.chat_postEphemeral(channel="C1", user="U123", text="only you")
    assert eph["message_ts"]
    assert [(e.channel, e.user, e.text) for e in emu.ephemerals] == [("C1", "U123", "only you")]


async def test_views_open_and_update(emu: SlackEmulator, client: AsyncWebClient) -> None:
    title = {"type": "plain_text", "text": "Why"}
    view = {"type": "modal", "callback_id": "reason", "title": title, "blocks": [],
            "private_metadata": "req-1"}
    opened = await client.views_open(trigger_id="1.2.abc", view=view)
    view_id = opened["view"]["id"]
    assert view_id.startswith("V") and opened["view"]["callback_id"] == "reason"
    assert emu.views[0].trigger_id == "1.2.abc" and emu.views[0].view == view

    await client.views_update(view_id=view_id, view={**view, "blocks": [{"type": "divider"}]})
    assert emu.views[0].view["blocks"] == [{"type": "divider"}] and emu.views[0].history == [view]
    with pytest.raises(SlackApiError) as err:
        await client.api_call("views.open", json={"view": view})
    assert err.value.response["error"] == "invalid_arguments"
    with pytest.raises(SlackApiError):
        await client.views_update(view_id="VNOPE", view=view)


async def test_form_bodies_get_and_lookups(emu: SlackEmulator, client: AsyncWebClient) -> None:
    blocks = [{"type": "divider"}]
    async with aiohttp.ClientSession() as session:
        form = {"channel": "C9", "blocks": json.dumps(blocks), "token": TOKEN}
        async with session.post(emu.api_url + "chat.postMessage", data=form) as resp:
            assert (await resp.json())["ok"]
    call = emu.calls_to("chat.postMessage")[0]
    assert call.params == {"channel": "C9", "blocks": blocks} and call.token == TOKEN
    assert emu.messages("C9")[0].blocks == blocks

    emu.set_user("U7", real_name="Ada Lovelace")
    user = (await client.users_info(user="U7"))["user"]  # slack_sdk sends this one as GET
    assert user["id"] == "U7" and user["real_name"] == "Ada Lovelace"

    emu.set_usergroup("S01", ["U1", "U2"])
    assert (await client.usergroups_users_list(usergroup="S01"))["users"] == ["U1", "U2"]
    with pytest.raises(SlackApiError) as err:
        await client.usergroups_users_list(usergroup="S02")
    assert err.value.response["error"] == "no_such_subteam"
    with pytest.raises(SlackApiError) as err:
        await client.api_call("emoji.list")
    assert err.value.response["error"] == "unknown_method"


async def test_http_failure_is_recorded_and_changes_nothing(
    emu: SlackEmulator, client: AsyncWebClient
) -> None:
    emu.fail("chat.postMessage", status=503, times=2)
    for _ in range(2):
        with pytest.raises(SlackApiError) as err:
            await client.chat_postMessage(channel="C1", text="x")
        assert err.value.response.status_code == 503
    assert emu.messages("C1") == []
    await client.chat_postMessage(channel="C1", text="x")
    assert [c.fault for c in emu.calls_to("chat.postMessage")] == ["http_503", "http_503", None]
    assert len(emu.messages("C1")) == 1


async def test_rate_limit_and_error_faults(emu: SlackEmulator, client: AsyncWebClient) -> None:
    emu.rate_limit("chat.postMessage", retry_after=7)
    emu.error("chat.postMessage", error="channel_not_found")
    with pytest.raises(SlackApiError) as err:
        await client.chat_postMessage(channel="C1", text="x")
    assert err.value.response.status_code == 429
    assert err.value.response.headers["Retry-After"] == "7"
    assert err.value.response["error"] == "ratelimited"
    with pytest.raises(SlackApiError) as err:
        await client.chat_postMessage(channel="C1", text="x")
    assert err.value.response.status_code == 200
    assert err.value.response["error"] == "channel_not_found"
    faults = [c.fault for c in emu.calls_to("chat.postMessage")]
    assert faults == ["rate_limited", "error:channel_not_found"] and emu.messages("C1") == []


async def test_hang_times_out_the_client_then_completes(emu: SlackEmulator) -> None:
    emu.hang("chat.postMessage", 0.5)
    impatient = AsyncWebClient(token=TOKEN, base_url=emu.api_url, timeout=0.1)  # type: ignore[arg-type]
    with pytest.raises(TimeoutError):
        await impatient.chat_postMessage(channel="C1", text="slow")
    assert emu.calls_to("chat.postMessage")[0].fault == "hang"
    # Like real Slack, the request was still processed after the client gave up.
    await emu.wait_for(lambda: len(emu.messages("C1")) == 1, timeout=3)


async def test_endless_hang_is_released_by_stop() -> None:
    emu = SlackEmulator(bot_token=TOKEN)
    await emu.start()
    emu.hang("auth.test", None)
    call = asyncio.create_task(AsyncWebClient(token=TOKEN, base_url=emu.api_url).auth_test())
    await emu.wait_for(lambda: bool(emu.calls))
    started = time.monotonic()
    await emu.stop()
    assert time.monotonic() - started < 2
    with pytest.raises(SlackApiError) as err:
        await call
    assert err.value.response.status_code == 503


async def test_response_url_sink(emu: SlackEmulator) -> None:
    url = emu.new_response_url()
    assert url.startswith(emu.base_url + "/response/")
    body = {"text": "done", "replace_original": True, "response_type": "ephemeral"}
    async with aiohttp.ClientSession() as session:
        async with session.post(url, json=body) as resp:
            assert resp.status == 200 and await resp.text() == "ok"
        async with session.post(emu.base_url + "/response/unknown", json=body) as resp:
            assert resp.status == 404
        async with session.post(url, data=b"not json") as resp:
            assert resp.status == 400
    assert [(r.url, r.body) for r in emu.responses] == [(url, body)]


async def test_wait_for_times_out_with_context(emu: SlackEmulator, client: AsyncWebClient) -> None:
    await client.auth_test()
    with pytest.raises(TimeoutError, match="auth.test"):
        await emu.wait_for(lambda: False, timeout=0.05)


# -- SlackSender ------------------------------------------------------------
@pytest.fixture
async def app_url() -> AsyncIterator[tuple[str, list[dict[str, list[str]]]]]:
    """A tiny app that checks Slack's signature and records the form it was sent."""
    received: list[dict[str, list[str]]] = []

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        try:
            verify_signature(SECRET, request.headers.get("X-Slack-Request-Timestamp"),
                             request.headers.get("X-Slack-Signature"), body, time.time())
        except SignatureError as exc:
            return web.json_response({"error": str(exc)}, status=401)
        received.append(parse_qs(body.decode()))
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/slack/events", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}/slack/events", received
    await runner.cleanup()


async def test_sender_command_is_signed_and_shaped_like_slack(
    emu: SlackEmulator, app_url: tuple[str, list[dict[str, list[str]]]]
) -> None:
    url, received = app_url
    async with SlackSender(url, SECRET, emu) as sender:
        sent = await sender.command("U1", "grant prod-db 30m")
    assert sent.status == 200 and sent.json == {"ok": True}
    form = {k: v[0] for k, v in received[0].items()}
    assert form["command"] == "/breakglass" and form["text"] == "grant prod-db 30m"
    assert form["user_id"] == "U1" and form["channel_id"] == "C0GENERAL"
    assert form["team_id"] == "T0EMU" and form["channel_name"] == "general"
    assert form["response_url"] == sent.response_url and form["trigger_id"].count(".") == 2
    assert {"token", "team_domain", "user_name", "api_app_id"} <= form.keys()


async def test_sender_click_and_submit_payloads(
    emu: SlackEmulator, client: AsyncWebClient, app_url: tuple[str, list[dict[str, list[str]]]]
) -> None:
    url, received = app_url
    posted = await client.chat_postMessage(channel="C1", text="approve?")
    await client.views_open(trigger_id="1.2.3", view={"type": "modal", "callback_id": "why",
                                                      "private_metadata": "req-9", "blocks": []})
    values = {"reason": {"text": {"type": "plain_text_input", "value": "outage"}}}
    async with SlackSender(url, SECRET, emu) as sender:
        clicked = await sender.click("U2", "approve", "req-9", channel_id="C1")
        await sender.submit_view("U2", "why", values)
    click = json.loads(received[0]["payload"][0])
    assert click["type"] == "block_actions" and click["user"]["id"] == "U2"
    assert click["container"] == {"type": "message", "message_ts": posted["ts"],
                                  "channel_id": "C1", "is_ephemeral": False}
    assert click["message"]["text"] == "approve?" and click["response_url"] == clicked.response_url
    assert click["actions"][0] | {"action_ts": None} == {
        "action_id": "approve", "block_id": "bg", "value": "req-9", "type": "button",
        "action_ts": None}
    submit = json.loads(received[1]["payload"][0])
    assert submit["type"] == "view_submission" and submit["view"]["callback_id"] == "why"
    assert submit["view"]["state"]["values"] == values
    assert submit["view"]["private_metadata"] == "req-9"
    assert submit["view"]["id"] == emu.views[0].id


async def test_sender_raw_and_bad_signatures(
    emu: SlackEmulator, app_url: tuple[str, list[dict[str, list[str]]]]
) -> None:
    url, received = app_url
    async with SlackSender(url, SECRET, emu) as sender:
        good = await sender.raw(b"a=1", sender.sign(b"a=1"))
        stale = await sender.raw(b"a=1", sender.sign(b"a=1", timestamp=int(time.time()) - 600))
        forged = await sender.raw(b"a=1", sender.sign(b"a=2"))
    assert good.status == 200 and received == [{"a": ["1"]}]
    assert stale.status == 401 and "window" in stale.json["error"]
    assert forged.status == 401 and forged.response_url is None
