"""The prompt policy: limits, control characters, block and allow lists, and what the engine stores."""

from __future__ import annotations

import sys
import unicodedata

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from engine.config import PolicySettings
from engine.errors import PolicyBlocked
from engine.policy import PolicyDecision, PromptPolicy, normalise

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
    # Measured after normalising: the trailing space of the cut-off repetition does not count.
    assert f"{len(prompt.strip()):,} characters" in decision.detail


def test_length_is_measured_on_the_normalised_prompt() -> None:
    policy = PromptPolicy(PolicySettings(max_prompt_chars=10))
    assert policy.check("a     b\n\n\n\nc      d").allowed  # "a b c d" is 7 characters


@pytest.mark.parametrize("char", ["\x00", "\x07", "\x0b", "\x0c", "\x1b", "\x1f", "\x7f", "\x85", "\x9f"])
def test_control_characters_are_refused_and_named(char: str) -> None:
    decision = POLICY.check(f"a cat{char}[31m in red")
    code = f"U+{ord(char):04X}"
    assert decision == PolicyDecision(False, "control_chars", f"the prompt contains a control character ({code})", code)


def test_newlines_tabs_and_carriage_returns_are_allowed_and_become_spaces() -> None:
    prompt = "  a cat\r\n\r\non a\tmat \n"
    assert POLICY.check(prompt).allowed
    assert POLICY.check_or_raise(prompt) == "a cat on a mat"


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


def test_an_allowed_phrase_wins_over_other_blocked_words_in_the_prompt() -> None:
    decision = POLICY.check("gore, and weapons in a game-design brief")
    assert (decision.allowed, decision.rule) == (True, "allowed_phrase")


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


def test_check_or_raise_returns_the_normalised_prompt_or_raises_policy_blocked() -> None:
    assert POLICY.check_or_raise("  a\tlighthouse \n at dusk ") == "a lighthouse at dusk"
    with pytest.raises(PolicyBlocked) as caught:
        POLICY.check_or_raise("so much gore")
    assert (caught.value.rule, caught.value.detail) == ("blocked_word", "the prompt contains the blocked word 'gore'")


def test_normalise_is_available_on_the_module_and_the_policy() -> None:
    assert normalise(" a \n b ") == POLICY.normalise(" a \n b ") == "a b"


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
        assert stored == normalise(prompt)
        assert 3 <= len(stored) <= 1_500
