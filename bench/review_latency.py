"""What the review step adds to each image: `ReviewStep.decide` alone, without and with the nudenet classifier.

The images are made here (a 1024x1024 PNG of coloured shapes, as a FLUX.1 result is in size), never real content.
Three cases: no rules (the default), review phrases only (a 40-phrase list), and phrases plus nudenet (the `review`
extra, on the CPU). Reported per image: p50 and p99 in milliseconds, after a warm-up.

    python -m bench.review_latency
    python -m bench.review_latency --images 50
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import platform
import random
import statistics
import time

from PIL import Image, ImageDraw

from engine.config import ReviewSettings
from engine.models import Platform, Requester
from engine.review import NudenetClassifier, ReviewStep

PHRASES = tuple(f"brand name {n}" for n in range(40))
PROMPT = "a lighthouse at dusk, cinematic, 35mm, in the style of a travel poster"


def image(seed: int, side: int = 1024) -> bytes:
    rng = random.Random(seed)
    canvas = Image.new("RGB", (side, side), (rng.randrange(256), rng.randrange(256), rng.randrange(256)))
    draw = ImageDraw.Draw(canvas)
    for _ in range(40):
        x, y = rng.randrange(side), rng.randrange(side)
        colour = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
        draw.ellipse((x, y, x + rng.randrange(20, 300), y + rng.randrange(20, 300)), fill=colour)
    out = io.BytesIO()
    canvas.save(out, format="PNG")
    return out.getvalue()


def measure(step: ReviewStep, images: list[bytes]) -> list[float]:
    requester = Requester(Platform.CONSOLE, "bench")
    step.decide(PROMPT, images[0], requester)  # warm-up: the classifier's first run builds its session
    timings = []
    for data in images:
        started = time.perf_counter()
        step.decide(PROMPT, data, requester)
        timings.append((time.perf_counter() - started) * 1000)
    return timings


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=30)
    args = parser.parse_args()
    images = [image(seed) for seed in range(args.images)]
    cases = [
        ("no rules (the default)", ReviewStep(ReviewSettings(), None)),
        ("40 review phrases", ReviewStep(ReviewSettings(phrases=PHRASES), None)),
        ("40 phrases + nudenet (CPU)", ReviewStep(ReviewSettings(phrases=PHRASES), NudenetClassifier())),
    ]
    print(f"| review step, {args.images} images of 1024x1024 | p50 | p99 |")
    print("|---|---|---|")
    for name, step in cases:
        timings = measure(step, images)
        print(f"| {name} | {statistics.median(timings):.3f} ms | {percentile(timings, 0.99):.3f} ms |")
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"\n{platform.machine()}, Python {platform.python_version()}; {when}")


if __name__ == "__main__":
    main()
