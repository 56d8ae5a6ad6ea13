"""bench/ledger_scale.py on tiny sizes: the table, and the ratio line the goal reads."""

from __future__ import annotations

import re
import sys

import pytest

from bench import ledger_scale


def test_a_tiny_run_prints_each_size_and_the_ratio(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", ["ledger_scale", "--sizes", "0,300", "--submits", "5"])
    ledger_scale.main()
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("| API jobs this month | built in | totals rebuilt in | usage read p50")
    assert [line.split("|")[1].strip() for line in lines[2:4]] == ["0", "300"]
    assert re.fullmatch(r"ledger scale: submit p50 at 300 / at 0 = \d+\.\d\d", lines[-1])
