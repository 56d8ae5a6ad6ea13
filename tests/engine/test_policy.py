"""The prompt policy: limits, control characters, block and allow lists, and what the engine stores."""

from __future__ import annotations

import sys
import unicodedata

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from engine.config import PolicySettings
from engine.errors import PolicyBlocked
from engine.models import BackendJob, BackendKind, ImageRequest
from engine.policy import PolicyDecision, PromptPolicy, for_model, normalise
from tests.conftest import EngineFactory, SettingsFactory, user, wait_terminal
from tests.fakes.backends import ScriptedBackend

SETTINGS = PolicySettings(
    blocked_words=("weapons", "gore", "Gun Range", "c++", "épée", ""),
    allowed_phrases=("weapons in a game-design brief",),
)
POLICY = PromptPolicy(SETTINGS)


def test_an_ordinary_prompt_passes() -> None:
    assert POLICY.check("a lighthouse at dusk, oil painting") == PolicyDecision(True, "ok", "", None)


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t \r\n"])
def test_an_empty_prompt_is_too_short(prompt: str) -> None:
    decision = POLICY.check(prompt)
    assert (decision.allowed, decision.rule) == (False, "too_short")
    assert "empty" in decision.detail


def test_a_prompt_under_the_minimum_is_too_short_and_says_the_minimum() -> None:
    decision = POLICY.check("  ab  ")
    assert (decision.allowed, decision.rule) == (False, "too_short")
    assert decision.detail == "the prompt is 2 characters; use at least 3"
    assert POLICY.check("x").detail == "the prompt is 1 character; use at least 3"
    assert POLICY.check("abc").allowed


def test_the_maximum_is_allowed_and_one_more_is_too_long() -> None:
    assert POLICY.check("a" * 1_500).allowed
    decision = POLICY.check("a" * 1_501)
    assert (decision.allowed, decision.rule) == (False, "too_long")
    assert decision.detail == "the prompt is 1,501 characters; the limit is 1,500"


def test_a_ten_thousand_character_prompt_is_too_long() -> None:
    prompt = ("a castle on a hill with weapons " * 400)[:10_000]
    assert len(prompt) == 10_000
    decision = POLICY.check(prompt)
    assert (decision.allowed, decision.rule) == (False, "too_long")
    assert "the limit is 1,500" in decision.detail
    # Measured on what the model would get: the trailing space of the cut-off repetition does not count.
    assert f"{len(prompt.strip()):,} characters" in decision.detail


def test_the_limit_bounds_what_the_model_gets_and_invisible_characters_do_not_make_a_prompt() -> None:
    policy = PromptPolicy(PolicySettings(max_prompt_chars=10))
    assert policy.check("  a  b  c  ").allowed  # sent as "a  b  c": 7 characters
    assert policy.check("a     b\n\n\n\nc      d").rule == "too_long"  # sent with its spacing: 19 characters
    assert POLICY.check("\u200b\u200b\u200b\u00ad\ufeff").rule == "too_short"
    assert POLICY.check("a\u200bb\u2060").detail == "the prompt is 2 characters; use at least 3"


@pytest.mark.parametrize("char", ["\x00", "\x07", "\x0b", "\x0c", "\x1b", "\x1f", "\x7f", "\x85", "\x9f"])
def test_control_characters_are_refused_and_named(char: str) -> None:
    decision = POLICY.check(f"a cat{char}[31m in red")
    code = f"U+{ord(char):04X}"
    assert decision == PolicyDecision(False, "control_chars", f"the prompt contains a control character ({code})", code)


def test_newlines_tabs_and_carriage_returns_are_allowed_and_kept_for_the_model() -> None:
    prompt = "  a cat\r\n\r\non a\tmat \n"
    assert POLICY.check(prompt).allowed
    assert POLICY.check_or_raise(prompt) == "a cat\r\n\r\non a\tmat"


def test_the_control_pattern_is_exactly_unicode_cc_less_tab_newline_and_return() -> None:
    policy = PromptPolicy(PolicySettings(min_prompt_chars=1))
    for code in range(sys.maxunicode + 1):
        if unicodedata.category(chr(code)) == "Cc" and chr(code) not in "\t\n\r":
            assert policy.check(f"a{chr(code)}b").rule == "control_chars", hex(code)
    assert not any(policy.check(f"a{char}b").rule == "control_chars" for char in "\u200b\u202e\u2028\u00a0")


