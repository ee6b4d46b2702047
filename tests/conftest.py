from __future__ import annotations

import pytest

from bot.sandbox import Sandbox


@pytest.fixture
async def sandbox(tmp_path):
    box = Sandbox(directory=tmp_path)
    await box.start()
    try:
        yield box
    finally:
        await box.stop()
