"""CLIP image tower (transformers' CLIPVisionModelWithProjection) in Flax NNX, plus CLIP's image preprocessing.

The LAION aesthetic predictor scores CLIP ViT-L/14 image embeddings; transformers 5 has no Flax CLIP, so the
project owns this tower too. Its encoder is the text tower's (``dpojax.models.clip_encoder``) without the causal
mask. Attribute paths equal transformers' state-dict keys (``vision_model.*``, ``visual_projection``; the same in
4.x and 5.x). Images are NHWC here, NCHW in PyTorch.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open

from dpojax.models import layers
from dpojax.models.clip_encoder import CLIPEncoder, check_encoder_config
from dpojax.models.frozen_config import FrozenConfig
from dpojax.weights import io, legacy_keys, naming
from dpojax.weights.folder import component_folder, read_config, weight_files
from dpojax.weights.pretrained import PretrainedMixin

# CLIPVisionConfig's defaults in transformers 5.23.
CONFIG_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "projection_dim": 512, "num_hidden_layers": 12,
                   "num_attention_heads": 12, "num_channels": 3, "image_size": 224, "patch_size": 32,
                   "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
# OpenAI CLIP's image normalisation (CLIPImageProcessor's defaults).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class CLIPVisionOutput(NamedTuple):
    last_hidden_state: jax.Array
    pooler_output: jax.Array  # post-layer-normed class token
    image_embeds: jax.Array | None = None


def _resolved(config: Mapping[str, Any]) -> dict[str, Any]:
    cfg = {**CONFIG_DEFAULTS, **config}
    check_encoder_config(cfg, "vision encoder")
    if cfg["image_size"] % cfg["patch_size"]:
        raise ValueError(f"vision encoder config: image_size={cfg['image_size']} is not divisible by "
                         f"patch_size={cfg['patch_size']}")
    return cfg


class CLIPVisionEmbeddings(nnx.Module):
    """Non-overlapping patch convolution (no bias), a learned class token in front, learned positions."""

    def __init__(self, cfg: dict, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        dim, patch = cfg["hidden_size"], cfg["patch_size"]
        self.image_size = cfg["image_size"]
        self.class_embedding = nnx.Param(jax.random.normal(rngs.params(), (dim,), param_dtype))
        self.patch_embedding = layers.conv2d(cfg["num_channels"], dim, patch, stride=patch, padding=0,
                                             bias=False, **kw)
        self.position_embedding = layers.embedding((self.image_size // patch) ** 2 + 1, dim, **kw)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        if pixel_values.ndim != 4 or pixel_values.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(f"vision encoder: pixel_values must be (batch, {self.image_size}, {self.image_size}, "
                             f"channels) (config image_size), got shape {pixel_values.shape}")
        patches = self.patch_embedding(pixel_values)
        b, _, _, dim = patches.shape
        patches = patches.reshape(b, -1, dim)
        cls = jnp.broadcast_to(self.class_embedding.astype(patches.dtype), (b, 1, dim))
        tokens = jnp.concatenate([cls, patches], axis=1)
        return tokens + self.position_embedding(jnp.arange(tokens.shape[1]))[None]


class CLIPVisionTransformer(nnx.Module):
    """Embeddings, pre-LayerNorm (transformers spells it ``pre_layrnorm``), encoder, post-LayerNorm of the class
    token."""

    def __init__(self, cfg: dict, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.embeddings = CLIPVisionEmbeddings(cfg, **kw)
        self.pre_layrnorm = layers.layer_norm(cfg["hidden_size"], cfg["layer_norm_eps"], **kw)
        self.encoder = CLIPEncoder(cfg, causal=False, **kw)
        self.post_layernorm = layers.layer_norm(cfg["hidden_size"], cfg["layer_norm_eps"], **kw)

    def __call__(self, pixel_values: jax.Array) -> CLIPVisionOutput:
        h = self.pre_layrnorm(self.embeddings(jnp.asarray(pixel_values)))
        for layer in self.encoder.layers:
            h = layer(h, None)
        return CLIPVisionOutput(h, self.post_layernorm(h[:, 0]))


class CLIPVisionModelWithProjection(PretrainedMixin, nnx.Module):
    """``model(pixel_values NHWC)`` -> last_hidden_state, pooler_output, image_embeds (projection, no bias)."""

    weights_layout = "transformers"

    def __init__(self, config: Mapping[str, Any], *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        cfg = _resolved(config)
        self.config = FrozenConfig(config)
        self.vision_model = CLIPVisionTransformer(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.visual_projection = layers.linear(cfg["hidden_size"], cfg["projection_dim"], bias=False, rngs=rngs,
                                               dtype=dtype, param_dtype=param_dtype)

    def __call__(self, pixel_values: jax.Array) -> CLIPVisionOutput:
        out = self.vision_model(pixel_values)
        return out._replace(image_embeds=self.visual_projection(out.pooler_output))


def vision_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The image tower's config from a CLIPVisionModelWithProjection config or a whole CLIPModel config.

    CLIPModel nests it under ``vision_config`` and sizes ``visual_projection`` by its own ``projection_dim``.
    """
    if "vision_config" not in config:
        return dict(config)
    return {**config["vision_config"], "projection_dim": config.get("projection_dim", 512)}