def test_a_blocked_word_matches_case_insensitively_and_names_the_entry() -> None:
    decision = POLICY.check("a table covered in WEAPONS, studio light")
    assert decision == PolicyDecision(
        False, "blocked_word", "the prompt contains the blocked word 'weapons'", "weapons"
    )


@pytest.mark.parametrize("prompt", ["a weaponsmith at work", "gorelets and goretex", "abc++ code", "gun ranger"])
def test_a_blocked_word_needs_word_boundaries(prompt: str) -> None:
    assert POLICY.check(prompt).rule == "ok"


@pytest.mark.parametrize("prompt", ["(gore)", "gore!", "'gore'", "gore-soaked", "learn C++ today"])
def test_punctuation_is_a_word_boundary(prompt: str) -> None:
    assert POLICY.check(prompt).rule == "blocked_word"


def test_a_multi_word_entry_matches_across_any_whitespace() -> None:
    decision = POLICY.check("dawn at the GUN\n\n  range")
    assert (decision.rule, decision.matched) == ("blocked_word", "Gun Range")


def test_the_longest_entry_is_reported() -> None:
    policy = PromptPolicy(PolicySettings(blocked_words=("gun", "gun range")))
    assert policy.check("a gun range at dawn").matched == "gun range"
    assert policy.check("a gun at dawn").matched == "gun"


def test_an_allowed_phrase_wins_over_the_blocked_word_it_contains() -> None:
    decision = POLICY.check("Weapons in a game-design brief for a fantasy RPG")
    assert decision == PolicyDecision(
        True,
        "allowed_phrase",
        "allowed by the phrase 'weapons in a game-design brief'",
        "weapons in a game-design brief",
    )


def test_an_allowed_phrase_exempts_only_the_blocked_words_inside_it() -> None:
    decision = POLICY.check("gore, and weapons in a game-design brief")
    assert (decision.allowed, decision.rule, decision.matched) == (False, "blocked_word", "gore")
    policy = PromptPolicy(PolicySettings(blocked_words=("gun",), allowed_phrases=("water gun",)))
    assert policy.check("a water gun fight").rule == "allowed_phrase"
    assert policy.check("a water gun fight with a water gun").rule == "allowed_phrase"
    decision = policy.check("a water gun fight with a real gun")
    assert (decision.rule, decision.matched) == ("blocked_word", "gun")
    assert policy.check("a gun and a water gun").rule == "blocked_word"


def test_a_blocked_entry_reaching_out_of_an_allowed_phrase_is_not_exempt() -> None:
    policy = PromptPolicy(PolicySettings(blocked_words=("water gun", "gun fight"), allowed_phrases=("water gun",)))
    # "water gun" (exempt) is matched first; "gun fight" starts inside it and must still be seen.
    decision = policy.check("a water gun fight")
    assert (decision.rule, decision.matched) == ("blocked_word", "gun fight")


def test_an_allowed_phrase_is_only_reported_when_it_overruled_a_block() -> None:
    policy = PromptPolicy(PolicySettings(allowed_phrases=("still life",)))
    assert policy.check("a still life with pears").rule == "ok"


def test_a_partial_allowed_phrase_does_not_unblock() -> None:
    assert POLICY.check("weapons in a game").rule == "blocked_word"


def test_an_sql_looking_prompt_is_just_text() -> None:
    prompt = "Robert'); DROP TABLE jobs;-- a cat in a hat"
    assert POLICY.check(prompt).rule == "ok"
    assert POLICY.check_or_raise(prompt) == prompt


def test_unicode_prompts_pass_and_blocked_words_fold_case_in_any_script() -> None:
    for prompt in (
        "un château enneigé sous les étoiles ✨🐉",
        "富士山と桜、浮世絵風",
        "Ёлка в снегу",
        "🧑‍🚀 on the moon",
    ):
        assert POLICY.check(prompt).rule == "ok", prompt
        assert POLICY.check_or_raise(prompt) == prompt
    decision = POLICY.check("un duel à l'ÉPÉE")
    assert (decision.rule, decision.matched) == ("blocked_word", "épée")


def test_empty_entries_and_empty_lists_block_nothing() -> None:
    assert PromptPolicy(PolicySettings(blocked_words=("", "  "))).check("anything at all").rule == "ok"
    assert PromptPolicy(PolicySettings()).check("weapons").rule == "ok"


