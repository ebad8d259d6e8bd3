"""Preference sources behind one interface: ``scorer(images uint8 (N,H,W,3), prompts) -> float32 (N,) or (N,d)``.

D3PO only compares rewards (Pareto dominance for vectors, ``dpojax.losses.pareto_preference``), so a scorer may
return any scale. The built-ins are the reward proxies of DDPO/D3PO (``rewards.py`` there); users plug in their
own by import path. ``score_images`` is the one place that turns a misbehaving scorer into a one-line error.
"""

from __future__ import annotations

import importlib
import io
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from dpojax.config import ConfigError

ScoreFn = Callable[[np.ndarray, Sequence[str]], Any]


@dataclass(frozen=True)
class Scorer:
    """A named scoring function; the name is what error messages and logs call it."""

    name: str
    fn: ScoreFn

    def __call__(self, images: np.ndarray, prompts: Sequence[str]) -> Any:
        return self.fn(images, prompts)


def jpeg_kilobytes(images: np.ndarray, prompts: Sequence[str] = ()) -> np.ndarray:
    """Size of each image as a quality-95 JPEG in kB (bytes / 1000), as DDPO's jpeg_(in)compressibility."""
    sizes = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=95)
        sizes.append(buffer.tell() / 1000)
    return np.asarray(sizes, np.float32)


def jpeg_compressibility(images: np.ndarray, prompts: Sequence[str] = ()) -> np.ndarray:
    """Smaller JPEG files are better."""
    return -jpeg_kilobytes(images, prompts)


def brightness(images: np.ndarray, prompts: Sequence[str] = ()) -> np.ndarray:
    """Mean pixel value in [0, 1] (D3PO's light_reward, which averages the decoded [0, 1] image)."""
    return images.reshape(len(images), -1).mean(axis=1, dtype=np.float64).astype(np.float32) / 255.0


def _aesthetic(clip_model: str | None = None, head: str | None = None, batch_size: int = 16,
               mesh: Any = None) -> ScoreFn:
    if clip_model is None or head is None:
        raise ValueError("scorer 'aesthetic' needs clip_model=<local CLIP ViT-L/14 folder> and "
                         "head=<local LAION aesthetic predictor weights (.safetensors or .pth)>")
    from dpojax.feedback.aesthetic import AestheticScorer

    return AestheticScorer.from_files(clip_model, head, batch_size=batch_size, mesh=mesh)


def _clip_similarity(name: str) -> Callable[..., ScoreFn]:
    """The factory of a CLIP-similarity reward, imported when it is built (jax and transformers load then)."""
    def factory(**options: Any) -> ScoreFn:
        from dpojax.feedback.clip_scorers import FACTORIES

        return FACTORIES[name](**options)

    return factory


def _imagereward(**options: Any) -> ScoreFn:
    from dpojax.feedback.imagereward import imagereward

    return imagereward(**options)


def _hps(**options: Any) -> ScoreFn:
    from dpojax.feedback.hps import hps

    return hps(**options)


# name -> (factory taking the scorer's options, the option names it accepts)
BUILTIN: dict[str, tuple[Callable[..., ScoreFn], tuple[str, ...]]] = {
    "brightness": (lambda: brightness, ()),
    "jpeg_compressibility": (lambda: jpeg_compressibility, ()),
    "jpeg_incompressibility": (lambda: jpeg_kilobytes, ()),
    "aesthetic": (_aesthetic, ("clip_model", "head", "batch_size", "mesh")),
    "pickscore": (_clip_similarity("pickscore"), ("pickscore_model", "pickscore_processor", "batch_size", "mesh")),
    "clip_score": (_clip_similarity("clip_score"), ("clip_model", "clip_processor", "batch_size", "mesh")),
    "clip_cosine": (_clip_similarity("clip_cosine"), ("clip_model", "clip_processor", "batch_size", "mesh")),
    "hps": (_hps, ("hps_checkpoint", "hps_processor", "hps_model_config", "batch_size", "mesh")),
    "imagereward": (_imagereward, ("imagereward_model", "imagereward_tokenizer", "batch_size", "mesh")),
}


def make_scorer(spec: str, **options: Any) -> Scorer:
    """Build a scorer from ``spec``: a built-in name, ``package.module:callable``, or several joined by ``,``.

    Several specs make a vector reward (one column each, compared by Pareto dominance). Options go to the
    built-ins that name them (``aesthetic``: clip_model, head, batch_size; ``pickscore``: pickscore_model,
    pickscore_processor; ``clip_score``/``clip_cosine``: clip_model, clip_processor; ``hps``: hps_checkpoint,
    hps_processor, hps_model_config; ``imagereward``: imagereward_model, imagereward_tokenizer; the CLIP ones,
    hps and imagereward also mesh);
    the others go to user callables, which are then factories: ``callable(**options)`` must return the scoring function.
    """
    parts = [part.strip() for part in str(spec).split(",")]
    if not all(parts):
        raise ValueError(f"scorer spec {spec!r} has an empty part")
    claimed = {name for part in parts if part in BUILTIN for name in BUILTIN[part][1]}
    rest = {k: v for k, v in options.items() if k not in claimed}
    if rest and all(part in BUILTIN for part in parts):
        raise ValueError(f"scorer {spec!r} takes no option {sorted(rest)[0]!r} "
                         f"(options: {', '.join(sorted(claimed)) or 'none'})")
    scorers = []
    for part in parts:
        if part in BUILTIN:
            factory, names = BUILTIN[part]
            scorers.append(Scorer(part, factory(**{k: v for k, v in options.items() if k in names})))
        else:
            scorers.append(Scorer(part, _import_scorer(part, rest)))
    return scorers[0] if len(scorers) == 1 else Scorer(spec, _stacked(scorers))


