"""The text-command option parser shared by the console and Slack: options are only the known names, everything
else is the user's own words, kept as typed."""

from __future__ import annotations

import io
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from bot import render
from bot.commands import (
    IMAGINE_OPTIONS,
    OPTION_ALIASES,
    Commands,
    ImagineArgs,
    Variation,
    parse_imagine_text,
)
from engine.errors import InvalidRequest, JobNotFound, NotAllowed
from engine.models import BackendKind, JobDone, JobState, Task
from tests.conftest import EngineFactory, user, wait_terminal
from tests.fakes.backends import ScriptedBackend


@pytest.mark.parametrize(
    "prompt",
    [
        "E=mc2 written on a chalkboard",
        "a sign saying x=1",
        "a cat's hat",
        'a neon sign reading "OPEN 24/7"',
        "it's a 'single' quote and a \"double\" one",
        "a -- b --- c -- d",
        "--",
        "a poster: --no cars",  # Midjourney's other flags are not ours: they stay words
        "--models of the solar system",
        "🐱‍👤 ninja cat, 富士山, Ёлка, ✨",
        "emoji=🎉 party",
        "a = b and == c",
        "x=",
        "=",
    ],
)
def test_words_that_are_not_options_stay_in_the_prompt(prompt: str) -> None:
    assert parse_imagine_text(prompt) == ImagineArgs(prompt, {})


def test_every_form_of_every_option_in_any_position() -> None:
    assert parse_imagine_text("--model dev a red cat steps=20 --ar 16:9 on a mat --seed=7") == ImagineArgs(
        "a red cat on a mat", {"model": "dev", "steps": "20", "aspect": "16:9", "seed": "7"}
    )
    assert parse_imagine_text("a cat MODE=relax --Guidance 3.5 --aspect-ratio=3:2") == ImagineArgs(
        "a cat", {"mode": "relax", "guidance": "3.5", "aspect": "3:2"}
    )
    assert parse_imagine_text("a cat --width 1024 height=768").options == {"width": "1024", "height": "768"}
    # What a phone's smart punctuation makes of "--".
    assert parse_imagine_text("a cat \u2014ar 16:9 \u2013seed 3 \u2014 a dash") == ImagineArgs(
        "a cat \u2014 a dash", {"aspect": "16:9", "seed": "3"}
    )


