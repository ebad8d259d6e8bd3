"""The whole CLIP (transformers' CLIPModel: text tower, image tower, both projections, ``logit_scale``) in Flax NNX.

PickScore and CLIP-score rewards compare a prompt's and an image's embedding, so they need both towers of one
checkpoint. The towers are ``dpojax.models.clip_text`` and ``dpojax.models.clip_vision``'s; attribute paths equal
transformers' CLIPModel state-dict keys (``text_model.*``, ``vision_model.*``, ``text_projection``,
``visual_projection``, ``logit_scale``; the same in 4.x and 5.x). Images are NHWC here, NCHW in PyTorch.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from dpojax.models.clip_text import CLIPTextModelWithProjection
from dpojax.models.clip_vision import CLIPVisionModelWithProjection, vision_config
from dpojax.models.frozen_config import FrozenConfig
from dpojax.weights.folder import component_folder, read_config
from dpojax.weights.pretrained import PretrainedMixin

# CLIPConfig's defaults in transformers 5.23 (the towers' own defaults are their modules').
PROJECTION_DIM = 512
LOGIT_SCALE_INIT = 2.6592


class CLIPOutput(NamedTuple):
    """transformers' CLIPOutput fields: scaled cosine logits and the unit-norm projected embeddings."""

    logits_per_image: jax.Array  # (images, texts)
    logits_per_text: jax.Array  # (texts, images)
    text_embeds: jax.Array
    image_embeds: jax.Array


def tower_configs(config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The text and image towers' configs of a CLIPModel config, each with the top-level ``projection_dim``
    (CLIPModel sizes both projections by it, not by the towers' own)."""
    missing = [key for key in ("text_config", "vision_config") if not isinstance(config.get(key), Mapping)]
    if missing:
        raise ValueError(f"not a CLIPModel config: no {' or '.join(missing)} "
                         f"(architectures: {config.get('architectures')})")
    projection = {"projection_dim": config.get("projection_dim", PROJECTION_DIM)}
    return {**config["text_config"], **projection}, vision_config(config)


class CLIPModel(PretrainedMixin, nnx.Module):
    """``model(input_ids, pixel_values NHWC)`` -> CLIPOutput; ``get_text_features`` / ``get_image_features`` give
    the projected embeddings before normalisation, as transformers' methods do.
    """

    weights_layout = "transformers"

    def __init__(self, config: Mapping[str, Any], *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        text_cfg, image_cfg = tower_configs(config)
        self.config = FrozenConfig(config)
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        # The one-tower models resolve and check their configs; CLIPModel keeps their parts under its own names.
        text = CLIPTextModelWithProjection(text_cfg, **kw)
        image = CLIPVisionModelWithProjection(image_cfg, **kw)
        self.text_model, self.text_projection = text.text_model, text.text_projection
        self.vision_model, self.visual_projection = image.vision_model, image.visual_projection
        self.logit_scale = nnx.Param(jnp.asarray(config.get("logit_scale_init_value", LOGIT_SCALE_INIT),
                                                 param_dtype))

    def get_text_features(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        return self.text_projection(self.text_model.encode(input_ids, attention_mask).pooler_output)

    def get_image_features(self, pixel_values: jax.Array) -> jax.Array:
        return self.visual_projection(self.vision_model(pixel_values).pooler_output)

    def __call__(self, input_ids: jax.Array, pixel_values: jax.Array,
                 attention_mask: jax.Array | None = None) -> CLIPOutput:
        text = unit(self.get_text_features(input_ids, attention_mask))
        image = unit(self.get_image_features(pixel_values))
        logits_per_text = text @ image.T * jnp.exp(self.logit_scale.get_value()).astype(text.dtype)
        return CLIPOutput(logits_per_text.T, logits_per_text, text, image)


def unit(x: jax.Array) -> jax.Array:
    """``x`` divided by its L2 norm along the last axis, in float32 (transformers' ``_get_vector_norm``)."""
    x = x.astype(jnp.float32)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def load_clip(folder: str | Path, *, dtype=jnp.float32) -> CLIPModel:
    """A local transformers CLIPModel folder (config.json + model.safetensors, single or sharded), written by
    transformers 4.x or 5.x; a folder of another kind is a one-line error naming it."""
    path = component_folder(folder)
    config = read_config(path)
    try:
        tower_configs(config)
    except ValueError as err:
        raise ValueError(f"{path / 'config.json'}: {err}") from None
    return CLIPModel.from_pretrained(path, dtype=dtype)
