"""Run checkpoints with orbax: async, keep the last N, everything needed to continue a run exactly.

A checkpoint ``<output_dir>/checkpoints/<step>`` holds ``params`` (the policy, a nested dict), ``train``
(optimizer state, step, raw PRNG key), ``meta`` (JSON: step, the resolved config, the data source's position)
and, when the data source has arrays that cannot be made again (D3PO's samples of an epoch in progress),
``data``. The frozen models are not saved: they are reloaded from ``model.pretrained``. Orbax writes each step
into a temporary folder and renames it when complete, so a run killed mid-save leaves the previous checkpoints
intact and the half-written one is ignored on restart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from dpojax.train.state import TrainState

ITEMS = ("params", "train", "meta", "data")


def abstract_like(tree, shardings):
    """``ShapeDtypeStruct``s with the given shardings: the restore target for ``tree``."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class Checkpointer:
    """A thin wrapper over ``ocp.CheckpointManager`` for ``TrainState``, JSON metadata and data arrays."""

    def __init__(self, directory: str | Path, *, keep: int, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state: TrainState, meta: dict[str, Any], data: dict[str, jax.Array] | None = None) -> None:
        """Start saving ``state`` at its step (returns once the arrays are copied off the devices)."""
        step = int(jax.device_get(state.step))
        train = {"step": state.step, "opt_state": state.opt_state, "key": state.key}
        items = dict(params=ocp.args.StandardSave(state.params), train=ocp.args.StandardSave(train),
                     meta=ocp.args.JsonSave({**meta, "step": step, "has_data": data is not None}))
        if data is not None:
            items["data"] = ocp.args.StandardSave(data)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, target: TrainState) -> tuple[TrainState, dict[str, Any]]:
        """Read checkpoint ``step`` onto the shardings of ``target`` (abstract or real arrays)."""
        train_target = {"step": target.step, "opt_state": target.opt_state, "key": target.key}
        restored = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(target.params), train=ocp.args.StandardRestore(train_target),
            meta=ocp.args.JsonRestore()))
        train = restored["train"]
        return TrainState(train["step"], restored["params"], train["opt_state"], train["key"]), restored["meta"]

    def restore_data(self, step: int, target: dict[str, jax.ShapeDtypeStruct]) -> dict[str, jax.Array]:
        """The data arrays saved with checkpoint ``step``, onto the shardings of ``target``."""
        return self.manager.restore(step, args=ocp.args.Composite(data=ocp.args.StandardRestore(target)))["data"]

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