def test_spacing_inside_the_prompt_is_kept() -> None:
    text = "  a  red   cat\n--ar 16:9\n\non  a mat  --seed 1  "
    assert parse_imagine_text(text) == ImagineArgs("a  red   cat\n\non  a mat", {"aspect": "16:9", "seed": "1"})


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("a cat --ar 16:9 aspect=1:1", "aspect is given twice ('--ar 16:9' and 'aspect=1:1')"),
        ("a cat --seed 1 --seed 2", "seed is given twice"),
        ("a cat steps=3 STEPS=4", "steps is given twice"),
        ("a cat --width 1024 --height 768 --ar 16:9", "give an aspect ratio or a width and height, not both"),
        ("a cat aspect=16:9 height=768", "not both"),
        ("a cat --steps", "--steps needs a value"),
        ("a cat --steps --seed 3", "--steps needs a value"),
        ("a cat --steps seed=3", "--steps needs a value"),
        ("a cat --ar= on a mat", "--ar= needs a value"),
        ("a cat seed=", "seed= needs a value"),
    ],
)
def test_repeated_contradictory_and_valueless_options_are_errors(text: str, problem: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_imagine_text(text)
    assert problem in caught.value.problem


_NAMES = "|".join(re.escape(name) for name in (*IMAGINE_OPTIONS, *OPTION_ALIASES))
_OPTIONISH = re.compile(rf"(?:^|\s)(?:(?:--|\u2013|\u2014)(?:{_NAMES})(?:=|\s|$)|(?:{_NAMES})=)", re.IGNORECASE)
# Arbitrary text salted with what breaks naive parsers: quotes, dashes, '=', Slack-like markup, near-miss names.
fragments = st.one_of(
    st.text(),
    st.sampled_from(
        ["--", "=", "'", '"', "--model", "model=", "--ar", "\u2014ar", "steps", "aspect-ratio", " ", "\n", "\t", "🎉"]
    ),
    st.sampled_from(["--no", "--models", "xseed=1", "seeds=2", "E=mc2", "<@U1>", "&amp;", "\u00a0", "\u200b"]),
)
free_text = st.lists(fragments, max_size=20).map("".join).filter(lambda text: not _OPTIONISH.search(text))


@given(free_text)
def test_text_without_option_names_round_trips_unchanged(text: str) -> None:
    assert parse_imagine_text(text) == ImagineArgs(text.strip(), {})


options = st.dictionaries(
    st.sampled_from(["model", "steps", "seed", "mode", "guidance", "aspect"]),
    st.from_regex(r"[0-9a-z:.]{1,6}", fullmatch=True),
    max_size=4,
)
forms = st.sampled_from(["--{} {}", "--{}={}", "{}={}", "--{} {}"])


@given(st.lists(free_text.filter(lambda t: t.strip() == t and t and not re.search(r"\s", t))), options, st.data())
def test_options_anywhere_come_out_and_the_words_stay(
    words: list[str], chosen: dict[str, str], data: st.DataObject
) -> None:
    tokens = list(words)
    for name, value in chosen.items():
        flag = name if name != "aspect" else data.draw(st.sampled_from(["aspect", "ar", "aspect-ratio"]))
        tokens.insert(data.draw(st.integers(0, len(tokens))), data.draw(forms).format(flag, value))
    assert parse_imagine_text(" ".join(tokens)) == ImagineArgs(" ".join(words), chosen)


async def test_direction_controls_in_a_prompt_cannot_reorder_the_bots_own_words(make_engine: EngineFactory) -> None:
    engine = await make_engine({BackendKind.LOCAL: ScriptedBackend()})
    commands = Commands(engine)
    alice = user()
    spoof = "a cat \u202eeerf si sihT"  # a right-to-left override left open
    queued = await commands.imagine(alice, spoof, {})
    await wait_terminal(engine, queued.job_id)
    assert (await engine.get_job(queued.job_id)).request.prompt == spoof  # the model got it as typed
    assert f"  prompt: \u2068{spoof}\u2069\n" in await commands.job(alice, queued.job_id)
    plain = await commands.imagine(alice, "a plain cat", {})
    assert "  prompt: a plain cat\n" in await commands.job(alice, plain.job_id)
    assert render.shown("\u2067مرحبا", str.upper) == "\u2068\u2067مرحبا\u2069"


# ---- the buttons under a result: Reroll, Vary, Edit prompt and Delete ----


async def test_reroll_and_edit_prompt_repeat_the_jobs_options(make_engine: EngineFactory) -> None:
    engine = await make_engine({BackendKind.LOCAL: ScriptedBackend()})
    commands = Commands(engine)
    alice = user("alice")
    asked = {"model": "dev", "aspect": "16:9", "steps": "7", "guidance": "3", "seed": "41", "mode": "relax"}
    queued = await commands.imagine(alice, "a red cat", asked)
    await wait_terminal(engine, queued.job_id)
    same = {"model": "dev", "steps": "7", "mode": "relax", "aspect": "16:9", "guidance": "3.0"}

    # Anyone who sees the result may make it again: its parameters are public in the message.
    assert await commands.reroll(queued.job_id) == ImagineArgs("a red cat", same)  # no seed: a random one
    assert await commands.edited_prompt(queued.job_id, "a blue cat") == ImagineArgs("a blue cat", same | {"seed": "41"})


async def test_vary_starts_from_the_result_itself_at_the_configured_strength(make_engine: EngineFactory) -> None:
    api = ScriptedBackend(kind=BackendKind.API)
    engine = await make_engine({BackendKind.LOCAL: ScriptedBackend(), BackendKind.API: api})
    commands = Commands(engine)
    alice, bob = user("alice"), user("bob")
    queued = await commands.imagine(alice, "a red cat", {"model": "dev", "aspect": "16:9", "mode": "relax"})
    await wait_terminal(engine, queued.job_id)
    images = engine.settings.images

    # The repeat is a job like any other: Bob's variation is Bob's job, of Alice's image.
    for variation, strength in (
        (Variation.SUBTLE, images.vary_subtle_strength),
        (Variation.STRONG, images.vary_strong_strength),
    ):
        varied = await commands.vary(bob, queued.job_id, variation)
        assert isinstance(await wait_terminal(engine, varied.job_id), JobDone)
        job = await engine.get_job(varied.job_id)
        assert job.requester.user_key == "discord:bob"
        assert (job.request.task, job.request.strength, job.request.prompt) == (Task.VARY, strength, "a red cat")
        assert (job.request.model, job.request.aspect_ratio) == ("dev", "16:9")
        stored = engine.settings.bot.inputs_dir / f"{job.request.input_image}.png"
        with Image.open(stored) as source, Image.open(io.BytesIO(await engine.result_image(queued.job_id))) as result:
            assert source.size == result.size and source.tobytes() == result.convert(source.mode).tobytes()

    edited = await commands.edit_result(bob, queued.job_id, "make the cat blue")
    assert isinstance(await wait_terminal(engine, edited.job_id), JobDone)
    job = await engine.get_job(edited.job_id)
    assert (job.request.task, job.request.model, job.request.prompt) == (Task.EDIT, "kontext-pro", "make the cat blue")
    assert job.backend is BackendKind.API and job.request.input_image is not None


async def test_a_width_and_height_are_repeated_as_asked(make_engine: EngineFactory) -> None:
    engine = await make_engine({BackendKind.LOCAL: ScriptedBackend()})
    commands = Commands(engine)
    queued = await commands.imagine(user(), "a tall cat", {"width": "512", "height": "1024"})
    await wait_terminal(engine, queued.job_id)
    options = (await commands.reroll(queued.job_id)).options
    assert (options.get("width"), options.get("height"), "aspect" in options) == ("512", "1024", False)


async def test_only_the_requester_or_an_admin_may_delete_a_result(make_engine: EngineFactory) -> None:
    engine = await make_engine({BackendKind.LOCAL: ScriptedBackend()})
    commands = Commands(engine)
    alice, bob, admin = user("alice"), user("bob"), user("carol", admin=True)
    queued = await commands.imagine(alice, "a red cat", {})
    await wait_terminal(engine, queued.job_id)

    with pytest.raises(NotAllowed) as refused:
        await commands.deletable(bob, queued.job_id)
    assert refused.value.reason == "only the person who asked for this image or an admin can delete it"
    assert (await commands.deletable(alice, queued.job_id)).id == queued.job_id
    assert (await commands.deletable(admin, queued.job_id)).id == queued.job_id
    # The engine holds the same rule whatever the front-end checked first.
    with pytest.raises(NotAllowed):
        await engine.delete_result(bob, queued.job_id)
    assert (await engine.get_job(queued.job_id)).state is JobState.DONE


async def test_a_button_on_a_job_that_is_gone_says_so(make_engine: EngineFactory) -> None:
    engine = await make_engine({BackendKind.LOCAL: ScriptedBackend()})
    commands = Commands(engine)
    for press in (
        commands.reroll("j0000000000000000"),
        commands.vary(user(), "j0000000000000000", Variation.SUBTLE),
        commands.edited_prompt("j0000000000000000", "a cat"),
        commands.deletable(user(), "j0000000000000000"),
    ):
        with pytest.raises(JobNotFound):
            await press
