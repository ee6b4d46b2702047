"""The one exception the core raises at people: a refusal with a message for them."""

from __future__ import annotations


class Refusal(Exception):
    """Something a person asked for was refused.

    `message` is shown to that person as is: it says what was wrong and what
    to do. `code` is a stable name for logs, metrics and the audit log.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
