"""Progress reporting: a tqdm bar on a terminal, plain lines (no carriage returns) every 30 s elsewhere."""

from __future__ import annotations

import io

from dreamteacher import runtime


def test_plain_progress_prints_lines_not_carriage_returns(monkeypatch):
    clock = [0.0]
    out = io.StringIO()
    bar = runtime._PlainProgress(100, "pretrain", "step", interval=30.0, file=out)
    bar._clock = lambda: clock[0]
    bar._start = bar._last = 0.0
    for _ in range(10):
        clock[0] += 5.0
        bar.set_postfix(loss="0.5000")
        bar.update(1)
    bar.close()
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    # one line after 30 s, one after 60 s... here 50 s in all: one timed line and the closing one
    assert len(lines) == 2, lines
    assert lines[0] == "pretrain: 6/100 steps, 0.20 step/s, 30 s, ~470 s left (loss=0.5000)"
    assert lines[1].startswith("pretrain: 10/100 steps") and "left" in lines[1]


def test_progress_bar_is_plain_without_a_terminal(monkeypatch):
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert isinstance(runtime.progress_bar(5, "x", "step"), runtime._PlainProgress)
    disabled = runtime.progress_bar(5, "x", "step", disable=True)
    disabled.update(1)
    disabled.close()
    assert not isinstance(disabled, runtime._PlainProgress)
