"""Job ids (typeable, accepted by the buttons' custom-id pattern, unique at far more than 1,000 jobs a second) and
the one map of image formats."""

from __future__ import annotations

import re

from bot.discord_views import JOB_ID
from engine.models import IMAGE_FORMATS, PNG, image_format, new_job_id


def test_job_ids_are_unique_in_a_burst_and_fit_the_button_pattern() -> None:
    ids = [new_job_id() for _ in range(10_000)]  # tens per millisecond: only the random part separates them
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(JOB_ID, job_id) for job_id in ids[:1000])
    assert {len(job_id) for job_id in ids} == {17}


def test_every_image_format_is_found_by_its_name_its_mime_type_and_its_extension() -> None:
    for fmt in IMAGE_FORMATS:
        assert image_format(fmt.name) is image_format(fmt.mime) is image_format(fmt.extension) is fmt
    assert image_format("JPG") is image_format("image/jpeg") is not None
    assert PNG.extension == "png"
    assert image_format("image/gif") is None
    assert image_format("svg") is None