# The config's ``scorers`` section key of each scorer option (``dpojax.config.ScorersConfig``).
OPTION_KEYS = {"clip_model": "clip_model", "clip_processor": "clip_processor", "head": "aesthetic_head",
               "pickscore_model": "pickscore_model", "pickscore_processor": "pickscore_processor",
               "hps_checkpoint": "hps_checkpoint", "hps_processor": "hps_processor",
               "hps_model_config": "hps_model_config",
               "imagereward_model": "imagereward_model", "imagereward_tokenizer": "imagereward_tokenizer"}


def options_taken(spec: str, options: dict[str, Any]) -> dict[str, Any]:
    """The ``options`` that the built-in parts of ``spec`` take (several scorers may share one set)."""
    taken = {name for part in str(spec).split(",") if part.strip() in BUILTIN for name in BUILTIN[part.strip()][1]}
    return {k: v for k, v in options.items() if k in taken}


def parse_options(items: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` command-line scorer options; values read as YAML (numbers become numbers)."""
    import yaml

    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--scorer-option {item!r} is not KEY=VALUE")
        options[key] = yaml.safe_load(value)
    return options


def split_specs(text: str) -> list[str]:
    """The comma-separated specs of a ``--scorers`` argument, each scored on its own."""
    specs = [part.strip() for part in str(text).split(",")]
    if not all(specs):
        raise ValueError(f"--scorers {text!r} has an empty part")
    return specs


def check_options_taken(specs: Sequence[str], options: dict[str, Any]) -> None:
    """A ``--scorer-option`` that none of ``specs`` takes is a one-line error (a typo would otherwise be
    ignored)."""
    unused = sorted(set(options) - {k for spec in specs for k in options_taken(spec, options)})
    if unused:
        raise ValueError(f"--scorer-option {unused[0]} is taken by none of the scorers {','.join(specs)}")


def config_files(files: Any) -> dict[str, Any]:
    """The scorer options (``OPTION_KEYS``) that the config's ``scorers`` section sets."""
    return {name: getattr(files, key) for name, key in OPTION_KEYS.items() if getattr(files, key) is not None}


def scorer_from_config(spec: str, files: Any, what: str) -> Scorer:
    """``make_scorer(spec)`` with the model files of the config's ``scorers`` section that its built-in parts
    take; ``what`` (the config key naming ``spec``) starts any error."""
    options = options_taken(spec, config_files(files))
    try:
        return make_scorer(spec, **options)
    except ValueError as err:
        missing = {f"{k}=": f"scorers.{v}=" for k, v in OPTION_KEYS.items()}
        message = str(err)
        for option, key in missing.items():  # name the config keys, not the Python options
            message = message.replace(option, key)
        raise ConfigError(f"config: {what}: {message}") from None


def _import_scorer(path: str, options: dict[str, Any]) -> ScoreFn:
    if ":" not in path:
        raise ValueError(f"unknown scorer {path!r}: use one of {', '.join(BUILTIN)} or a Python import path "
                         f"'package.module:callable'")
    module_name, _, attr = path.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"scorer {path!r}: cannot import module {module_name!r}: {err}") from err
    for name in attr.split("."):
        if not hasattr(target, name):
            raise ValueError(f"scorer {path!r}: module {module_name!r} has no attribute {attr!r}")
        target = getattr(target, name)
    if not callable(target):
        raise ValueError(f"scorer {path!r} is not callable")
    if not options:
        return target
    try:
        fn = target(**options)
    except Exception as err:  # the user's factory: report, never crash with its traceback alone
        raise ValueError(f"scorer {path!r}: building it with options {sorted(options)} failed: "
                         f"{type(err).__name__}: {_one_line(err)}") from err
    if not callable(fn):
        raise ValueError(f"scorer {path!r}: called with options it must return a scoring function, "
                         f"got {type(fn).__name__}")
    return fn


def _stacked(scorers: list[Scorer]) -> ScoreFn:
    def score(images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        columns = [score_images(s, images, prompts) for s in scorers]
        return np.concatenate([c.reshape(len(images), -1) for c in columns], axis=1)

    return score


def fixed_size_batches(arrays: dict[str, np.ndarray], size: int) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """Consecutive ``size``-row batches of every array, the last padded with copies of its last row, so a jitted
    scorer compiles one shape: (batch, how many of its rows are real)."""
    total = len(next(iter(arrays.values())))
    for start in range(0, total, size):
        rows = {k: v[start:start + size] for k, v in arrays.items()}
        count = min(size, total - start)
        yield {k: np.concatenate([v, np.repeat(v[-1:], size - count, axis=0)]) for k, v in rows.items()}, count


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
                         f"{type(err).__name__}: {_one_line(err)}") from err
    try:
        scores = np.asarray(scores, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise ValueError(f"scorer {name!r} returned {type(scores).__name__}, not numbers: {_one_line(err)}") from None
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


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or "(no message)"
