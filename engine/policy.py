"""The project's own prompt policy: length limits, control characters, and configured block and allow lists.

This is not content moderation (the API moderates its own requests); it is the operator's house rules, applied
the same way to every backend. Prompts are plain text to everything after this point: the store binds them as
parameters, so nothing here treats SQL- or markup-looking text specially.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from engine.config import PolicySettings
from engine.errors import PolicyBlocked

# Unicode category Cc, except the tab, line feed and carriage return that pasted multi-line prompts carry:
# those are whitespace and normalise to spaces. Cc is exactly U+0000-U+001F and U+007F-U+009F.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_WHITESPACE = re.compile(r"\s+")


def normalise(prompt: str) -> str:
    """The prompt as the engine stores and sends it: trimmed, each run of whitespace (newlines too) one space."""
    return _WHITESPACE.sub(" ", prompt).strip()


@dataclass(frozen=True, slots=True)
class PolicyDecision:
    """The verdict on one prompt. `rule` names the rule that decided; `matched` is the list entry that fired."""

    allowed: bool
    rule: str  # ok | too_short | too_long | control_chars | blocked_word | allowed_phrase
    detail: str  # for the user: what was wrong and, where it helps, the limit
    matched: str | None = None


class PromptPolicy:
    """Checks prompts against `PolicySettings`. Build it once: the lists are compiled into one regex each."""

    def __init__(self, settings: PolicySettings) -> None:
        self._min = settings.min_prompt_chars
        self._max = settings.max_prompt_chars
        self._blocked = _WordList(settings.blocked_words)
        self._allowed = _WordList(settings.allowed_phrases)

    # Also here so callers holding only the policy object can normalise without importing the module function.
    normalise = staticmethod(normalise)

    def check(self, prompt: str) -> PolicyDecision:
        return self._evaluate(prompt)[1]

    def check_or_raise(self, prompt: str) -> str:
        """The normalised prompt, or `PolicyBlocked` with the rule and a detail the user can read."""
        text, decision = self._evaluate(prompt)
        if not decision.allowed:
            raise PolicyBlocked(decision.rule, decision.detail)
        return text

    def _evaluate(self, prompt: str) -> tuple[str, PolicyDecision]:
        text = normalise(prompt)
        if not text:
            return text, _refuse("too_short", "the prompt is empty: describe the image you want")
        if len(text) < self._min:
            return text, _refuse("too_short", f"the prompt is {_chars(len(text))}; use at least {self._min:,}")
        if len(text) > self._max:
            return text, _refuse("too_long", f"the prompt is {_chars(len(text))}; the limit is {self._max:,}")
        # Search the raw prompt: normalising treats some control characters (\x1c-\x1f) as whitespace.
        if control := _CONTROL.search(prompt):
            code = f"U+{ord(control.group()):04X}"
            return text, _refuse("control_chars", f"the prompt contains a control character ({code})", code)
        word = self._blocked.search(text)
        if word is None:
            return text, PolicyDecision(True, "ok", "")
        # The allow list exists to rescue prompts like "weapons in a game-design brief": any allowed phrase in
        # the prompt outweighs every blocked word, so it is looked for only once a blocked word has matched.
        if phrase := self._allowed.search(text):
            return text, PolicyDecision(True, "allowed_phrase", f"allowed by the phrase {phrase!r}", phrase)
        return text, _refuse("blocked_word", f"the prompt contains the blocked word {word!r}", word)


class _WordList:
    """One configured list as one case-insensitive regex, with a way back from a match to the entry it came from.

    Entries are normalised like prompts (so "gun  range" matches "Gun range"), empty ones dropped (they would
    match everything), and the longest tried first so a match reports the most specific entry. Word edges are
    lookarounds, not \\b, so entries that start or end with punctuation ("c++") still need a word edge there.
    Groups are not captured per entry: Python's regex engine slows down with the number of capturing groups
    (1,000 entries: ~0.7 s per search instead of under a millisecond), so the entry is found by its casefold.
    """

    def __init__(self, entries: Iterable[str]) -> None:
        cleaned = {normalise(entry) for entry in entries} - {""}
        ordered = sorted(cleaned, key=lambda entry: (-len(entry), entry))
        self._by_key = {entry.casefold(): entry for entry in ordered}
        alternatives = "|".join(re.escape(entry) for entry in ordered)
        self._pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE) if ordered else None

    def search(self, text: str) -> str | None:
        """The entry found in `text` (as configured), or None."""
        if self._pattern is None or not (found := self._pattern.search(text)):
            return None
        # IGNORECASE and casefold agree on all but a few exotic letters; there, name the text that matched.
        return self._by_key.get(found.group().casefold(), found.group())


def _refuse(rule: str, detail: str, matched: str | None = None) -> PolicyDecision:
    return PolicyDecision(False, rule, detail, matched)


def _chars(count: int) -> str:
    return "1 character" if count == 1 else f"{count:,} characters"
