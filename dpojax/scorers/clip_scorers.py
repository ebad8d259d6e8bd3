"""PickScore and CLIP score: rewards from how well an image matches its prompt under a whole CLIP model, read
from local transformers folders the user points to.

PickScore (yuvalkirstain/PickScore_v1, the Pick-a-Pic paper's reward) is CLIP-H fine-tuned on human choices; its
model card scores a prompt's images as ``logit_scale.exp() * cos(text, image)`` and takes a softmax over them only
to turn a comparison into probabilities, so the reward is that logit. Its processor is
laion/CLIP-ViT-H-14-laion2B-s32B-b79K's, in the model folder or in a folder of its own. CLIP score is the cosine
of any CLIPModel's embeddings, raw or as torchmetrics' CLIPScore, ``100 * max(cos, 0)``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from transformers import CLIPTokenizer

from dpojax.diffusers_folder import tokenize
from dpojax.models.clip import CLIPModel, load_clip, unit
from dpojax.models.clip_vision import CLIP_MEAN, CLIP_STD, clip_preprocess
from dpojax.scorers.batched import BatchedScores
from dpojax.weights.folder import component_folder

# uint8 images (N, H, W, 3) and the image tower's size -> its float32 input (N, size, size, 3).
Preprocess = Callable[[jax.Array, int], jax.Array]

# How each reward scales the cosine of the prompt's and the image's embeddings.
SCALES: dict[str, Callable[[CLIPModel, jax.Array], jax.Array]] = {
    "pickscore": lambda model, cos: jnp.exp(model.logit_scale.get_value().astype(jnp.float32)) * cos,
    "clip_cosine": lambda model, cos: cos,
    "clip_score": lambda model, cos: 100.0 * jnp.maximum(cos, 0.0),
}


def clip_scores(model: CLIPModel, input_ids: jax.Array, pixel_values: jax.Array, scale: str) -> jax.Array:
    """Token ids (N, tokens) and preprocessed images (N, size, size, 3) -> (N,) scores of each image against its
    own prompt.

    No attention mask: the text tower is causal and pools at the end-of-text token, so the padding after it
    cannot change the embedding (the processor's mask would not either).
    """
    text, image = model.get_text_features(input_ids), model.get_image_features(pixel_values)
    return SCALES[scale](model, jnp.sum(unit(text) * unit(image), axis=-1))


def score_uint8(model: CLIPModel, input_ids: jax.Array, images: jax.Array, scale: str,
                preprocess: Preprocess = clip_preprocess) -> jax.Array:
    """``clip_scores`` of uint8 images (N, H, W, 3) of any size, preprocessed as CLIPImageProcessor does (or by
    ``preprocess``, for rewards whose original prepares images otherwise)."""
    return clip_scores(model, input_ids, preprocess(images, model.vision_model.embeddings.image_size), scale)


class CLIPScorer:
    """A Scorer: runs ``score_uint8`` under jit in fixed-size batches (one compilation per image size), with a
    ``mesh`` split over its batch axes (``dpojax.scorers.batched.BatchedScores``).
    """

    def __init__(self, model: CLIPModel, tokenizer: CLIPTokenizer, scale: str = "pickscore", batch_size: int = 16,
                 mesh: Mesh | None = None, preprocess: Preprocess = clip_preprocess):
        if scale not in SCALES:
            raise ValueError(f"CLIP scorer: unknown scale {scale!r} (choose one of {', '.join(SCALES)})")
        self.tokenizer, self.mesh = tokenizer, mesh
        self._batches = BatchedScores(
            model, lambda clip, batch: score_uint8(clip, batch["input_ids"], batch["images"], scale, preprocess),
            batch_size, mesh, "CLIP scorer")
        self.batch_size = self._batches.batch_size

    def __call__(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        images = np.asarray(images)
        ids = tokenize(self.tokenizer, prompts)
        if len(ids) != len(images):
            raise ValueError(f"CLIP scorer: {len(images)} images but {len(ids)} prompts")
        return self._batches({"input_ids": ids, "images": images})


def check_preprocessor(folder: Path, image_size: int) -> None:
    """Refuse a ``preprocessor_config.json`` asking for other steps than ``clip_preprocess`` takes.

    ``clip_preprocess`` is CLIPImageProcessor with CLIP's mean and std, bicubic resizing of the shorter side to
    the tower's ``image_size`` and a centre crop of that size; scoring otherwise would silently differ.
    """
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return
    try:
        found = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    # Missing keys take CLIPImageProcessor's defaults; old files give sizes as plain integers.
    size, crop = found.get("size", 224), found.get("crop_size", 224)
    actual = {"shortest_edge": size.get("shortest_edge") if isinstance(size, Mapping) else size,
              "crop_size": (crop.get("height"), crop.get("width")) if isinstance(crop, Mapping) else (crop, crop),
              "resample": found.get("resample", 3), "image_mean": found.get("image_mean", CLIP_MEAN),
              "image_std": found.get("image_std", CLIP_STD), "rescale_factor": found.get("rescale_factor", 1 / 255),
              **{k: found.get(k, True) for k in ("do_resize", "do_center_crop", "do_rescale", "do_normalize")}}
    wanted = {"shortest_edge": image_size, "crop_size": (image_size, image_size), "resample": 3,
              "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "rescale_factor": 1 / 255,
              **dict.fromkeys(("do_resize", "do_center_crop", "do_rescale", "do_normalize"), True)}
    for key, value in wanted.items():
        same = (np.shape(actual[key]) == np.shape(value) and np.allclose(actual[key], value, rtol=1e-6, atol=0)
                if key in ("image_mean", "image_std", "rescale_factor") else actual[key] == value)
        if not same:
            raise ValueError(f"{path}: {key}={actual[key]!r} is not supported (the scorer preprocesses as "
                             f"CLIPImageProcessor with {key}={value!r}, for the model's image_size {image_size})")


def load_tokenizer(folder: Path, **kwargs) -> CLIPTokenizer:
    if not any((folder / name).is_file() for name in ("vocab.json", "tokenizer.json")):
        raise FileNotFoundError(f"{folder} has no CLIP tokenizer (vocab.json and merges.txt, or tokenizer.json); "
                                f"name the processor folder that has it")
    return CLIPTokenizer.from_pretrained(folder, **kwargs)


def load_clip_scorer(model: str | Path, processor: str | Path | None = None, *, scale: str, batch_size: int = 16,
                     mesh: Mesh | None = None) -> CLIPScorer:
    """A CLIPScorer from a local CLIPModel folder and its processor folder (default: the model folder)."""
    clip = load_clip(model)
    folder = component_folder(model if processor is None else processor)
    check_preprocessor(folder, clip.vision_model.embeddings.image_size)
    return CLIPScorer(clip, load_tokenizer(folder), scale, batch_size=batch_size, mesh=mesh)


def pickscore(pickscore_model: str | None = None, pickscore_processor: str | None = None, batch_size: int = 16,
              mesh: Mesh | None = None) -> CLIPScorer:
    """The ``pickscore`` built-in's factory (options named apart from ``clip_model``, which is CLIP ViT-L/14's)."""
    if pickscore_model is None:
        raise ValueError("scorer 'pickscore' needs pickscore_model=<local PickScore_v1 folder> (and "
                         "pickscore_processor=<local CLIP-ViT-H-14-laion2B-s32B-b79K folder> unless the model folder "
                         "has the tokenizer files)")
    return load_clip_scorer(pickscore_model, pickscore_processor, scale="pickscore", batch_size=batch_size, mesh=mesh)


def _clip_factory(scale: str) -> Callable[..., CLIPScorer]:
    def factory(clip_model: str | None = None, clip_processor: str | None = None, batch_size: int = 16,
                mesh: Mesh | None = None) -> CLIPScorer:
        if clip_model is None:
            raise ValueError(f"scorer {scale!r} needs clip_model=<local transformers CLIPModel folder>")
        return load_clip_scorer(clip_model, clip_processor, scale=scale, batch_size=batch_size, mesh=mesh)

    return factory


# name -> factory: the built-ins ``dpojax.scorers.registry.BUILTIN`` names (with the options each takes).
FACTORIES: dict[str, Callable[..., CLIPScorer]] = {
    "pickscore": pickscore,
    "clip_score": _clip_factory("clip_score"),
    "clip_cosine": _clip_factory("clip_cosine"),
}
