"""Model FLOPs counted from a program's jaxpr: 2 per multiply-add of every matrix product and convolution.

This is the count that MFU conventionally divides by the time: the model's arithmetic, not the hardware's
(elementwise work, remat's recomputation and the optimizer are left out). It is read from the traced program,
so it follows the architecture as built, on any device and without compiling.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import jax
import numpy as np


def matmul_flops(fn: Callable, *args) -> int:
    """FLOPs of the matrix products and convolutions ``fn(*args)`` performs (arrays or ShapeDtypeStructs)."""
    return _count(jax.make_jaxpr(fn)(*args).jaxpr)


def _count(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (contracting, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contracting)
        elif name == "conv_general_dilated":  # kernel dims (out, in per group, *spatial)
            kernel = eqn.invars[1].aval.shape
            per_output = math.prod(kernel[d] for d in eqn.params["dimension_numbers"].rhs_spec[1:])
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * per_output
        elif name == "while":
            if any(_count(j) for j in _inner_jaxprs(eqn.params)):
                raise ValueError("matmul_flops: a while loop does matrix products an unknown number of times")
        else:
            inner = [_count(j) for j in _inner_jaxprs(eqn.params)]
            if inner:  # a cond runs one branch; a scan runs its body `length` times
                total += (max(inner) if name == "cond" else sum(inner)) * eqn.params.get("length", 1)
    return total


def _inner_jaxprs(params: dict) -> Iterator:
    for value in params.values():
        for item in value if isinstance(value, tuple | list) else (value,):
            if hasattr(item, "eqns"):
                yield item
            elif hasattr(getattr(item, "jaxpr", None), "eqns"):
                yield item.jaxpr


def unet_forward_flops(graph, params, *, latent: tuple[int, int, int], hidden: tuple[int, int],
                       added: dict[str, tuple[int, ...]] | None = None) -> int:
    """Matmul FLOPs of one UNet forward on one image: ``latent`` (C, h, w), text ``hidden`` (tokens, width),
    SDXL's ``added`` conditioning shapes per image (None for SD1.x/2.x)."""
    from flax import nnx

    def forward(params, sample, timesteps, hidden_states, added_cond):
        return nnx.merge(graph, params)(sample, timesteps, hidden_states, added_cond_kwargs=added_cond)

    def shaped(shape, dtype=np.float32):
        return jax.ShapeDtypeStruct(shape, dtype)

    abstract = jax.tree.map(lambda x: shaped(x.shape, x.dtype), params)
    added_cond = None if added is None else {k: shaped((1, *v)) for k, v in added.items()}
    return matmul_flops(forward, abstract, shaped((1, *latent)), shaped((1,), np.int32), shaped((1, *hidden)),
                        added_cond)
