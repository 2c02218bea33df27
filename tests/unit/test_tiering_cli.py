"""The recompute command line refuses bad options before touching a database."""

from __future__ import annotations

import pytest

from services.tiering.cli import run


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["recompute", "--pause-ms", "-1"], "--pause-ms must not be negative"),
        (["recompute", "--chunk-size", "0"], "--chunk-size must be at least 1"),
        (["recompute", "--as-of", "2026-12-31T16:00:00"], "--as-of needs a time zone"),
    ],
)
def test_bad_options_are_refused_with_the_reason(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(argv) == 2
    assert message in capsys.readouterr().err
