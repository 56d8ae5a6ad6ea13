"""The review step: after an image is made and before anyone sees it, deliver it or hold it for an admin.

Built-in filters block legitimate prompts and miss what an operator cares about, so this step never blocks: a
held image was made (and is charged as made) and waits in the admins' review channel for Approve or Reject. It
holds when
- the prompt contains one of `[review] phrases` (names and trademarks the operator wants a person to see), matched
  on the same normalised text as the prompt policy (case, NFKC forms and invisible characters do not hide a phrase);
- the image classifier, where one is configured, scores a label at or above its `[review] thresholds`, except in an
  age-restricted channel (Discord's flag, or a Slack channel listed in `[review] age_restricted_slack_channels`).
The classifier is pluggable (`Classifier`); the one shipped is nudenet, an optional extra (`pip install
'flux-bot[review]'`, AGPL-3.0), whose detector model comes inside its wheel and runs offline on the CPU.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from engine.config import ReviewSettings
from engine.errors import ConfigError
from engine.models import Requester
from engine.policy import normalise

log = logging.getLogger(__name__)


class Classifier(Protocol):
    """Scores an image's labels from 0 to 1 (the labels it does not see are left out). Called on a worker thread."""

    def scores(self, image: bytes) -> Mapping[str, float]: ...


@dataclass(frozen=True, slots=True)
class ReviewDecision:
    hold: bool
    reason: str = ""  # in general terms, for the requester
    detail: str = ""  # for the admins: the phrase or the labels and their scores


DELIVER = ReviewDecision(hold=False)


class ReviewStep:
    def __init__(self, settings: ReviewSettings, classifier: Classifier | None) -> None:
        self._settings = settings
        self._classifier = classifier
        # Whole words: "Mario" holds "Super Mario" but not "Marion".
        self._phrases = [
            (phrase, re.compile(rf"(?<!\w){re.escape(normalise(phrase))}(?!\w)"))
            for phrase in settings.phrases
            if normalise(phrase)
        ]

    @property
    def classifies(self) -> bool:
        return self._classifier is not None

    def decide(self, prompt: str, image: bytes, requester: Requester) -> ReviewDecision:
        """Deliver or hold, with the reason (blocking: run it on a thread when a classifier is configured)."""
        text = normalise(prompt)
        for phrase, pattern in self._phrases:
            if pattern.search(text):
                return ReviewDecision(True, "its prompt names something this server reviews", f"phrase {phrase!r}")
        if self._classifier is None or requester.age_restricted:
            return DELIVER
        scores = self._classifier.scores(image)
        flagged = {
            label: score
            for label, score in scores.items()
            if (threshold := self._settings.thresholds.get(label)) is not None and score >= threshold
        }
        if flagged:
            detail = ", ".join(f"{label} {score:.2f}" for label, score in sorted(flagged.items()))
            return ReviewDecision(True, "the image may not suit this channel", f"classifier: {detail}")
        return DELIVER


class NudenetClassifier:
    """nudenet's detector (the `review` extra): the highest score of each label it finds."""

    def __init__(self) -> None:
        try:
            from nudenet import NudeDetector
        except ImportError as exc:
            raise ConfigError(
                "config.toml",
                "review.classifier",
                "nudenet is not installed: pip install 'flux-bot[review]' (AGPL-3.0), or set classifier = \"none\"",
            ) from exc
        self._detector: Any = NudeDetector()

    def scores(self, image: bytes) -> Mapping[str, float]:
        import numpy as np
        from PIL import Image

        with Image.open(io.BytesIO(image)) as opened:
            # nudenet reads BGR arrays (as OpenCV does) or file paths: give it the decoded pixels, never a file.
            pixels = np.asarray(opened.convert("RGB"))[:, :, ::-1].copy()
        found: dict[str, float] = {}
        for detection in self._detector.detect(pixels):
            label, score = str(detection["class"]), float(detection["score"])
            found[label] = max(score, found.get(label, 0.0))
        return found


def classifier_for(settings: ReviewSettings) -> Classifier | None:
    if settings.classifier == "nudenet":
        return NudenetClassifier()
    return None
