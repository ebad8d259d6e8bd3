"""The transformer encoder shared by CLIP's text tower (causal) and vision tower (bidirectional).

transformers gives both towers the same layer classes and state-dict names (``encoder.layers.N.self_attn.q_proj``,
``mlp.fc1``, ``layer_norm1``...); so does this module, and the towers differ only in ``causal``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dpojax.models import layers
from dpojax.models.attention import attention

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI CLIP-L (SD1.x, SDXL encoder 1, ViT-L/14)
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # OpenCLIP bigG (SDXL encoder 2)
}


def check_encoder_config(cfg: Mapping[str, Any], what: str) -> None:
    """One-line errors for settings the encoder cannot run (``what`` names the tower in the message)."""
    if cfg["hidden_act"] not in ACTIVATIONS:
        raise ValueError(f"{what} config: hidden_act={cfg['hidden_act']!r} is not supported "
                         f"(supported: {', '.join(ACTIVATIONS)})")
    if cfg["hidden_size"] % cfg["num_attention_heads"]:
        raise ValueError(f"{what} config: hidden_size={cfg['hidden_size']} is not divisible by "
                         f"num_attention_heads={cfg['num_attention_heads']}")


class CLIPAttention(nnx.Module):
    def __init__(self, cfg: dict, *, causal: bool, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        dim = cfg["hidden_size"]
        self.heads, self.causal = cfg["num_attention_heads"], causal
        self.k_proj = layers.linear(dim, dim, **kw)
        self.v_proj = layers.linear(dim, dim, **kw)
        self.q_proj = layers.linear(dim, dim, **kw)
        self.out_proj = layers.linear(dim, dim, **kw)

    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        b, t, d = x.shape
        split = lambda y: y.reshape(b, t, self.heads, d // self.heads)  # noqa: E731
        out = attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)),
                        is_causal=self.causal, mask=mask)
        return self.out_proj(out.reshape(b, t, d))


class CLIPMLP(nnx.Module):
    def __init__(self, cfg: dict, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.act = cfg["hidden_act"]
        self.fc1 = layers.linear(cfg["hidden_size"], cfg["intermediate_size"], **kw)
        self.fc2 = layers.linear(cfg["intermediate_size"], cfg["hidden_size"], **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(ACTIVATIONS[self.act](self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    """Pre-norm transformer layer: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, cfg: dict, *, causal: bool, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.self_attn = CLIPAttention(cfg, causal=causal, **kw)
        self.layer_norm1 = layers.layer_norm(cfg["hidden_size"], cfg["layer_norm_eps"], **kw)
        self.mlp = CLIPMLP(cfg, **kw)
        self.layer_norm2 = layers.layer_norm(cfg["hidden_size"], cfg["layer_norm_eps"], **kw)

    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    def __init__(self, cfg: dict, *, causal: bool, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        self.layers = nnx.List([CLIPEncoderLayer(cfg, causal=causal, rngs=rngs, dtype=dtype,
                                                 param_dtype=param_dtype)
                                for _ in range(cfg["num_hidden_layers"])])
