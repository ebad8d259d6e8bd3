"""Run checkpoints with orbax: async, keep the last N, everything needed to continue a run exactly.

A checkpoint ``<output_dir>/checkpoints/<step>`` holds three items: ``params`` (the policy UNet, a nested
dict), ``train`` (optimizer state, step, raw PRNG key) and ``meta`` (JSON: step, the resolved config, the
data-iterator state). The frozen models are not saved: they are reloaded from ``model.pretrained``. Orbax
writes each step into a temporary folder and renames it when complete, so a run killed mid-save leaves the
previous checkpoints intact and the half-written one is ignored on restart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec

from dpojax.train.optim import opt_state_shardings
from dpojax.train.state import TrainState, shardings_of

ITEMS = ("params", "train", "meta")


def abstract_like(tree, shardings):
    """``ShapeDtypeStruct``s with the given shardings: the restore target for ``tree``."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class Checkpointer:
    """A thin wrapper over ``ocp.CheckpointManager`` for ``TrainState`` plus JSON metadata."""

    def __init__(self, directory: str | Path, *, keep: int, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state: TrainState, meta: dict[str, Any]) -> None:
        """Start saving ``state`` at its step (returns once the arrays are copied off the devices)."""
        step = int(jax.device_get(state.step))
        train = {"step": state.step, "opt_state": state.opt_state, "key": state.key}
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(state.params), train=ocp.args.StandardSave(train),
            meta=ocp.args.JsonSave({**meta, "step": step})), force=True)

    def restore(self, step: int, target: TrainState) -> tuple[TrainState, dict[str, Any]]:
        """Read checkpoint ``step`` onto the shardings of ``target`` (abstract or real arrays)."""
        train_target = {"step": target.step, "opt_state": target.opt_state, "key": target.key}
        restored = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(target.params), train=ocp.args.StandardRestore(train_target),
            meta=ocp.args.JsonRestore()))
        train = restored["train"]
        return TrainState(train["step"], restored["params"], train["opt_state"], train["key"]), restored["meta"]

    def restore_params(self, step: int, target) -> tuple[Any, dict[str, Any]]:
        """Only the policy parameters and the metadata (for export)."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        return restored["params"], restored["meta"]

    def restore_meta(self, step: int) -> dict[str, Any]:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def train_state_shardings(tx: optax.GradientTransformation, params, mesh: jax.sharding.Mesh) -> TrainState:
    """Shardings of the ``TrainState`` around ``params`` (placed on ``mesh``) for any objective."""
    replicated = NamedSharding(mesh, PartitionSpec())
    param_shardings = shardings_of(params)
    return TrainState(replicated, param_shardings, opt_state_shardings(tx, params, param_shardings, replicated),
                      replicated)


def start_state(checkpointer: Checkpointer, tx: optax.GradientTransformation, params, shardings: TrainState,
                seed: int) -> tuple[TrainState, dict[str, Any] | None]:
    """The run's starting point, for any objective: (state, checkpoint metadata or None).

    A fresh run starts from the pretrained ``params`` with a new optimizer state and the PRNG key of ``seed``.
    Otherwise the latest checkpoint is restored and ``params`` only gives shapes: pass
    ``abstract_like(params, shardings.params)`` then, so the pretrained weights are freed before the restore.
    """
    latest = checkpointer.latest_step()
    if latest is None:
        opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
        key = jax.random.key_data(jax.random.key(seed))
        return jax.device_put(TrainState(jnp.int32(0), params, opt_state, key), shardings), None
    target = abstract_like(TrainState(jax.ShapeDtypeStruct((), jnp.int32), params, jax.eval_shape(tx.init, params),
                                      jax.ShapeDtypeStruct((2,), jnp.uint32)), shardings)
    return checkpointer.restore(latest, target)
