"""Settings: the documented config.toml is the default, every problem names file, key and problem, secrets stay out."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from bot.__main__ import RedactSecrets
from engine.config import ConfigSource, Secrets, find_config, load_settings
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
        ("[tiers.gold]\nimages_per_day = 5\n[tiers.default]\nimages_per_day = 'x'\n", "tiers.default", "whole number"),
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


@pytest.mark.parametrize(
    ("text", "field", "problem"),
    [
        ("[routing]\ncommercial = 1\n", "routing.commercial", "expected true or false, got the number 1"),
        (
            "[slack]\nworkspace_admins = 'yes'\n",
            "slack.workspace_admins",
            'expected true or false, got the string "yes"',
        ),
        ("[routing]\nmax_local_wait_s = true\n", "routing.max_local_wait_s", "expected a number, got the boolean true"),
        ("[routing]\nmax_local_wait_s = '15'\n", "routing.max_local_wait_s", 'expected a number, got the string "15"'),
        ("[routing]\nmax_local_wait_s = inf\n", "routing.max_local_wait_s", "finite"),
        ("[bfl]\ntotal_timeout_s = nan\n", "bfl.total_timeout_s", "finite"),
        ("[slack]\nport = '3000'\n", "slack.port", 'expected a whole number, got the string "3000"'),
        ("[bfl]\nmax_retries = true\n", "bfl.max_retries", "expected a whole number, got the boolean true"),
        ("[scheduler]\nlocal_retries = 1.0\n", "scheduler.local_retries", "expected a whole number"),
        ("[local]\ngpus = [true]\n", "local.gpus.0", "expected a whole number, got the boolean true"),
        ("[ops]\nspend_alert_percents = ['50']\n", "ops.spend_alert_percents.0", "expected a whole number"),
        ("[tiers.default]\napi_usd_per_month = true\n", "tiers.default.api_usd_per_month", "got the boolean true"),
        (
            "[models.pro]\ndisplay_name = 'p'\napi_endpoint = 'flux-pro-1.1'\nprice_credits = false\n",
            "models.pro",
            "boolean",
        ),
        ("[limits]\nglobal_api_usd_per_month = 'lots'\n", "limits.global_api_usd_per_month", "a number such as"),
        ("[bot]\nstate_dir = 7\n", "bot.state_dir", "expected a path in quotes, got the number 7"),
    ],
)
def test_config_types_are_strict_and_the_error_names_the_key(
    tmp_path: Path, text: str, field: str, problem: str
) -> None:
    """TOML gives real types: a boolean is not a number, a number is not a boolean, a string is neither."""
    path = tmp_path / "typed.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path, {})
    assert caught.value.file == str(path)
    assert caught.value.field.startswith(field), caught.value
    assert problem in caught.value.problem, caught.value


def test_typed_values_that_are_right_still_load(tmp_path: Path) -> None:
    path = tmp_path / "typed.toml"
    path.write_text(
        "[routing]\nmax_local_wait_s = 60\ncommercial = true\n"  # an integer is a fine number of seconds
        "[local]\ngpus = [0, 1]\nworker_sockets = ['/run/flux-bot/gpu0.sock', '/run/flux-bot/gpu1.sock']\n"
        "[tiers.default]\napi_usd_per_month = 2\n[limits]\nglobal_api_usd_per_month = '0.10'\n"
    )
    settings, _ = load_settings(path, {})
    assert settings.routing.max_local_wait_s == 60.0 and settings.routing.commercial is True
    assert settings.local.gpus == (0, 1) and settings.local.worker_sockets[1] == Path("/run/flux-bot/gpu1.sock")
    assert settings.tiers["default"].api_usd_per_month == 2 and str(settings.limits.global_api_usd_per_month) == "0.10"


def test_missing_file_and_environment_selection(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_settings(tmp_path / "nope.toml", {})
    with pytest.raises(ConfigError, match="cannot be read"):
        load_settings(tmp_path, {})  # a folder
    path = tmp_path / "chosen.toml"
    path.write_text("[routing]\nmax_local_wait_s = 5\n")
    source = find_config(None, {"FLUX_BOT_CONFIG": str(path)}, cwd=tmp_path, system=tmp_path / "etc.toml")
    assert source == ConfigSource(path, "$FLUX_BOT_CONFIG")
    settings, _ = load_settings(source.path, {"BFL_API_URL": "https://api.eu.bfl.ai"})
    assert settings.routing.max_local_wait_s == 5
    assert settings.bfl.api_url == "https://api.eu.bfl.ai"


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "deploy"
    (folder / "weights" / "FLUX.1-schnell").mkdir(parents=True)
    path = folder / "config.toml"
    monkeypatch.chdir(tmp_path)  # started from elsewhere
    for model, expected in [
        ("weights/FLUX.1-schnell", str(folder / "weights" / "FLUX.1-schnell")),  # a folder next to the file
        ("./weights/not-yet", str(folder / "weights" / "not-yet")),  # explicitly a path
        ("black-forest-labs/FLUX.1-schnell", "black-forest-labs/FLUX.1-schnell"),  # a Hugging Face id
        ("demo", "demo"),
    ]:
        path.write_text(f'[bot]\nstate_dir = "var"\n[local]\nmodel = "{model}"\n')
        settings, _ = load_settings(path, {})
        assert settings.bot.state_dir == folder / "var"
        assert settings.local.model == expected


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
    from engine.models import ASPECT_SIZES

    buckets = set(LocalSettings().resolution_buckets)
    assert {f"{width}x{height}" for width, height in ASPECT_SIZES.values()} == buckets


def test_nats_credentials_come_from_the_environment_only(tmp_path: Path) -> None:
    env = {
        "NATS_USER": "gpu",
        "NATS_PASSWORD": "nats-secret-9",
        "NATS_NKEY_SEED_FILE": "/etc/flux-bot/host.nk",
        "NATS_TLS_CA_FILE": "/etc/flux-bot/ca.pem",
    }
    _, secrets = load_settings(None, env)
    nats = secrets.nats
    assert (nats.user, nats.password, nats.token) == ("gpu", "nats-secret-9", None)
    assert nats.nkey_seed_file == Path("/etc/flux-bot/host.nk") and nats.tls_ca_file == Path("/etc/flux-bot/ca.pem")
    assert "nats-secret-9" not in repr(secrets) and "nats-secret-9" in secrets.values()

    in_url = tmp_path / "config.toml"
    in_url.write_text('[nats]\nurl = "nats://gpu:nats-secret-9@broker:4222"\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(in_url, {})
    assert caught.value.field == "nats.url" and "NATS_USER" in caught.value.problem
    assert "nats-secret-9" not in str(caught.value)
    in_file = tmp_path / "password.toml"
    in_file.write_text('[nats]\npassword = "nats-secret-9"\n')
    with pytest.raises(ConfigError, match="secrets are read only from the environment"):
        load_settings(in_file, {})
    beats = tmp_path / "beats.toml"
    beats.write_text("[nats]\nheartbeat_interval_s = 5.0\nheartbeat_ttl_s = 6.0\n")
    with pytest.raises(ConfigError, match="at least twice heartbeat_interval_s"):
        load_settings(beats, {})