def load_clip_vision(folder: str | Path, *, dtype=jnp.float32) -> CLIPVisionModelWithProjection:
    """The image tower of a local transformers folder: a CLIPModel (e.g. openai/clip-vit-large-patch14, whose
    text tower is skipped) or a CLIPVisionModelWithProjection, written by transformers 4.x or 5.x."""
    path = component_folder(folder)
    config = vision_config(read_config(path))
    files = weight_files(path, "model")
    wanted = {key for key in files.shapes if key.startswith(("vision_model.", "visual_projection."))
              and not key.endswith(legacy_keys.IGNORED_SUFFIXES)}
    model = io.abstract_module(CLIPVisionModelWithProjection, config, param_dtype=dtype)
    naming.check_state_dict(model, {key: files.shapes[key] for key in wanted}, str(path))
    state_dict = {}
    for file in sorted({files.files[key] for key in wanted}):
        with safe_open(file, framework="np") as handle:
            state_dict.update({key: handle.get_tensor(key) for key in wanted if files.files[key] == file})
    naming.load_state_dict(model, state_dict, str(path))
    return model


# Pillow's 8-bit resampling keeps coefficients in fixed point with this many fractional bits: 8 for the pixel,
# 2 spare for the bicubic kernel's overshoot, within an int32 accumulator.
_PRECISION_BITS = 32 - 8 - 2


def _bicubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic with a = -0.5, each branch in Pillow's operation order so the doubles round alike."""
    a, x = -0.5, np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _pil_bicubic_weights(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) int32 fixed-point weights of Pillow's bicubic resampling along one axis (Pillow's
    Resample.c: precompute_coeffs, then normalize_coeffs_8bpc); zero outside each output pixel's window."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    center = (np.arange(out_size) + 0.5) * scale
    # C's (int) truncates toward zero; the window starts are clamped to the image afterwards.
    xmin = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    xmax = np.minimum(np.trunc(center + support + 0.5), in_size).astype(np.int64)
    x = np.arange(in_size)
    inside = (x >= xmin[:, None]) & (x < xmax[:, None])
    weights = np.where(inside, _bicubic((x - center[:, None] + 0.5) * (1.0 / filterscale)), 0.0)
    # Pillow sums left to right; cumsum does too (NumPy's sum is pairwise), so the totals round alike.
    weights = weights / np.cumsum(weights, axis=1)[:, -1:]
    fixed = weights * (1 << _PRECISION_BITS)
    return np.trunc(np.where(fixed < 0, fixed - 0.5, fixed + 0.5)).astype(np.int32)


def _pil_resize_axis(images: jax.Array, axis: int, out_size: int) -> jax.Array:
    """One of Pillow's two 8-bit passes: exact int32 sums (with the rounding half), shift, clip to uint8."""
    weights = jnp.asarray(_pil_bicubic_weights(images.shape[axis], out_size))
    summed = jnp.tensordot(images.astype(jnp.int32), weights, axes=[[axis], [1]], preferred_element_type=jnp.int32)
    summed = jnp.moveaxis(summed, -1, axis) + (1 << (_PRECISION_BITS - 1))
    return jnp.clip(summed >> _PRECISION_BITS, 0, 255).astype(jnp.uint8)


def pil_bicubic_resize(images: jax.Array, height: int, width: int) -> jax.Array:
    """uint8 (N, H, W, C) -> uint8 (N, height, width, C), bit for bit PIL's ``resize(..., BICUBIC)`` without
    ``reducing_gap``: two separable passes, each rounded to uint8, and an unchanged axis skipped."""
    _, in_h, in_w, _ = images.shape
    # Pillow 13 resizes the height first when it shrinks by more than twice as many pixels as the width (older Pillow
    # always resized the width first); the rounding between the passes makes the order visible.
    height_first = height < in_h and 2 * (in_w - width) < in_h - height
    axes = ((1, height), (2, width)) if height_first else ((2, width), (1, height))
    for axis, size in axes:
        if images.shape[axis] != size:
            images = _pil_resize_axis(images, axis, size)
    return images


def _normalise_table() -> np.ndarray:
    """(256, 3) float32: every uint8 level of each channel, rescaled and normalised in transformers' dtypes (the
    product with 1/255 in float64, then float32 arithmetic), so a lookup reproduces its processor bit for bit."""
    levels = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)[:, None]
    return (levels - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)


def clip_preprocess(images: np.ndarray | jax.Array, size: int = 224, *,
                    crop: Literal["transformers", "torchvision"] = "transformers") -> jax.Array:
    """uint8 (N, H, W, 3) -> normalised float32 (N, size, size, 3), as CLIPImageProcessor does it.

    Resize so the shorter side is ``size`` (PIL's bicubic, reproduced exactly; the longer side truncated as
    transformers does), crop the centre, scale to [0, 1] and normalise with CLIP's mean and std.
    ``crop="torchvision"`` is OpenAI CLIP's torchvision transform instead (Resize, CenterCrop, ToTensor,
    Normalize on the PIL image): the same but for the crop's offset, ``round(excess / 2)`` (halves to even)
    where transformers floors it.
    """
    images = jnp.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"CLIP preprocessing: images must be (N, H, W, 3), got shape {images.shape}")
    _, h, w, _ = images.shape
    short, long = min(h, w), max(h, w)
    new_long = int(size * long / short)
    new_h, new_w = (size, new_long) if h <= w else (new_long, size)
    resized = pil_bicubic_resize(images, new_h, new_w)
    if crop == "torchvision":
        top, left = round((new_h - size) / 2.0), round((new_w - size) / 2.0)
    elif crop == "transformers":
        top, left = (new_h - size) // 2, (new_w - size) // 2
    else:
        raise ValueError(f"CLIP preprocessing: crop={crop!r} is not 'transformers' or 'torchvision'")
    pixels = resized[:, top:top + size, left:left + size].astype(jnp.int32)
    return jnp.asarray(_normalise_table())[pixels, jnp.arange(3)]
