"""The Bolt AsyncApp: which listener answers what."""

from __future__ import annotations

import logging
import re

from slack_bolt.async_app import AsyncApp
from slack_sdk.web.async_client import AsyncWebClient

from . import blocks
from .handlers import Handlers


def build_app(handlers: Handlers, client: AsyncWebClient, signing_secret: str | None) -> AsyncApp:
    app = AsyncApp(
        client=client,
        signing_secret=signing_secret or "unused-in-socket-mode",
        # Our /slack/events route verifies signatures itself (with replay and size checks).
        request_verification_enabled=False,
        process_before_response=True,
        logger=logging.getLogger("bot.slack.bolt"),
    )
    app.command("/breakglass")(handlers.on_command)
    app.view(blocks.REQUEST_MODAL)(handlers.on_modal)
    for action_id in (blocks.APPROVE, blocks.DENY, blocks.REVEAL, blocks.REVOKE):
        app.action(action_id)(handlers.on_button)
    app.action(re.compile(".*"))(handlers.on_unknown_action)
    return app
