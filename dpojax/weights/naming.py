"""The one rule that maps NNX parameter paths to PyTorch state-dict keys and layouts.

Module attribute paths mirror the PyTorch names (see ``dpojax.models.layers``), so only the leaf name and
the array layout differ:

- ``kernel`` of rank 2 (in, out)  <->  ``weight`` (out, in)
- ``kernel`` of rank 4 (H, W, I, O) <-> ``weight`` (O, I, H, W)
- ``scale`` (norms) and ``embedding`` (embedding tables) <-> ``weight``
- everything else keeps its name and layout (``bias``, raw ``nnx.Param`` leaves such as CLIP's projection).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flax import nnx

_RENAMED_LEAVES = {"kernel": "weight", "scale": "weight", "embedding": "weight"}
# Axis permutation that turns the NNX layout into the PyTorch layout, by kernel rank.
_TO_TORCH_PERM = {2: (1, 0), 4: (3, 2, 0, 1)}


def torch_key(path: tuple) -> str:
    """State-dict key of the parameter at an NNX state path."""
    *parents, leaf = (str(p) for p in path)
    return ".".join([*parents, _RENAMED_LEAVES.get(leaf, leaf)])


def to_torch_perm(path: tuple, ndim: int) -> tuple[int, ...] | None:
    """Permutation from the NNX array to the PyTorch array, or None if the layouts agree."""
    return _TO_TORCH_PERM.get(ndim) if str(path[-1]) == "kernel" else None


def from_torch_perm(path: tuple, ndim: int) -> tuple[int, ...] | None:
    """Permutation from the PyTorch array to the NNX array, or None if the layouts agree."""
    perm = to_torch_perm(path, ndim)
    return None if perm is None else tuple(int(i) for i in np.argsort(perm))


def to_state_dict(module: nnx.Module) -> dict[str, np.ndarray]:
    """The module's parameters as a PyTorch-layout state dict of NumPy arrays."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        value = np.asarray(var.get_value())
        perm = to_torch_perm(path, value.ndim)
        out[torch_key(path)] = np.require(value.transpose(perm) if perm else value, requirements="C")
    return out


def check_state_dict(module: nnx.Module, shapes: Mapping[str, tuple], what: str) -> None:
    """Raise one ValueError listing missing, unexpected and mis-shaped tensors (PyTorch shapes)."""
    expected = {key: tuple(shape) for key, shape in to_state_dict_shapes(module).items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    misshaped = sorted(f"{k} {tuple(shapes[k])} != expected {expected[k]}"
                       for k in set(expected) & set(shapes) if tuple(shapes[k]) != expected[k])
    problems = [f"{name} ({len(items)}): {', '.join(items[:20])}{' ...' if len(items) > 20 else ''}"
                for name, items in (("missing", missing), ("unexpected", unexpected),
                                    ("wrong shape", misshaped)) if items]
    if problems:
        raise ValueError(f"{what}: weights do not match the model: " + "; ".join(problems))


def to_state_dict_shapes(module: nnx.Module) -> dict[str, tuple]:
    """PyTorch-layout shapes of every parameter (works on abstract modules from ``nnx.eval_shape``)."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        shape = tuple(var.get_value().shape)
        perm = to_torch_perm(path, len(shape))
        out[torch_key(path)] = tuple(shape[i] for i in perm) if perm else shape
    return out


def load_state_dict(module: nnx.Module, state_dict: Mapping[str, np.ndarray], what: str = "model") -> None:
    """Copy a PyTorch-layout state dict (NumPy arrays) into the module in place, strictly."""
    check_state_dict(module, {k: np.shape(v) for k, v in state_dict.items()}, what)
    state = nnx.state(module, nnx.Param)
    for path, var in nnx.to_flat_state(state):
        value = np.asarray(state_dict[torch_key(path)])
        perm = from_torch_perm(path, value.ndim)
        var.set_value(np.asarray(value.transpose(perm) if perm else value, dtype=var.get_value().dtype))
    nnx.update(module, state)