def test_a_long_block_list_is_one_working_regex() -> None:
    words = tuple(f"word{index}" for index in range(5_000))
    policy = PromptPolicy(PolicySettings(blocked_words=words))
    assert policy.check("a prompt with word4321 in it").matched == "word4321"
    assert policy.check("a prompt with word43210 in it").rule == "ok"


def test_check_or_raise_returns_the_prompt_for_the_model_or_raises_policy_blocked() -> None:
    assert POLICY.check_or_raise("  a\tlighthouse \n at dusk ") == "a\tlighthouse \n at dusk"
    with pytest.raises(PolicyBlocked) as caught:
        POLICY.check_or_raise("so much gore")
    assert (caught.value.rule, caught.value.detail) == ("blocked_word", "the prompt contains the blocked word 'gore'")


def test_normalise_is_available_on_the_module_and_the_policy() -> None:
    assert normalise(" A \n b ") == POLICY.normalise(" A \n b ") == "a b"
    assert for_model(" A \n b ") == POLICY.for_model(" A \n b ") == "A \n b"


# Each hides "gore" from a naive match: invisible characters, compatibility forms, other cases.
HIDDEN_GORE = [
    "g\u200bore",  # zero-width space
    "go\u200cre",  # zero-width non-joiner
    "gor\u200de",  # zero-width joiner
    "g\u2060ore",  # word joiner
    "\ufeffgore",  # byte order mark
    "go\u00adre",  # soft hyphen
    "g\u202eore\u202c",  # right-to-left override ... pop
    "\u2066gore\u2069",  # left-to-right isolate ... pop
    "g\u200eo\u200fre",  # left-to-right and right-to-left marks
    "go\u061cre",  # Arabic letter mark
    "g\u034fore",  # combining grapheme joiner
    "go\ufe0fre",  # variation selector
    "go\U000e0067re",  # a tag character
    "ｇｏｒｅ",  # fullwidth
    "𝐠𝐨𝐫𝐞",  # mathematical bold
    "GORE",
    "gOrE",
]


@pytest.mark.parametrize("hidden", HIDDEN_GORE)
def test_invisible_characters_and_compatibility_forms_do_not_hide_a_blocked_word(hidden: str) -> None:
    decision = POLICY.check(f"a scene full of {hidden}, studio light")
    assert (decision.rule, decision.matched) == ("blocked_word", "gore"), ascii(hidden)


def test_entries_are_normalised_too_and_an_invisible_character_splits_no_word() -> None:
    policy = PromptPolicy(PolicySettings(blocked_words=("ＳＴＲＡＳＳＥ", "g\u200bun")))
    assert policy.check("die straße hinunter").matched == "ＳＴＲＡＳＳＥ"
    assert policy.check("a gun").matched == "g\u200bun"
    assert policy.check("a gunfight").rule == "ok"


async def test_the_model_gets_the_prompt_as_typed(make_engine: EngineFactory, make_settings: SettingsFactory) -> None:
    settings = make_settings(policy={"blocked_words": ["gun"], "allowed_phrases": ["water gun"]})
    received: list[str] = []

    def plan(job: BackendJob, attempt: int) -> None:
        received.append(job.request.prompt)

    engine = await make_engine({BackendKind.LOCAL: ScriptedBackend(plan=plan)}, settings)
    prompt = 'a  "Water Gun"\nfight — the sign says: E=mc²; 🧑\u200d🚀 it\'s --ok'
    queued = await engine.submit(user(), ImageRequest(f"  {prompt} \n", "schnell"))
    await wait_terminal(engine, queued.job_id)
    assert (await engine._store.get_job(queued.job_id)).request.prompt == prompt
    assert received == [prompt]


# Random text, salted with the words, phrases and characters that the rules look for.
prompts = st.lists(
    st.one_of(
        st.text(max_size=40),
        st.sampled_from(["weapons", "gore", "weapons in a game-design brief", "ÉPÉE", " ", "\n", "\x1b", "\x85"]),
    ),
    max_size=60,
).map("".join)


@given(prompts)
def test_check_or_raise_raises_nothing_but_policy_blocked(prompt: str) -> None:
    decision = POLICY.check(prompt)
    event(decision.rule)  # --hypothesis-show-statistics shows that every rule is reached
    try:
        stored = POLICY.check_or_raise(prompt)
    except PolicyBlocked as blocked:
        assert not decision.allowed
        assert (blocked.rule, blocked.detail) == (decision.rule, decision.detail)
    else:
        assert decision.allowed
        assert stored == prompt.strip()
        assert len(normalise(prompt)) >= 3 and len(stored) <= 1_500
