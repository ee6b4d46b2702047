"""The Bolt AsyncApp: which listener answers what."""

from __future__ import annotations

import logging
import re

from slack_bolt.async_app import AsyncApp
from slack_sdk.web.async_client import AsyncWebClient

from . import blocks
from .acks import COMMAND
from .handlers import Handlers


class _DropTokenNotice(logging.Filter):
    # Bolt warns that SLACK_BOT_TOKEN from the environment is unused because we hand it
    # a configured client; that is intended.
    def filter(self, record: logging.LogRecord) -> bool:
        return "`token` will be unused" not in record.getMessage()


def build_app(handlers: Handlers, client: AsyncWebClient, signing_secret: str | None) -> AsyncApp:
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
    app.command(COMMAND)(handlers.on_command)
    app.view(blocks.REQUEST_MODAL)(handlers.on_modal)
    for action_id in (blocks.APPROVE, blocks.DENY, blocks.REVEAL, blocks.REVOKE):
        app.action(action_id)(handlers.on_button)
    app.action(re.compile(".*"))(handlers.on_unknown_action)
    return app
