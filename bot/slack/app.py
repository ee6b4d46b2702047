"""The Bolt AsyncApp: which listener answers what."""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from slack_bolt.async_app import AsyncApp
from slack_bolt.context.respond.async_respond import AsyncRespond
from slack_bolt.context.respond.internals import _build_message
from slack_bolt.request.async_request import AsyncBoltRequest
from slack_bolt.response import BoltResponse
from slack_sdk.web.async_client import AsyncWebClient
from slack_sdk.webhook.async_client import AsyncWebhookClient

from . import blocks, review_blocks
from .acks import COMMAND
from .handlers import Handlers


class _DropTokenNotice(logging.Filter):
    # Bolt warns that SLACK_BOT_TOKEN from the environment is unused because we hand it
    # a configured client; that is intended.
    def filter(self, record: logging.LogRecord) -> bool:
        return "`token` will be unused" not in record.getMessage()


class PooledRespond(AsyncRespond):
    """Bolt's respond(), over the bot's shared connection pool (Bolt's own opens a new
    connection for every message)."""

    def __init__(self, *, response_url: str | None, session: aiohttp.ClientSession) -> None:
        super().__init__(response_url=response_url)
        self.session = session

    async def __call__(self, text: str | dict[str, Any] = "", **kwargs: Any) -> Any:  # type: ignore[override]
        if self.response_url is None:
            raise ValueError("respond is unsupported here as there is no response_url")
        hook = AsyncWebhookClient(url=self.response_url, session=self.session)
        message = _build_message(**text) if isinstance(text, dict) else _build_message(
            text=text, **kwargs)
        return await hook.send_dict(message)


def build_app(handlers: Handlers, client: AsyncWebClient, signing_secret: str | None,
              session: aiohttp.ClientSession | None = None) -> AsyncApp:
    bolt_log = logging.getLogger("bot.slack.bolt")
    bolt_log.addFilter(_DropTokenNotice())
    app = AsyncApp(
        client=client,
        signing_secret=signing_secret or "unused-in-socket-mode",
        # Our /slack/events route verifies signatures itself (with replay and size checks).
        request_verification_enabled=False,
        process_before_response=True,
        logger=bolt_log,
    )
    if session is not None:

        async def pooled_respond(req: AsyncBoltRequest, resp: BoltResponse,
                                 next: Callable[[], Awaitable[BoltResponse]]) -> BoltResponse:
            if req.context.response_url:
                req.context["respond"] = PooledRespond(response_url=req.context.response_url,
                                                       session=session)
            return await next()

        app.middleware(pooled_respond)
    app.command(COMMAND)(handlers.on_command)
    app.view(blocks.REQUEST_MODAL)(handlers.on_modal)
    app.view(review_blocks.REVIEW_MODAL)(handlers.on_review_modal)
    for action_id in (blocks.APPROVE, blocks.DENY, blocks.REVEAL, blocks.REVOKE,
                      review_blocks.REVIEW):
        app.action(action_id)(handlers.on_button)
    app.action(re.compile(".*"))(handlers.on_unknown_action)
    return app
