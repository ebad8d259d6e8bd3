"""Shared helpers for parity tests against the PyTorch originals (imported by test modules, not a test)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from dpojax.schedule import NoiseSchedule
from dpojax.tiny import SCHEDULER
from dpojax.train.state import Components
from dpojax.weights import io, naming


def perturb_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Add seeded noise to every parameter so that no weight is at its init value (zeros, ones) and a
    parameter that is loaded into the wrong place, or ignored, changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            scale = p.std().item() if p.numel() > 1 and p.std().item() > 0 else 0.1
            p.add_(0.5 * scale * torch.randn(p.shape, generator=gen))
    return module


def numpy_state_dict(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def load_from_torch(cls: type, config: dict, torch_module: torch.nn.Module, **kwargs) -> nnx.Module:
    """``cls.from_config(config, **kwargs)`` built abstractly (not initialised), then given torch weights."""
    model = io.abstract_module(cls, config, **kwargs)
    naming.load_state_dict(model, numpy_state_dict(torch_module))
    return model


def grads_as_torch(grads: nnx.State) -> dict[str, np.ndarray]:
    """NNX gradient state in PyTorch keys and layouts (the same rule as the weights)."""
    out = {}
    for path, var in nnx.to_flat_state(grads):
        value = np.asarray(var.get_value())
        perm = naming.to_torch_perm(path, value.ndim)
        out[naming.torch_key(path)] = value.transpose(perm) if perm else value
    return out


def rel_err(actual, expected) -> float:
    expected = np.asarray(expected, dtype=np.float64)
    return float(np.linalg.norm(np.asarray(actual, dtype=np.float64) - expected) / np.linalg.norm(expected))


def unet_only_components(policy_graph, reference_graph) -> Components:
    """SDXL-shaped Components with the UNets and schedule only: the objectives need nothing else."""
    fields = {f.name: None for f in dataclasses.fields(Components)}
    return Components(**{**fields, "unet": policy_graph, "reference": reference_graph,
                         "schedule": NoiseSchedule.from_config(SCHEDULER), "compute_dtype": jnp.float32,
                         "is_sdxl": True})
