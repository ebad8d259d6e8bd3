"""Thin factories over Flax NNX layers that fix the project's two conventions.

1. Attribute paths mirror the PyTorch module names of diffusers/transformers exactly (``to_out.0``,
   ``down_blocks.1.resnets.0.conv1``), so weight import/export is one generic rename rule
   (see ``dpojax.weights.naming``) instead of a per-model table.
2. Every large kernel carries logical axis names; ``dpojax.parallel`` maps them to mesh axes.

Numerics follow PyTorch (two-pass variance in GroupNorm, eps as given) so parity tests can be tight.

Two layers subclass Flax's only to shape the programs XLA builds from them (docs/performance.md): ``Linear``
contracts a 2-D view of its input, and ``GroupNorm`` takes its statistics in two contiguous stages.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

# Logical axis names used on parameters. Biases and norm scales stay replicated.
LINEAR_AXES = ("embed", "mlp")  # kernel (in, out)
CONV_AXES = (None, None, "conv_in", "conv_out")  # kernel HWIO
EMBED_AXES = ("vocab", "embed")  # embedding table (num, features)


class Linear(nnx.Linear):
    """``nnx.Linear`` applied to its input's leading axes flattened into one. The weight gradient is then one
    plain matrix product; contracting several leading axes at once, XLA:CPU transposed and copied an operand
    of every weight-gradient product and ran it on a slower path."""

    def __call__(self, inputs: jax.Array) -> jax.Array:
        out = super().__call__(inputs.reshape(-1, inputs.shape[-1]))
        return out.reshape(*inputs.shape[:-1], out.shape[-1])


class GroupNorm(nnx.GroupNorm):
    """``nnx.GroupNorm`` over channels-last input with its statistics (fp32 at least, two-pass variance) taken
    in two stages: over the spatial axes per channel, where channels are the contiguous axis, then over each
    group's channels. One reduction over (spatial, channels of a group) strides across memory, and XLA:CPU
    ran it several times slower."""

    def __call__(self, x: jax.Array) -> jax.Array:
        scale, bias = self.scale[...], self.bias[...]
        x, scale, bias = self.promote_dtype((x, scale, bias), dtype=self.dtype)
        out_dtype = jnp.result_type(x, scale, bias) if self.dtype is None else self.dtype
        stats = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        spatial, channels = tuple(range(1, x.ndim - 1)), x.shape[-1]

        def group_mean(t: jax.Array) -> jax.Array:  # (B, 1, ..., 1, C): each channel gets its group's mean
            means = jnp.mean(t, axis=spatial)
            if self.group_size > 1:
                means = jnp.mean(means.reshape(-1, self.num_groups, self.group_size), axis=-1)
                means = jnp.repeat(means, self.group_size, axis=-1)
            return means.reshape(-1, *(1,) * len(spatial), channels)

        centered = stats - group_mean(stats)
        normed = centered * jax.lax.rsqrt(group_mean(jnp.square(centered)) + self.epsilon)
        return (normed * scale + bias).astype(out_dtype)


def linear(in_features: int, out_features: int, *, rngs: nnx.Rngs, bias: bool = True,
           dtype=None, param_dtype=jnp.float32) -> Linear:
    return Linear(in_features, out_features, use_bias=bias, dtype=dtype, param_dtype=param_dtype,
                      kernel_metadata={"out_sharding": LINEAR_AXES}, rngs=rngs)


def conv2d(in_channels: int, out_channels: int, kernel_size: int = 3, *, rngs: nnx.Rngs, stride: int = 1,
           padding: int | str | tuple = 1, bias: bool = True, dtype=None, param_dtype=jnp.float32) -> nnx.Conv:
    """NHWC convolution with PyTorch-style integer padding."""
    if isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    return nnx.Conv(in_channels, out_channels, (kernel_size, kernel_size), strides=stride, padding=padding,
                    use_bias=bias, dtype=dtype, param_dtype=param_dtype,
                    kernel_metadata={"out_sharding": CONV_AXES}, rngs=rngs)


def group_norm(num_channels: int, num_groups: int, eps: float, *, rngs: nnx.Rngs, dtype=None,
               param_dtype=jnp.float32) -> GroupNorm:
    return GroupNorm(num_channels, num_groups=num_groups, epsilon=eps, use_fast_variance=False,
                         dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def layer_norm(num_features: int, eps: float, *, rngs: nnx.Rngs, dtype=None,
               param_dtype=jnp.float32) -> nnx.LayerNorm:
    return nnx.LayerNorm(num_features, epsilon=eps, use_fast_variance=False, dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)


def embedding(num_embeddings: int, features: int, *, rngs: nnx.Rngs, dtype=None,
              param_dtype=jnp.float32) -> nnx.Embed:
    return nnx.Embed(num_embeddings, features, dtype=dtype, param_dtype=param_dtype,
                     embedding_metadata={"out_sharding": EMBED_AXES}, rngs=rngs)


# A remat setting: False (keep every activation), True (keep only the layer's inputs) or a
# ``jax.checkpoint_policies`` policy (keep what it names).
Remat = bool | Callable


def sequenced_checkpoint(fn: Callable) -> Callable:
    """``jax.checkpoint(fn)`` of ``fn(weights, *inputs)`` whose backward pass is pinned in order: it recomputes
    ``fn`` only once the cotangent of its output has arrived, and hands its input cotangent on only once all of
    its gradients, the weights' included, exist. Plain checkpointing leaves both free to move, and XLA:CPU's
    memory-optimized scheduler moved every weight gradient of the UNet to the end of the step, keeping the
    activations they read alive (docs/planner.md). The saved weights stay out of the tie, or the compiler would
    gather sharded weights early to meet it."""

    @jax.custom_vjp
    def call(weights, *inputs):
        return fn(weights, *inputs)

    def forward(weights, *inputs):
        return fn(weights, *inputs), (weights, inputs)

    def backward(saved, cotangent):
        weights, inputs = saved
        inputs, cotangent = jax.lax.optimization_barrier((inputs, cotangent))
        return jax.lax.optimization_barrier(jax.vjp(fn, weights, *inputs)[1](cotangent))

    call.defvjp(forward, backward)
    return call


def call_layer(layer: nnx.Module, remat: Remat, *args, **static):
    """Call ``layer``; with ``remat`` on, the backward pass recomputes it from its inputs instead of keeping its
    activations (diffusers checkpoints each resnet and transformer layer): ``True`` through
    :func:`sequenced_checkpoint`, a ``jax.checkpoint_policies`` policy through ``jax.checkpoint`` keeping what
    it names."""
    if not remat:
        return layer(*args, **static)
    graph, state = nnx.split(layer)

    def pure(state, *args):
        return nnx.merge(graph, state)(*args, **static)

    if remat is True:
        return sequenced_checkpoint(pure)(state, *args)
    return jax.checkpoint(pure, policy=remat)(state, *args)
