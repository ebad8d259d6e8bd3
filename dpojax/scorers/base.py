"""The scorer interface, the bottom of ``dpojax.scorers``: ``scorer(images uint8 (N,H,W,3), prompts) -> float32
(N,) or (N,d)``.

D3PO only compares rewards (Pareto dominance for vectors, ``dpojax.losses.pareto_preference``), so a scorer may
return any scale. ``score_images`` is the one place that turns a misbehaving scorer into a one-line error. This
module imports no scorer and no registry: what calls a scorer needs only this.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

ScoreFn = Callable[[np.ndarray, Sequence[str]], Any]


@dataclass(frozen=True)
class Scorer:
    """A named scoring function; the name is what error messages and logs call it."""

    name: str
    fn: ScoreFn

    def __call__(self, images: np.ndarray, prompts: Sequence[str]) -> Any:
        return self.fn(images, prompts)


def score_images(scorer: Scorer | ScoreFn, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
    """Call ``scorer`` and check its answer: float32 (N,) or (N, d), finite; else one ValueError naming it."""
    name = getattr(scorer, "name", None) or getattr(scorer, "__qualname__", None) or repr(scorer)
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"scorer {name!r}: images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    if len(prompts) != len(images):
        raise ValueError(f"scorer {name!r}: {len(images)} images but {len(prompts)} prompts")
    try:
        scores = scorer(images, list(prompts))
    except Exception as err:  # any failure inside the user's code becomes one line naming the scorer
        raise ValueError(f"scorer {name!r} failed on {len(images)} images: "
                         f"{type(err).__name__}: {one_line(err)}") from err
    try:
        scores = np.asarray(scores, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise ValueError(f"scorer {name!r} returned {type(scores).__name__}, not numbers: {one_line(err)}") from None
    if scores.ndim not in (1, 2) or scores.shape[0] != len(images) or scores.size == 0:
        raise ValueError(f"scorer {name!r} returned shape {scores.shape} for {len(images)} images "
                         f"(expected ({len(images)},) or ({len(images)}, d))")
    if not np.all(np.isfinite(scores)):
        bad = np.argwhere(~np.isfinite(scores.reshape(len(images), -1)).all(axis=1)).ravel()
        raise ValueError(f"scorer {name!r} returned NaN or infinite scores for images {bad[:10].tolist()}")
    return scores


def score_per_image(scorer: Scorer, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
    """``score_images`` for callers that rank images by one number each: float32 (N,); a vector reward is a
    one-line error (its parts give no single order)."""
    scores = score_images(scorer, images, prompts)
    if scores.ndim == 2 and scores.shape[1] != 1:
        raise ValueError(f"scorer {scorer.name!r} returns {scores.shape[1]} numbers per image; this compares one "
                         f"score per image (give vector parts as separate scorers)")
    return scores.reshape(len(images))


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line (its whitespace collapsed)."""
    return " ".join(str(err).split()) or "(no message)"
