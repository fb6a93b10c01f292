"""Progress bars: rates on a terminal, silence elsewhere."""

from __future__ import annotations

import io

from pserver.progress import bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_bar_is_silent_when_the_output_is_not_a_terminal():
    out = io.StringIO()
    with bar(10, "reading", "B", scale=True, file=out) as b:
        b.update(10)
    assert out.getvalue() == ""


def test_a_bar_shows_progress_and_rate_on_a_terminal():
    out = Terminal()
    with bar(4, "passes", "pass", file=out) as b:
        b.update(2)
        b.refresh()
        assert "passes" in out.getvalue() and "2/4" in out.getvalue()
