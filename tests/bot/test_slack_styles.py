"""Styles on Slack: `--style` on /imagine and /imagine-styles, through the real AsyncApp in HTTP mode against the
fake Slack Web API and the real engine."""

from __future__ import annotations

from engine.models import BackendKind
from tests.bot.test_slack import FrontEndFactory, delivered, front_end, job_id_of, slack, slash
from tests.conftest import EngineFactory, SettingsFactory
from tests.fakes.backends import ScriptedBackend

__all__ = ["front_end", "slack"]  # the fixtures, used by name

STYLES = {"watercolor": {"display_name": "Watercolor", "template": "a watercolor of {prompt}", "steps": 2}}


async def test_a_style_on_imagine_and_the_styles_list(
    make_engine: EngineFactory, make_settings: SettingsFactory, front_end: FrontEndFactory
) -> None:
    app = await front_end(await make_engine({BackendKind.LOCAL: ScriptedBackend()}, make_settings(styles=STYLES)))
    job_id = job_id_of(await slash(app, "/imagine", "a fox --style watercolor"))
    await delivered(app, job_id)
    job = await app.engine.get_job(job_id)
    assert (job.request.prompt, job.request.for_model, job.request.steps) == ("a fox", "a watercolor of a fox", 2)
    listing = await slash(app, "/imagine-styles")
    assert "- watercolor: Watercolor. Runs with any model; any lane." in listing
    refused = await slash(app, "/imagine", "a fox --style oils")
    assert "there is no style 'oils'; choose one of: watercolor" in refused and "not charged" in refused
