"""When each queued job of a lane will start: the dispatcher's fair pick, played forward on the lane's slots.

Pure, no I/O and no clock: the scheduler passes the lane's queue (oldest first), the running jobs' expected
remaining seconds and the fairness state, and gets each queued job's position (how many queued jobs start before
it) and wait (seconds until it starts). The play-forward is the dispatcher's rule (`Scheduler._fair_pick`): whenever a
slot is free, the eligible user (fewer running jobs than `max_running_per_user`) with the fewest running jobs, then
the one served longest ago, starts their oldest job. So a user's jobs held back by the per-user cap wait for that
user's own running jobs to end, and another user's job that the round-robin picks first counts as ahead.

Approximations: every queued job is taken to run as long as `run_s` (the new job's own estimate: a lane's jobs are
mostly of a few shapes); a running job has its estimate's rest left, or once past it as long again (see
`remaining_s`); and jobs that users have queued in the *other* lane are left out of the per-user cap (their running
jobs there are counted).
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Running:
    """A job that holds a slot (or, in the other lane, counts against its user's cap) for `remaining_s` more."""

    user_key: str
    remaining_s: float
    in_lane: bool = True


@dataclass(frozen=True, slots=True)
class Slot:
    """Where one queued job stands: `position` queued jobs start before it, and it starts in `wait_s` seconds."""

    position: int
    wait_s: float


def remaining_s(elapsed_s: float, expected_s: float, timeout_s: float) -> float:
    """What a running job has left: the rest of its estimate; once past it, as long again, never past its timeout.

    A job that overran is slow for a reason: an API task that never finishes holds its slot until the timeout, and
    taking such jobs to end "now" promised jobs queued behind a full API a start they did not get.
    """
    left = expected_s - elapsed_s if elapsed_s < expected_s else expected_s
    return max(0.0, min(left, timeout_s - elapsed_s))


def play_forward(
    queued: Sequence[tuple[str, str]],
    running: Sequence[Running],
    *,
    capacity: int,
    run_s: float,
    max_running_per_user: int,
    last_served: Mapping[str, float],
) -> dict[str, Slot]:
    """Each queued job's `Slot`, by job id; `queued` is (job id, user key), oldest first."""
    capacity = max(capacity, 1)
    cap = max(max_running_per_user, 1)
    waiting: dict[str, deque[tuple[int, str]]] = {}  # user -> (place in the queue, job id), oldest first
    for place, (job_id, user) in enumerate(queued):
        waiting.setdefault(user, deque()).append((place, job_id))
    counts: dict[str, int] = {}
    ends: list[tuple[float, int, str, bool]] = []  # (ends at, tie-break, user, frees a slot of this lane)
    busy = 0
    for n, job in enumerate(running):
        counts[job.user_key] = counts.get(job.user_key, 0) + 1
        heapq.heappush(ends, (max(job.remaining_s, 0.0), n, job.user_key, job.in_lane))
        busy += job.in_lane
    free = capacity - busy
    served = dict(last_served)
    # Picks in the play-forward happen after every real dispatch so far: their "served at" keys sort after all of them.
    later = max(served.values(), default=0.0) + 1.0
    # (running jobs, served at, place of the user's oldest job, user); entries go stale as counts change. The place
    # breaks ties as the dispatcher's min() over users in queue order does.
    ready: list[tuple[int, float, int, str]] = []

    def offer(user: str) -> None:
        if waiting.get(user) and counts.get(user, 0) < cap:
            heapq.heappush(ready, (counts.get(user, 0), served.get(user, 0.0), waiting[user][0][0], user))

    for user in waiting:
        offer(user)
    out: dict[str, Slot] = {}
    now, tie = 0.0, len(running)
    while len(out) < len(queued):
        picked = None
        while free > 0 and ready:
            count, at, _, user = heapq.heappop(ready)
            if waiting.get(user) and count == counts.get(user, 0) and at == served.get(user, 0.0) and count < cap:
                picked = user
                break
        if picked is None:
            # Nothing can start now, so something is running (capacity and the cap are at least 1): wait for it.
            now, _, user, in_lane = heapq.heappop(ends)
            counts[user] -= 1
            free += in_lane
            offer(user)
            continue
        out[waiting[picked].popleft()[1]] = Slot(len(out), now)
        counts[picked] = counts.get(picked, 0) + 1
        served[picked] = later
        later += 1.0
        free -= 1
        heapq.heappush(ends, (now + run_s, tie, picked, True))
        tie += 1
        offer(picked)
    return out
