"""LoRA: rank-r adapters on chosen linear layers, with the parameter names of PEFT (``to_q.lora_A``).

A target layer ``y = W x + b`` becomes ``y = W x + b + (alpha / r) · B A x`` with ``A`` (in → r) drawn from
N(0, 1/r²) and ``B`` (r → out) zero, as the diffusers Diffusion-DPO and D3PO scripts initialise them, so a
fresh adapter leaves the model's output unchanged. The adapters are added to an already built model
(``add_lora``), so the model code knows nothing about them; the frozen base weights keep their paths, and a
parameter tree of the adapted model is the base tree plus ``lora_A``/``lora_B`` leaves (``split_adapters`` /
``with_adapters`` move between the two). Weight naming then exports them with the generic rule
(``dpojax.weights.naming``): ``...to_q.lora_A.weight`` of shape (r, in), exactly PEFT's keys.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from dpojax.models import layers

ADAPTERS = ("lora_A", "lora_B")  # attribute names of the two factors (PEFT's)


@dataclasses.dataclass(frozen=True)
class LoRASpec:
    """Rank, alpha and target layers; a target names a layer or a dotted path suffix (PEFT's matching)."""

    rank: int
    alpha: float
    targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def down_init(rank: int) -> nnx.Initializer:
    """Initialiser of the down projection A: N(0, 1/r²) (diffusers' ``init_lora_weights="gaussian"``)."""
    return nnx.initializers.normal(stddev=1.0 / rank)


class LoRALinear(layers.Linear):
    """``layers.Linear`` plus a low-rank update: ``Linear(x) + scale · lora_B(lora_A(x))``.

    The factors compute in the layer's dtype; their parameters have their own ``lora_param_dtype`` (fp32 master
    weights for a bf16 base). Their logical axes follow the base kernel's: A (in, None), B (None, out).
    """

    def __init__(self, in_features: int, out_features: int, *, rank: int, alpha: float, rngs: nnx.Rngs,
                 lora_param_dtype=jnp.float32, **linear_kwargs):
        in_axis, out_axis = layers.LINEAR_AXES
        super().__init__(in_features, out_features, rngs=rngs,
                         kernel_metadata={"out_sharding": layers.LINEAR_AXES}, **linear_kwargs)
        factor = dict(use_bias=False, dtype=self.dtype, param_dtype=lora_param_dtype, precision=self.precision,
                      rngs=rngs)
        self.lora_A = layers.Linear(in_features, rank, kernel_init=down_init(rank),
                                 kernel_metadata={"out_sharding": (in_axis, None)}, **factor)
        self.lora_B = layers.Linear(rank, out_features, kernel_init=nnx.initializers.zeros,
                                 kernel_metadata={"out_sharding": (None, out_axis)}, **factor)
        self.scale = alpha / rank

    def __call__(self, x: jax.Array) -> jax.Array:
        return super().__call__(x) + self.scale * self.lora_B(self.lora_A(x))


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def add_lora(module: nnx.Module, spec: LoRASpec, *, rngs: nnx.Rngs, lora_param_dtype=jnp.float32) -> nnx.Module:
    """Replace every ``layers.Linear`` whose dotted path matches a target by a ``LoRALinear``; returns ``module``.

    Call it inside ``nnx.eval_shape`` (the project builds models abstractly and loads weights afterwards):
    the replaced layers get fresh base variables of the same shapes and settings.
    """
    found = {target: [] for target in spec.targets}
    for path, child in nnx.iter_modules(module):
        name = ".".join(map(str, path))
        for target in spec.targets:
            if path and _matches(name, target):
                if type(child) is not layers.Linear:
                    raise ValueError(f"lora target {target!r} matches {name}, a {type(child).__name__}; "
                                     f"only linear layers take adapters")
                found[target].append(path)
    missing = [target for target, paths in found.items() if not paths]
    if missing:
        raise ValueError(f"lora target {missing[0]!r} matches no layer of {type(module).__name__}")
    for path in sorted({p for paths in found.values() for p in paths}):
        parent = module
        for part in path[:-1]:
            parent = parent[part] if isinstance(part, int) else getattr(parent, part)
        base = parent[path[-1]] if isinstance(path[-1], int) else getattr(parent, path[-1])
        adapted = LoRALinear(base.in_features, base.out_features, rank=spec.rank, alpha=spec.alpha, rngs=rngs,
                             lora_param_dtype=lora_param_dtype, use_bias=base.use_bias, dtype=base.dtype,
                             param_dtype=base.param_dtype, precision=base.precision)
        if isinstance(path[-1], int):
            parent[path[-1]] = adapted
        else:
            setattr(parent, path[-1], adapted)
    return module


# ---------------------------------------------------------------------------------- parameter trees (pure)


def split_adapters(tree: Mapping) -> tuple[dict, dict]:
    """(base tree, adapter tree) of a nested parameter dict of an adapted model."""
    base, adapters = {}, {}
    for key, value in tree.items():
        if key in ADAPTERS:
            adapters[key] = value
        elif isinstance(value, Mapping):
            sub_base, sub_adapters = split_adapters(value)
            if sub_base:
                base[key] = sub_base
            if sub_adapters:
                adapters[key] = sub_adapters
        else:
            base[key] = value
    return base, adapters


def with_adapters(base: Mapping, adapters: Mapping, _path: tuple = ()) -> dict:
    """The adapted model's tree: ``base`` with ``adapters`` added (the inverse of ``split_adapters``)."""
    out = dict(base)
    for key, value in adapters.items():
        if key in ADAPTERS:
            out[key] = value
        elif key in base:
            out[key] = with_adapters(base[key], value, (*_path, key))
        else:
            raise ValueError(f"LoRA adapters for {'.'.join(map(str, (*_path, key)))} have no layer to adapt")
    return out


def init_adapters(abstract: Mapping, rank: int, key: jax.Array) -> dict:
    """Fresh adapter values for an adapter tree of ``ShapeDtypeStruct``s: A from ``down_init``, B zero."""
    flat = nnx.traversals.flatten_mapping(abstract)
    values = {}
    for i, (path, leaf) in enumerate(sorted(flat.items(), key=lambda item: tuple(map(str, item[0])))):
        if path[-2] == "lora_A":
            values[path] = down_init(rank)(jax.random.fold_in(key, i), leaf.shape, leaf.dtype)
        else:
            values[path] = jnp.zeros(leaf.shape, leaf.dtype)
    return nnx.traversals.unflatten_mapping(values)


def merge_adapters(tree: Mapping, scale: float) -> dict:
    """The plain model's tree with every adapter folded in: ``kernel + scale · A_kernel @ B_kernel``.

    NNX kernels are (in, out), so A (in, r) @ B (r, out) has the kernel's layout. The sum is formed in fp32
    and stored in the kernel's dtype.
    """
    out = {}
    for key, value in tree.items():
        if key in ADAPTERS:
            continue
        out[key] = merge_adapters(value, scale) if isinstance(value, Mapping) else value
    if "lora_A" in tree:
        kernel = tree["kernel"]
        down, up = (jnp.asarray(tree[name]["kernel"], jnp.float32) for name in ADAPTERS)
        delta = jnp.matmul(down, up, precision=jax.lax.Precision.HIGHEST)
        if delta.shape != kernel.shape:
            raise ValueError(f"LoRA adapters of shape {down.shape} @ {up.shape} do not fit a kernel of shape "
                             f"{kernel.shape}")
        out["kernel"] = (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)
    return out
