"""Job ids: typeable, accepted by the buttons' custom-id pattern, and unique at far more than 1,000 jobs a second."""

from __future__ import annotations

import re

from bot.discord_views import JOB_ID
from engine.models import new_job_id


def test_job_ids_are_unique_in_a_burst_and_fit_the_button_pattern() -> None:
    ids = [new_job_id() for _ in range(10_000)]  # tens per millisecond: only the random part separates them
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(JOB_ID, job_id) for job_id in ids[:1000])
    assert {len(job_id) for job_id in ids} == {17}
