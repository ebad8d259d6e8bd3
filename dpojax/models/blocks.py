"""Building blocks shared by the UNet and the VAE (diffusers' resnet, embedding, sampling and block modules).

Everything here works on NHWC arrays. Attribute names mirror diffusers so weights map by one rule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpojax.models import layers
from dpojax.models.attention import Transformer2DModel

SUPPORTED_ACTIVATIONS = ("silu", "swish")


def check_activation(act_fn: str, what: str) -> None:
    """Only SiLU is used by SD/SDXL; anything else is refused rather than silently replaced."""
    if act_fn not in SUPPORTED_ACTIVATIONS:
        raise ValueError(f"{what}: act_fn={act_fn!r} is not supported "
                         f"(supported: {', '.join(SUPPORTED_ACTIVATIONS)})")


def timestep_embedding(timesteps: jax.Array, dim: int, *, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding of (B,) timesteps, fp32, as diffusers' ``get_timestep_embedding``."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
    args = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


class Timesteps(nnx.Module):
    """Parameter-free sinusoidal projection (diffusers ``Timesteps``)."""

    def __init__(self, dim: int, flip_sin_to_cos: bool, freq_shift: float):
        self.dim, self.flip_sin_to_cos, self.freq_shift = dim, flip_sin_to_cos, freq_shift

    def __call__(self, timesteps: jax.Array) -> jax.Array:
        return timestep_embedding(timesteps, self.dim, flip_sin_to_cos=self.flip_sin_to_cos,
                                  freq_shift=self.freq_shift)


class TimestepEmbedding(nnx.Module):
    """Two-layer SiLU MLP applied to a timestep (or any conditioning) vector."""

    def __init__(self, in_features: int, features: int, *, rngs: nnx.Rngs, dtype=None,
                 param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.linear_1 = layers.linear(in_features, features, **kw)
        self.linear_2 = layers.linear(features, features, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


class ResnetBlock2D(nnx.Module):
    """GroupNorm-SiLU-conv twice, with the time embedding added between, plus a (1x1-projected) skip."""

    def __init__(self, in_channels: int, out_channels: int, *, temb_channels: int | None, groups: int,
                 eps: float, output_scale_factor: float = 1.0, rngs: nnx.Rngs, dtype=None,
                 param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.norm1 = layers.group_norm(in_channels, groups, eps, **kw)
        self.conv1 = layers.conv2d(in_channels, out_channels, 3, **kw)
        self.time_emb_proj = layers.linear(temb_channels, out_channels, **kw) if temb_channels else None
        self.norm2 = layers.group_norm(out_channels, groups, eps, **kw)
        self.conv2 = layers.conv2d(out_channels, out_channels, 3, **kw)
        self.conv_shortcut = (layers.conv2d(in_channels, out_channels, 1, padding=0, **kw)
                              if in_channels != out_channels else None)
        self.output_scale_factor = output_scale_factor

    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(jax.nn.silu(temb))[:, None, None, :]
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        out = skip + h
        return out if self.output_scale_factor == 1.0 else out / self.output_scale_factor


class Downsample2D(nnx.Module):
    """Stride-2 3x3 conv. ``padding=0`` means PyTorch's asymmetric (right/bottom) zero pad, as in the VAE."""

    def __init__(self, channels: int, *, padding: int, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        conv_padding = ((0, 1), (0, 1)) if padding == 0 else padding
        self.conv = layers.conv2d(channels, channels, 3, stride=2, padding=conv_padding, rngs=rngs,
                                  dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


def upsample_nearest(x: jax.Array, size: Sequence[int] | None = None) -> jax.Array:
    """Nearest resize of NHWC ``x`` to ``size`` (default 2x), as PyTorch's ``interpolate(mode='nearest')``."""
    h, w = x.shape[1:3]
    size = (2 * h, 2 * w) if size is None else tuple(size)
    if size == (2 * h, 2 * w):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    rows = np.arange(size[0]) * h // size[0]
    cols = np.arange(size[1]) * w // size[1]
    return x[:, rows][:, :, cols]


class Upsample2D(nnx.Module):
    """Nearest 2x (or to an explicit size, for odd skip shapes) then a 3x3 conv."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        self.conv = layers.conv2d(channels, channels, 3, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array, size: Sequence[int] | None = None) -> jax.Array:
        return self.conv(upsample_nearest(x, size))


@dataclass(frozen=True)
class CrossAttentionSpec:
    """How a block builds its Transformer2DModels; ``layers`` gives the depth of each one (one per resnet)."""

    heads: int
    layers: tuple[int, ...]
    cross_attention_dim: int
    use_linear_projection: bool
    upcast_attention: bool
    remat: layers.Remat = False

    def build(self, index: int, channels: int, groups: int, **kw) -> Transformer2DModel:
        return Transformer2DModel(self.heads, channels // self.heads, channels, num_layers=self.layers[index],
                                  cross_attention_dim=self.cross_attention_dim, norm_num_groups=groups,
                                  use_linear_projection=self.use_linear_projection,
                                  upcast_attention=self.upcast_attention, remat=self.remat, **kw)


class DownBlock(nnx.Module):
    """Resnets, each optionally followed by a transformer, then an optional downsampler.

    Covers diffusers' DownBlock2D and CrossAttnDownBlock2D (UNet) and DownEncoderBlock2D (VAE: no temb,
    ``downsample_padding=0``). Returns the output and the skip activations the UNet's up path consumes.
    """

    def __init__(self, in_channels: int, out_channels: int, *, num_layers: int, temb_channels: int | None,
                 groups: int, eps: float, add_downsample: bool, downsample_padding: int,
                 cross_attention: CrossAttentionSpec | None = None, rngs: nnx.Rngs, dtype=None,
                 param_dtype=jnp.float32, remat: layers.Remat = False):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.remat = remat
        self.resnets = nnx.List([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels=temb_channels,
                          groups=groups, eps=eps, **kw)
            for i in range(num_layers)])
        self.attentions = None if cross_attention is None else nnx.List([
            cross_attention.build(i, out_channels, groups, **kw) for i in range(num_layers)])
        self.downsamplers = (nnx.List([Downsample2D(out_channels, padding=downsample_padding, **kw)])
                             if add_downsample else None)

    def __call__(self, x: jax.Array, temb: jax.Array | None = None,
                 context: jax.Array | None = None) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = layers.call_layer(resnet, self.remat, x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, tuple(skips)


class UpBlock(nnx.Module):
    """Resnets (each fed the previous output concatenated with one skip), optional transformers, upsampler.

    Covers UpBlock2D and CrossAttnUpBlock2D (UNet; ``skip_channels`` lists each resnet's skip width) and
    UpDecoderBlock2D (VAE; no skips, no temb).
    """

    def __init__(self, in_channels: int, out_channels: int, *, num_layers: int, skip_channels: Sequence[int],
                 temb_channels: int | None, groups: int, eps: float, add_upsample: bool,
                 cross_attention: CrossAttentionSpec | None = None, rngs: nnx.Rngs, dtype=None,
                 param_dtype=jnp.float32, remat: layers.Remat = False):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.remat = remat
        skip_channels = tuple(skip_channels) or (0,) * num_layers
        self.resnets = nnx.List([
            ResnetBlock2D((in_channels if i == 0 else out_channels) + skip_channels[i], out_channels,
                          temb_channels=temb_channels, groups=groups, eps=eps, **kw)
            for i in range(num_layers)])
        self.attentions = None if cross_attention is None else nnx.List([
            cross_attention.build(i, out_channels, groups, **kw) for i in range(num_layers)])
        self.upsamplers = nnx.List([Upsample2D(out_channels, **kw)]) if add_upsample else None

    def __call__(self, x: jax.Array, temb: jax.Array | None = None, context: jax.Array | None = None,
                 skips: Sequence[jax.Array] = (), upsample_size: Sequence[int] | None = None) -> jax.Array:
        skips = list(skips)
        for i, resnet in enumerate(self.resnets):
            if skips:
                x = jnp.concatenate([x, skips.pop()], axis=-1)
            x = layers.call_layer(resnet, self.remat, x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x
