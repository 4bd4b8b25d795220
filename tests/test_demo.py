"""`make demo`, the README's first command, as it runs: the SDK through the proxy to the fake."""

from __future__ import annotations

import pytest

from trioproxy import demo


async def test_the_demo_shows_suffixes_and_lanes(capsys: pytest.CaptureFixture[str]) -> None:
    await demo.main()
    out = capsys.readouterr().out
    assert "What went upstream: 1 socket(s) opened" in out
    assert out.count(" suffix ") == 2  # turns 2 and 3 of the conversation
    assert "With --lanes: 8 sessions at once, 2 turns each, on 1 upstream socket(s)" in out
    assert "8 of 16 turns sent as suffixes" in out
