"""Attention and the spatial transformer of the SD/SDXL UNet (diffusers' Attention, BasicTransformerBlock,
Transformer2DModel), plus the single-head spatial self-attention of the VAE mid block.

All attention math goes through :func:`attention`, so the kernel (XLA, cuDNN, a TPU splash kernel; see
``attention_kernels``) is chosen in one place; :func:`configure_attention` sets it on a built model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from dpojax.models import attention_kernels as kernels
from dpojax.models import layers


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, upcast: bool = False, is_causal: bool = False,
              mask: jax.Array | None = None, kernel: str = "auto", mesh: Mesh | None = None,
              platform: str | None = None) -> jax.Array:
    """Softmax attention over (batch, tokens, heads, head_dim) arrays, scaled by 1/sqrt(head_dim).

    ``upcast`` computes scores and softmax in fp32 (SD2.x ``upcast_attention``: bf16 scores overflow there).
    ``is_causal`` and a boolean ``mask`` (True = attend) serve the CLIP text encoders. ``kernel``, ``mesh`` and
    ``platform`` pick the implementation (``dpojax.models.attention_kernels``).
    """
    dtype = q.dtype
    if upcast:
        q, k, v = (t.astype(jnp.float32) for t in (q, k, v))
    return kernels.attention(q, k, v, kernel=kernel, mask=mask, is_causal=is_causal, mesh=mesh,
                             platform=platform).astype(dtype)


def configure_attention(module: nnx.Module, kernel: str, mesh: Mesh | None = None,
                        platform: str | None = None) -> nnx.Module:
    """Make every :class:`Attention` inside ``module`` use ``kernel`` as resolved for ``platform`` (default: the
    running backend's; "auto" becomes that platform's kernel), placed per device over ``mesh`` where it must be
    (splash)."""
    platform = platform or jax.devices()[0].platform
    kernel = kernels.resolve(kernel, platform)
    for _, sub in nnx.iter_modules(module):
        if isinstance(sub, Attention):
            sub.kernel, sub.mesh, sub.platform = kernel, mesh, platform
    return module


class Attention(nnx.Module):
    """Multi-head (self- or cross-) attention on token sequences with diffusers' projection names."""

    def __init__(self, query_dim: int, *, heads: int, dim_head: int, cross_attention_dim: int | None = None,
                 bias: bool = False, upcast: bool = False, rngs: nnx.Rngs, dtype=None,
                 param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        inner = heads * dim_head
        context_dim = cross_attention_dim or query_dim
        self.to_q = layers.linear(query_dim, inner, bias=bias, **kw)
        self.to_k = layers.linear(context_dim, inner, bias=bias, **kw)
        self.to_v = layers.linear(context_dim, inner, bias=bias, **kw)
        self.to_out = nnx.List([layers.linear(inner, query_dim, **kw)])  # index 1 is a parameter-free Dropout
        self.heads, self.upcast = heads, upcast
        self.kernel, self.mesh, self.platform = "auto", None, None  # see configure_attention

    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        context = x if context is None else context
        split = lambda t: t.reshape(*t.shape[:2], self.heads, -1)  # noqa: E731
        out = attention(split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context)),
                        upcast=self.upcast, kernel=self.kernel, mesh=self.mesh, platform=self.platform)
        return self.to_out[0](out.reshape(*out.shape[:2], -1))


class SpatialSelfAttention(Attention):
    """Single-head self-attention over an NHWC map, GroupNorm in front and a residual (VAE mid block)."""

    def __init__(self, channels: int, *, groups: int, eps: float, rngs: nnx.Rngs, dtype=None,
                 param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        super().__init__(channels, heads=1, dim_head=channels, bias=True, upcast=True, **kw)
        self.group_norm = layers.group_norm(channels, groups, eps, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        tokens = self.group_norm(x).reshape(b, h * w, c)
        return x + super().__call__(tokens).reshape(b, h, w, c)


class GEGLU(nnx.Module):
    """Gated GELU: one projection to twice the width, the second half (exact GELU) gates the first."""

    def __init__(self, dim_in: int, dim_out: int, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        self.proj = layers.linear(dim_in, 2 * dim_out, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        hidden, gate = jnp.split(self.proj(x), 2, axis=-1)
        return hidden * jax.nn.gelu(gate, approximate=False)


class FeedForward(nnx.Module):
    """GEGLU MLP with 4x width; ``net`` keeps diffusers' [GEGLU, Dropout, Linear] indices."""

    def __init__(self, dim: int, *, mult: int = 4, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.net = nnx.List([GEGLU(dim, dim * mult, **kw), None, layers.linear(dim * mult, dim, **kw)])

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nnx.Module):
    """Pre-LayerNorm self-attention, cross-attention to the text, and GEGLU feed-forward, each residual."""

    def __init__(self, dim: int, *, heads: int, dim_head: int, cross_attention_dim: int, upcast: bool,
                 rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.norm1 = layers.layer_norm(dim, 1e-5, **kw)
        self.attn1 = Attention(dim, heads=heads, dim_head=dim_head, upcast=upcast, **kw)
        self.norm2 = layers.layer_norm(dim, 1e-5, **kw)
        self.attn2 = Attention(dim, heads=heads, dim_head=dim_head, cross_attention_dim=cross_attention_dim,
                               upcast=upcast, **kw)
        self.norm3 = layers.layer_norm(dim, 1e-5, **kw)
        self.ff = FeedForward(dim, **kw)

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nnx.Module):
    """GroupNorm, projection to tokens (linear or 1x1 conv), transformer blocks, projection back, residual."""

    def __init__(self, heads: int, dim_head: int, in_channels: int, *, num_layers: int,
                 cross_attention_dim: int, norm_num_groups: int, use_linear_projection: bool,
                 upcast_attention: bool, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32,
                 remat: layers.Remat = False):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.remat = remat
        inner = heads * dim_head
        self.norm = layers.group_norm(in_channels, norm_num_groups, 1e-6, **kw)
        # A 1x1 conv and a linear layer are the same map on NHWC; only the stored weight layout differs.
        project = (layers.linear if use_linear_projection
                   else lambda i, o, **k: layers.conv2d(i, o, 1, padding=0, **k))
        self.proj_in = project(in_channels, inner, **kw)
        self.transformer_blocks = nnx.List([
            BasicTransformerBlock(inner, heads=heads, dim_head=dim_head,
                                  cross_attention_dim=cross_attention_dim, upcast=upcast_attention, **kw)
            for _ in range(num_layers)])
        self.proj_out = project(inner, in_channels, **kw)

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        b, h, w, _ = x.shape
        tokens = self.proj_in(self.norm(x))
        inner = tokens.shape[-1]
        tokens = tokens.reshape(b, h * w, inner)
        for block in self.transformer_blocks:
            tokens = layers.call_layer(block, self.remat, tokens, context)
        return x + self.proj_out(tokens.reshape(b, h, w, inner))
