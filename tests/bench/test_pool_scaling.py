"""bench/pool_scaling.py at its smallest: one and two remote workers, a few short jobs; the output's shape only."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_tiny_run_prints_each_size_and_the_ratio() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.pool_scaling", "--workers", "1,2", "--jobs-per-worker", "2", "--seconds", "0.2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    rows = [line.split("|")[1].strip() for line in lines if line.startswith("| ") and "---" not in line]
    assert rows[1:] == ["1", "2", "in-host (pipe), one at a time"]
    assert re.fullmatch(r"pool scaling: 2 workers = \d+\.\d\d x one worker", lines[-1])
