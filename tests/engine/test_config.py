"""Settings: the documented config.toml is the default, every problem names file, key and problem, secrets stay out."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from bot.__main__ import RedactSecrets
from engine.config import Secrets, load_settings
from engine.errors import ConfigError
from engine.models import credits_to_micros, dollars_to_micros, format_usd

REPO = Path(__file__).resolve().parents[2]


def test_documented_config_equals_the_built_in_defaults() -> None:
    documented, _ = load_settings(REPO / "config.toml", {})
    built_in, _ = load_settings(None, {})
    assert documented.model_dump(exclude={"bot"}) == built_in.model_dump(exclude={"bot"})
    assert documented.bot.state_dir == REPO / "state"  # relative paths are relative to the file


def test_every_documented_key_has_a_comment() -> None:
    lines = (REPO / "config.toml").read_text().splitlines()
    for number, line in enumerate(lines, start=1):
        is_key = "=" in line and not line.lstrip().startswith(("#", "["))
        if is_key and "#" not in line and not line.startswith("display_name"):
            raise AssertionError(f"config.toml:{number} {line.split('=')[0].strip()} has no comment")


@pytest.mark.parametrize(
    ("text", "field", "problem"),
    [
        ("[routing]\nmax_local_wait_s = -1\n", "routing.max_local_wait_s", "greater than or equal to 0"),
        ("[routing]\nmax_local_wait = 5\n", "routing.max_local_wait", "unknown key"),
        ("[bot]\ntimezone = 'Mars/Olympus'\n", "bot.timezone", "unknown time zone"),
        ("[routing]\ndefault_model = 'sdxl'\n", "(top level)", "default_model"),
        ("[tiers.gold]\nimages_per_day = 5\n[tiers.default]\nimages_per_day = 'x'\n", "tiers.default", "integer"),
        ("[models.mine]\ndisplay_name = 'Mine'\n", "models.mine", "run locally"),
        ("[discord]\ntoken = 'abc'\n", "discord.token", "environment"),
        ("[bfl\n", "(syntax)", ""),
    ],
)
def test_config_errors_name_file_key_and_problem(tmp_path: Path, text: str, field: str, problem: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path, {})
    assert caught.value.file == str(path)
    assert caught.value.field.startswith(field)
    assert problem in caught.value.problem


def test_missing_file_and_environment_selection(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_settings(tmp_path / "nope.toml", {})
    path = tmp_path / "chosen.toml"
    path.write_text("[routing]\nmax_local_wait_s = 5\n")
    settings, _ = load_settings(None, {"FLUX_BOT_CONFIG": str(path), "BFL_API_URL": "https://api.eu.bfl.ai"})
    assert settings.routing.max_local_wait_s == 5
    assert settings.bfl.api_url == "https://api.eu.bfl.ai"


def test_secrets_come_from_the_environment_and_never_show() -> None:
    _, secrets = load_settings(
        None, {"BFL_API_KEY": "bfl-secret-123", "DISCORD_TOKEN": " ", "SLACK_BOT_TOKEN": "xoxb-1"}
    )
    assert secrets.bfl_api_key == "bfl-secret-123" and secrets.discord_token is None
    assert "bfl-secret-123" not in repr(secrets)
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "calling with key %s", ("bfl-secret-123",), None)
    assert RedactSecrets(Secrets.from_env({"BFL_API_KEY": "bfl-secret-123"}).values()).filter(record)
    assert record.getMessage() == "calling with key [redacted]"


def test_money_is_exact_integers() -> None:
    assert credits_to_micros(2.5) == 25_000
    assert credits_to_micros("0.1") == 1_000
    assert dollars_to_micros("0.1") * 3 == dollars_to_micros("0.3")  # no binary floating point drift
    assert format_usd(40_000) == "$0.04"
    assert format_usd(12_500_000) == "$12.50"
    assert format_usd(2_500) == "$0.0025"
    assert format_usd(-40_000) == "-$0.04"


def test_every_aspect_ratio_size_is_a_warmed_bucket() -> None:
    """A size outside the buckets would be a new shape for a compiled worker: a recompile in service."""
    from engine.config import LocalSettings
    from engine.validation import ASPECT_SIZES

    buckets = set(LocalSettings().resolution_buckets)
    assert {f"{width}x{height}" for width, height in ASPECT_SIZES.values()} == buckets
