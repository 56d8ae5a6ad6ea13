"""The worker's test-only fault switch, FLUX_BOT_WORKER_FAULT: real failures through the real code path.

"oom_at_step=2", "hang_at_step=2", "crash_at_step=2" or "stall_at_step=2", optionally followed by ";job=N" to fire
only in the Nth job the process serves (counted from 1, warm-up excluded). It provokes an OOM, a hang (a step that
never returns, cancel or not), a native crash and a slow step (one that lasts until the job is cancelled); it does
nothing when unset.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

log = logging.getLogger(__name__)

FAULT_ENV = "FLUX_BOT_WORKER_FAULT"

FaultKind = Literal["oom", "hang", "crash", "stall"]


@dataclass(frozen=True, slots=True)
class Fault:
    kind: FaultKind
    step: int
    job: int | None = None

    def fires(self, job_number: int, step: int) -> bool:
        return step == self.step and (self.job is None or self.job == job_number)


def parse_fault(text: str | None) -> Fault | None:
    if not text:
        return None
    values: dict[str, int] = {}
    for part in text.split(";"):
        key, sep, value = part.partition("=")
        if not sep or not value.strip().isdigit():
            raise ValueError(f"{FAULT_ENV}: expected KEY=NUMBER parts separated by ';', got {part!r}")
        values[key.strip()] = int(value)
    job = values.pop("job", None)
    kinds: dict[str, FaultKind] = {
        "oom_at_step": "oom",
        "hang_at_step": "hang",
        "crash_at_step": "crash",
        "stall_at_step": "stall",
    }
    if len(values) != 1 or next(iter(values)) not in kinds:
        raise ValueError(f"{FAULT_ENV}: name exactly one of {', '.join(kinds)} (and optionally job=N)")
    ((key, step),) = values.items()
    return Fault(kinds[key], step, job)


def inject(fault: Fault, until_cancelled: Callable[[], None]) -> None:
    import torch

    log.warning("%s: injecting %s at step %d", FAULT_ENV, fault.kind, fault.step)
    if fault.kind == "oom":
        raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (simulated by {FAULT_ENV})")
    if fault.kind == "crash":
        # No cleanup, no goodbye frame: what a segfault in a CUDA kernel looks like from outside.
        os._exit(70)
    if fault.kind == "stall":
        until_cancelled()
        return
    while True:  # hang: only the supervisor's watchdog (or its cancel bound) ends this
        time.sleep(3600)
