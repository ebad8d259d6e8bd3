"""BLIP's image encoder (a timm-style ViT) and its text encoder (BERT with cross-attention to the image in every
layer) in Flax NNX, as ImageReward scores with them.

The PyTorch originals are BLIP's ``models/vit.py`` ``VisionTransformer`` and ``models/med.py`` ``BertModel``
(``add_pooling_layer=False``), in the mode scoring uses: the text encoder bidirectional (not a decoder), the
padding of the prompt masked out of its self-attention, every image token attended by the cross-attention,
absolute positions, no dropout. Attribute paths equal their state-dict keys (``patch_embed.proj``,
``blocks.N.attn.qkv``; ``encoder.layer.N.attention.self.query``, ``crossattention``, ``LayerNorm``...), so the
checkpoints load through ``dpojax.weights.naming``. Images are NHWC here, NCHW in PyTorch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dpojax.models import layers
from dpojax.models.attention import attention
from dpojax.models.clip_encoder import ACTIVATIONS, CLIPMLP

VIT_LAYER_NORM_EPS = 1e-6  # BLIP's VisionTransformer: partial(nn.LayerNorm, eps=1e-6)


class PatchEmbed(nnx.Module):
    """Non-overlapping patch convolution with bias (timm's PatchEmbed), flattened to tokens row by row."""

    def __init__(self, image_size: int, patch_size: int, width: int, *, rngs: nnx.Rngs, dtype=None,
                 param_dtype=jnp.float32):
        self.image_size = image_size
        self.proj = layers.conv2d(3, width, patch_size, stride=patch_size, padding=0, rngs=rngs, dtype=dtype,
                                  param_dtype=param_dtype)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        if pixel_values.ndim != 4 or pixel_values.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(f"BLIP vision encoder: pixel_values must be (batch, {self.image_size}, "
                             f"{self.image_size}, 3), got shape {pixel_values.shape}")
        patches = self.proj(pixel_values)
        return patches.reshape(patches.shape[0], -1, patches.shape[-1])


class VisionAttention(nnx.Module):
    """Self-attention with one fused ``qkv`` projection (q, k, v stacked in that order along its outputs)."""

    def __init__(self, width: int, heads: int, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.heads = heads
        self.qkv = layers.linear(width, 3 * width, **kw)
        self.proj = layers.linear(width, width, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        q, k, v = jnp.moveaxis(self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads), 2, 0)
        return self.proj(attention(q, k, v).reshape(b, t, d))


class VisionBlock(nnx.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)) with exact GELU."""

    def __init__(self, width: int, heads: int, mlp_dim: int, *, rngs: nnx.Rngs, dtype=None,
                 param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.norm1 = layers.layer_norm(width, VIT_LAYER_NORM_EPS, **kw)
        self.attn = VisionAttention(width, heads, **kw)
        self.norm2 = layers.layer_norm(width, VIT_LAYER_NORM_EPS, **kw)
        # CLIP's MLP is the same map under the same names (fc1, act, fc2).
        self.mlp = CLIPMLP({"hidden_size": width, "intermediate_size": mlp_dim, "hidden_act": "gelu"}, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nnx.Module):
    """``encoder(pixel_values NHWC)`` -> (batch, 1 + patches, width): class token and patch tokens plus learned
    positions, the blocks, a final LayerNorm over every token."""

    def __init__(self, *, image_size: int, patch_size: int, width: int, depth: int, heads: int, mlp_dim: int,
                 rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        if image_size % patch_size:
            raise ValueError(f"BLIP vision encoder: image_size={image_size} is not divisible by "
                             f"patch_size={patch_size}")
        if width % heads:
            raise ValueError(f"BLIP vision encoder: width={width} is not divisible by heads={heads}")
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.image_size = image_size
        self.patch_embed = PatchEmbed(image_size, patch_size, width, **kw)
        tokens = (image_size // patch_size) ** 2 + 1
        self.cls_token = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, 1, width), param_dtype))
        self.pos_embed = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, tokens, width), param_dtype))
        self.blocks = nnx.List([VisionBlock(width, heads, mlp_dim, **kw) for _ in range(depth)])
        self.norm = layers.layer_norm(width, VIT_LAYER_NORM_EPS, **kw)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        patches = self.patch_embed(jnp.asarray(pixel_values))
        cls = jnp.broadcast_to(self.cls_token.astype(patches.dtype), (patches.shape[0], 1, patches.shape[-1]))
        x = jnp.concatenate([cls, patches], axis=1) + self.pos_embed.astype(patches.dtype)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


# --- the text encoder (BLIP's med.py BertModel) --------------------------------------------------------------

# What the text encoder needs of a BertConfig (med_config.json), with transformers' BertConfig defaults.
BERT_DEFAULTS = {"vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                 "intermediate_size": 3072, "hidden_act": "gelu", "max_position_embeddings": 512,
                 "layer_norm_eps": 1e-12, "position_embedding_type": "absolute", "add_cross_attention": False}


def bert_config(config: Mapping[str, Any], what: str) -> dict[str, Any]:
    """The text encoder's settings from a med_config.json dict (``what`` names it in errors), checked for what
    this port computes: absolute positions, cross-attention layers, an activation it knows."""
    cfg = {**BERT_DEFAULTS, **{k: config[k] for k in BERT_DEFAULTS if k in config}}
    if cfg["position_embedding_type"] != "absolute":
        raise ValueError(f"{what}: position_embedding_type={cfg['position_embedding_type']!r} is not supported "
                         f"(only 'absolute')")
    if cfg["add_cross_attention"] is not True:
        raise ValueError(f"{what}: add_cross_attention must be true (BLIP's text encoder attends to the image)")
    if cfg["hidden_act"] not in ACTIVATIONS:
        raise ValueError(f"{what}: hidden_act={cfg['hidden_act']!r} is not supported "
                         f"(supported: {', '.join(ACTIVATIONS)})")
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "max_position_embeddings"):
        if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < 1:
            raise ValueError(f"{what}: {key}={cfg[key]!r} must be a positive integer")
    if cfg["hidden_size"] % cfg["num_attention_heads"]:
        raise ValueError(f"{what}: hidden_size={cfg['hidden_size']} is not divisible by "
                         f"num_attention_heads={cfg['num_attention_heads']}")
    return cfg


class BertEmbeddings(nnx.Module):
    """Word plus absolute position embeddings (no token types in BLIP's version), then LayerNorm."""

    def __init__(self, cfg: dict, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.word_embeddings = layers.embedding(cfg["vocab_size"], cfg["hidden_size"], **kw)
        self.position_embeddings = layers.embedding(cfg["max_position_embeddings"], cfg["hidden_size"], **kw)
        self.LayerNorm = layers.layer_norm(cfg["hidden_size"], cfg["layer_norm_eps"], **kw)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        if input_ids.ndim != 2 or input_ids.shape[1] > self.position_embeddings.num_embeddings:
            raise ValueError(f"BLIP text encoder: input_ids must be (batch, tokens) with at most "
                             f"{self.position_embeddings.num_embeddings} tokens (max_position_embeddings), "
                             f"got shape {input_ids.shape}")
        positions = self.position_embeddings(jnp.arange(input_ids.shape[1]))[None]
        return self.LayerNorm(self.word_embeddings(input_ids) + positions)


class BertSelfAttention(nnx.Module):
    """Query from the text; key and value from the text, or from the image (``context_width`` wide) when it is the
    cross-attention."""

    def __init__(self, cfg: dict, context_width: int, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        dim = cfg["hidden_size"]
        self.heads = cfg["num_attention_heads"]
        self.query = layers.linear(dim, dim, **kw)
        self.key = layers.linear(context_width, dim, **kw)
        self.value = layers.linear(context_width, dim, **kw)

    def __call__(self, x: jax.Array, context: jax.Array, mask: jax.Array | None) -> jax.Array:
        split = lambda y: y.reshape(*y.shape[:2], self.heads, -1)  # noqa: E731
        out = attention(split(self.query(x)), split(self.key(context)), split(self.value(context)), mask=mask)
        return out.reshape(*x.shape)


class BertResidualOutput(nnx.Module):
    """``LayerNorm(dense(h) + residual)``: BERT's BertSelfOutput and BertOutput (post-norm)."""

    def __init__(self, in_features: int, cfg: dict, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.dense = layers.linear(in_features, cfg["hidden_size"], **kw)
        self.LayerNorm = layers.layer_norm(cfg["hidden_size"], cfg["layer_norm_eps"], **kw)

    def __call__(self, h: jax.Array, residual: jax.Array) -> jax.Array:
        return self.LayerNorm(self.dense(h) + residual)


class BertAttention(nnx.Module):
    def __init__(self, cfg: dict, context_width: int, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.self = BertSelfAttention(cfg, context_width, **kw)
        self.output = BertResidualOutput(cfg["hidden_size"], cfg, **kw)

    def __call__(self, x: jax.Array, context: jax.Array, mask: jax.Array | None) -> jax.Array:
        return self.output(self.self(x, context, mask), x)


class BertIntermediate(nnx.Module):
    def __init__(self, cfg: dict, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        self.act = cfg["hidden_act"]
        self.dense = layers.linear(cfg["hidden_size"], cfg["intermediate_size"], rngs=rngs, dtype=dtype,
                                   param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return ACTIVATIONS[self.act](self.dense(x))


class BertLayer(nnx.Module):
    """Self-attention over the prompt, cross-attention to the image tokens, feed-forward; each post-norm."""

    def __init__(self, cfg: dict, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.attention = BertAttention(cfg, cfg["hidden_size"], **kw)
        self.crossattention = BertAttention(cfg, cfg["encoder_width"], **kw)
        self.intermediate = BertIntermediate(cfg, **kw)
        self.output = BertResidualOutput(cfg["intermediate_size"], cfg, **kw)

    def __call__(self, x: jax.Array, mask: jax.Array, image_embeds: jax.Array) -> jax.Array:
        x = self.attention(x, x, mask)
        x = self.crossattention(x, image_embeds, None)  # every image token is attended (a mask of ones)
        return self.output(self.intermediate(x), x)


class BertEncoder(nnx.Module):
    def __init__(self, cfg: dict, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        self.layer = nnx.List([BertLayer(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
                               for _ in range(cfg["num_hidden_layers"])])


class BertModel(nnx.Module):
    """``text_encoder(input_ids, attention_mask, image_embeds)`` -> last_hidden_state (batch, tokens, hidden).

    ``cfg`` is a :func:`bert_config` plus ``encoder_width``, the image encoder's width (BLIP sets it from the
    ViT, whatever med_config.json says).
    """

    def __init__(self, cfg: Mapping[str, Any], *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        cfg = dict(cfg)
        self.embeddings = BertEmbeddings(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.encoder = BertEncoder(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, image_embeds: jax.Array) -> jax.Array:
        input_ids = jnp.asarray(input_ids)
        # med.py adds -10000 to masked scores; in the softmax that is a zero weight, as the boolean mask gives.
        mask = jnp.asarray(attention_mask, bool)[:, None, None, :]
        h = self.embeddings(input_ids)
        for layer in self.encoder.layer:
            h = layer(h, mask, image_embeds.astype(h.dtype))
        return h
