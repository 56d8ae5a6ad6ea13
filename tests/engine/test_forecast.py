"""The dispatcher played forward: positions and waits of queued jobs (pure; the scheduler tests run it for real)."""

from __future__ import annotations

from engine.forecast import Running, Slot, play_forward, remaining_s


def test_a_running_job_past_its_estimate_needs_as_long_again_but_never_past_its_timeout() -> None:
    assert remaining_s(4.0, 10.0, 600.0) == 6.0
    assert remaining_s(25.0, 18.0, 120.0) == 18.0
    assert remaining_s(110.0, 18.0, 120.0) == 10.0
    assert remaining_s(130.0, 18.0, 120.0) == 0.0


def test_a_job_running_in_the_other_lane_holds_its_users_next_job_back() -> None:
    slots = play_forward(
        [("a2", "alice"), ("b1", "bob")],
        [Running("alice", 30.0, in_lane=False)],
        capacity=1,
        run_s=10.0,
        max_running_per_user=1,
        last_served={},
    )
    assert slots == {"b1": Slot(0, 0.0), "a2": Slot(1, 30.0)}


def test_slots_free_up_in_the_order_their_jobs_end() -> None:
    slots = play_forward(
        [("q1", "carol"), ("q2", "dave"), ("q3", "erin")],
        [Running("alice", 8.0), Running("bob", 2.0)],
        capacity=2,
        run_s=10.0,
        max_running_per_user=1,
        last_served={"alice": 5.0, "bob": 6.0},
    )
    assert slots == {"q1": Slot(0, 2.0), "q2": Slot(1, 8.0), "q3": Slot(2, 12.0)}
