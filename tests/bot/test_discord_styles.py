"""Styles on Discord: the style option's autocomplete, /imagine with a style, /styles with the sample images, and
/admin styles. The real discord.py client against the fake Discord HTTP API, the real engine behind it."""

from __future__ import annotations

from typing import Any

from engine.models import BackendKind, JobState, Platform, Requester
from tests.bot.test_discord import (
    EPHEMERAL,
    FrontEndFactory,
    command,
    content,
    fake,
    feed,
    front_end,
    imagine,
    interaction,
    wait_delivered,
    wait_followup,
)
from tests.bot.test_discord_review import callback
from tests.conftest import EngineFactory, SettingsFactory
from tests.fakes.backends import ScriptedBackend
from tests.fakes.discord_server import MANAGE_GUILD, FakeDiscord

__all__ = ["fake", "front_end"]  # the fixtures, used by name

ADMIN = Requester(Platform.CONSOLE, "ops", is_admin=True)

STYLES: dict[str, Any] = {
    "watercolor": {"display_name": "Watercolor", "template": "a watercolor of {prompt}"},
    "inkwash": {
        "display_name": "Ink wash",
        "template": "{prompt}, sumi-e",
        "sample_image": "https://example.com/inkwash.png",
        "adapters": [{"file": "/srv/loras/inkwash.safetensors", "sha256": "ab" * 32}],
    },
}


def autocomplete(typed: str) -> dict[str, Any]:
    """Discord's autocomplete interaction for /imagine's style option, with what the user has typed so far."""
    options = [
        {"name": "prompt", "type": 3, "value": "a fox"},
        {"name": "style", "type": 3, "value": typed, "focused": True},
    ]
    return interaction(4, {"id": "700", "name": "imagine", "type": 1, "options": options})


async def test_the_style_option_completes_from_the_configured_styles(
    make_engine: EngineFactory, make_settings: SettingsFactory, front_end: FrontEndFactory, fake: FakeDiscord
) -> None:
    app = await front_end(await make_engine({BackendKind.LOCAL: ScriptedBackend()}, make_settings(styles=STYLES)))
    answer = await callback(fake, feed(app, autocomplete("ink")))
    assert answer.json["type"] == 8  # the autocomplete result
    assert answer.json["data"]["choices"] == [
        {"name": "Ink wash (inkwash)", "value": "inkwash"},
        {"name": "No style", "value": "none"},
    ]


async def test_imagine_with_a_style_and_the_styles_listings(
    make_engine: EngineFactory, make_settings: SettingsFactory, front_end: FrontEndFactory, fake: FakeDiscord
) -> None:
    engine = await make_engine({BackendKind.LOCAL: ScriptedBackend()}, make_settings(styles=STYLES))
    app = await front_end(engine)
    token = feed(app, command("imagine", imagine("a fox", style="watercolor")))
    await wait_followup(fake, token)
    await wait_delivered(engine)
    [job] = await engine.admin_jobs(ADMIN, [JobState.DONE])
    assert job.request.style == "watercolor" and job.request.for_model == "a watercolor of a fox"

    listing = await callback(fake, feed(app, command("styles", [])))
    data = listing.json["data"]
    assert data["flags"] == EPHEMERAL and "- inkwash: Ink wash." in data["content"]
    assert [embed["image"]["url"] for embed in data["embeds"]] == ["https://example.com/inkwash.png"]

    styles = {"name": "styles", "type": 1, "options": []}
    report = await wait_followup(fake, feed(app, command("admin", [styles], permissions=MANAGE_GUILD)))
    assert "inkwash (Ink wash): sha256:" in content(report) and "watercolor (Watercolor): a template" in content(report)
