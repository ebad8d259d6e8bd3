"""The trained state of every objective: the policy's parameters, the optimizer state, the step and the key.

The frozen models (reference, VAE, text encoders; ``dpojax.components``) are not part of it: they are never
optimized nor checkpointed, and a resumed run reloads them from ``model.pretrained``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from dpojax.components import shardings_of
from dpojax.train.optim import opt_state_shardings


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything a checkpoint must hold to continue a run exactly (besides the data source's position)."""

    step: jax.Array  # () int32, optimizer steps taken
    params: Any  # policy UNet parameters (or LoRA adapters), nested dict
    opt_state: Any
    key: jax.Array  # (2,) uint32 raw PRNG key; per-step keys are folded in from the step number


def init_state(tx: optax.GradientTransformation, params, seed: int) -> TrainState:
    """A fresh run's state around the initial policy ``params`` (pure: jitted, or traced by ``eval_shape``)."""
    key = jax.random.key_data(jax.random.key(seed))
    return TrainState(jnp.int32(0), params, tx.init(params), key)


def state_shardings(tx: optax.GradientTransformation, params, mesh: jax.sharding.Mesh) -> TrainState:
    """Shardings of the ``TrainState`` around ``params`` (arrays or shape-only leaves on ``mesh``)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    param_shardings = shardings_of(params)
    return TrainState(replicated, param_shardings, opt_state_shardings(tx, params, param_shardings, replicated),
                      replicated)
