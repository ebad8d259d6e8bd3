"""The scorer registry, the top of ``dpojax.scorers``: a spec (a built-in name, ``package.module:callable``, or
several joined by ``,``) and its options -> a ``Scorer`` (``dpojax.scorers.base``).

The built-ins are the reward proxies of DDPO/D3PO (``dpojax.scorers.proxies``) and the model-based scorers
(aesthetic, PickScore and CLIP score, HPS, ImageReward), each imported only when built (jax and transformers load
then); users plug in their own by import path. This module also maps the config's ``scorers`` section and the
``--scorers`` / ``--scorer-option`` arguments to specs and options. No scorer imports it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from dpojax.config import ConfigError
from dpojax.scorers.base import ScoreFn, Scorer, one_line, score_images
from dpojax.scorers.proxies import brightness, jpeg_compressibility, jpeg_kilobytes


def _aesthetic(clip_model: str | None = None, head: str | None = None, batch_size: int = 16,
               mesh: Any = None) -> ScoreFn:
    if clip_model is None or head is None:
        raise ValueError("scorer 'aesthetic' needs clip_model=<local CLIP ViT-L/14 folder> and "
                         "head=<local LAION aesthetic predictor weights (.safetensors or .pth)>")
    from dpojax.scorers.aesthetic import AestheticScorer

    return AestheticScorer.from_files(clip_model, head, batch_size=batch_size, mesh=mesh)


def _clip_similarity(name: str) -> Callable[..., ScoreFn]:
    """The factory of a CLIP-similarity reward, imported when it is built (jax and transformers load then)."""
    def factory(**options: Any) -> ScoreFn:
        from dpojax.scorers.clip_scorers import FACTORIES

        return FACTORIES[name](**options)

    return factory


def _imagereward(**options: Any) -> ScoreFn:
    from dpojax.scorers.imagereward import imagereward

    return imagereward(**options)


def _hps(**options: Any) -> ScoreFn:
    from dpojax.scorers.hps import hps

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
                         f"{type(err).__name__}: {one_line(err)}") from err
    if not callable(fn):
        raise ValueError(f"scorer {path!r}: called with options it must return a scoring function, "
                         f"got {type(fn).__name__}")
    return fn


def _stacked(scorers: list[Scorer]) -> ScoreFn:
    def score(images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        columns = [score_images(s, images, prompts) for s in scorers]
        return np.concatenate([c.reshape(len(images), -1) for c in columns], axis=1)

    return score
