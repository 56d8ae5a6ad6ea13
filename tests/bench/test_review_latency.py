"""bench/review_latency.py at its smallest: three images, each case's line and the machine line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_tiny_run_prints_each_case() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.review_latency", "--images", "3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [
        line.split("|")[1].strip() for line in done.stdout.splitlines() if line.startswith("| ") and "---" not in line
    ]
    assert rows[1:] == ["no rules (the default)", "40 review phrases", "40 phrases + nudenet (CPU)"]
