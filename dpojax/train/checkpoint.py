"""Run checkpoints with orbax: async, keep the last N, everything needed to continue a run exactly.

A checkpoint ``<output_dir>/checkpoints/<step>`` holds ``params`` (the policy, a nested dict), ``train``
(optimizer state, step, raw PRNG key), ``meta`` (JSON: step, the resolved config, the data source's position)
and, when the data source has arrays that cannot be made again (D3PO's samples of an epoch in progress),
``data``. The frozen models are not saved: they are reloaded from ``model.pretrained``. Orbax writes each step
into a temporary folder and renames it when complete, so a run killed mid-save leaves the previous checkpoints
intact and the half-written one is ignored on restart.

A run that evaluates (``train.eval_every``) also keeps the checkpoint of its best median score, whatever its
age; ``best.json`` in the checkpoints folder names it (orbax does not read its own save metrics back on
restart, so the run keeps this record itself). A better score names its checkpoint only once that checkpoint is
committed, and the previous best is kept until then: a run killed during the save still has a best on disk.
A NaN score is never the best.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy

from dpojax.train.state import TrainState
from dpojax.weights.atomic import atomic_file

ARRAY_ITEMS = ("params", "train", "data")  # and "meta", JSON

# Orbax splits each shard among its data-parallel replicas so that they write in parallel, which costs one
# dispatched slice per array and replica on every save: seconds per save for a UNet's thousands of small
# arrays. Only shards that are large enough for the shared write to pay are split.
REPLICA_PARALLEL_MIN_BYTES = 16 << 20


def _array_handlers() -> ocp.type_handlers.TypeHandlerRegistry:
    """Orbax's standard type handlers, with replica-parallel writes for large shards only."""
    standard = [(kind, ocp.type_handlers.get_type_handler(kind)) for kind in ocp.type_handlers.supported_types()]
    arrays = ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_BYTES)
    return ocp.type_handlers.create_type_handler_registry(*standard, (jax.Array, arrays))


def _restore_args(target) -> ocp.args.PyTreeRestore:
    return ocp.args.PyTreeRestore(target, restore_args=ocp.checkpoint_utils.construct_restore_args(target))


def abstract_like(tree, shardings):
    """``ShapeDtypeStruct``s with the given shardings: the restore target for ``tree``."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class KeepSteps:
    """An orbax preservation policy: keep the checkpoints of ``steps``."""

    def __init__(self, steps: set[int]):
        self.steps = steps

    def should_preserve(self, checkpoints: Sequence, *, context) -> list[bool]:
        return [checkpoint.step in self.steps for checkpoint in checkpoints]


class Checkpointer:
    """A thin wrapper over ``ocp.CheckpointManager`` for ``TrainState``, JSON metadata and data arrays: keeps the
    last ``keep`` checkpoints and the best scored one (``record_score``)."""

    def __init__(self, directory: str | Path, *, keep: int, async_save: bool = True):
        self.directory = Path(directory).absolute()
        self.best = self._read_best()
        self._candidate: dict[str, Any] | None = None  # a better score whose checkpoint is not yet committed
        self._last_saved: int | None = None  # the step of the latest save started
        self._keep_best = KeepSteps({self.best["step"]} if self.best else set())
        policy = preservation_policy.AnyPreservationPolicy([preservation_policy.LatestN(keep), self._keep_best])
        options = ocp.CheckpointManagerOptions(preservation_policy=policy, create=True,
                                               enable_async_checkpointing=async_save)
        registry = _array_handlers()
        handlers = {name: ocp.PyTreeCheckpointHandler(type_handler_registry=registry) for name in ARRAY_ITEMS}
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_handlers={**handlers, "meta": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def _read_best(self) -> dict[str, Any] | None:
        path = self.directory / "best.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def record_score(self, step: int, score: float) -> None:
        """The evaluation score of the checkpoint about to be saved at ``step``. A better finite score makes it
        the candidate: kept from then on beside the current best, and named best once it is committed."""
        if not math.isfinite(score):
            return
        self.wait()  # a candidate whose save is in flight is the best to beat once it is committed
        if self.best is not None and self.best["step"] < step and score <= self.best["score"]:
            return
        self._candidate = {"step": step, "score": score}
        self._keep_best.steps = {step, *([self.best["step"]] if self.best else [])}

    def _promote(self) -> None:
        """After a wait for the saves in flight: once the candidate's checkpoint is committed, ``best.json`` names
        it and the previous best is released (removed at the next save's clean-up unless it is recent)."""
        if self._candidate is None or self._candidate["step"] != self._last_saved:
            return
        self.best, self._candidate = self._candidate, None
        self._keep_best.steps = {self.best["step"]}
        if jax.process_index() == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            with atomic_file(self.directory / "best.json") as f:
                f.write(json.dumps(self.best) + "\n")

    def best_step(self) -> int:
        """The step of the best scored checkpoint; a one-line error when there is none."""
        if self.best is None or self.best["step"] not in self.manager.all_steps():
            raise FileNotFoundError(f"{self.directory} has no scored checkpoint (a run keeps one when it "
                                    f"evaluates: train.eval_every, train.eval_scorer)")
        return self.best["step"]

    def save(self, state: TrainState, meta: dict[str, Any], data: dict[str, jax.Array] | None = None) -> None:
        """Start saving ``state`` at its step (returns once the arrays are copied off the devices)."""
        step = int(jax.device_get(state.step))
        train = {"step": state.step, "opt_state": state.opt_state, "key": state.key}
        items = dict(params=ocp.args.PyTreeSave(state.params), train=ocp.args.PyTreeSave(train),
                     meta=ocp.args.JsonSave({**meta, "step": step, "has_data": data is not None}))
        if data is not None:
            items["data"] = ocp.args.PyTreeSave(data)
        self.wait()  # orbax would wait for the save in flight too; this also promotes a committed best
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        self._last_saved = step

    def restore(self, step: int, target: TrainState) -> tuple[TrainState, dict[str, Any]]:
        """Read checkpoint ``step`` onto the shardings of ``target`` (abstract or real arrays)."""
        train_target = {"step": target.step, "opt_state": target.opt_state, "key": target.key}
        restored = self.manager.restore(step, args=ocp.args.Composite(
            params=_restore_args(target.params), train=_restore_args(train_target),
            meta=ocp.args.JsonRestore()))
        train = restored["train"]
        return TrainState(train["step"], restored["params"], train["opt_state"], train["key"]), restored["meta"]

    def restore_data(self, step: int, target: dict[str, jax.ShapeDtypeStruct]) -> dict[str, jax.Array]:
        """The data arrays saved with checkpoint ``step``, onto the shardings of ``target``."""
        return self.manager.restore(step, args=ocp.args.Composite(data=_restore_args(target)))["data"]

    def restore_params(self, step: int, target) -> tuple[Any, dict[str, Any]]:
        """Only the policy parameters and the metadata (for export)."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            params=_restore_args(target), meta=ocp.args.JsonRestore()))
        return restored["params"], restored["meta"]

    def restore_meta(self, step: int) -> dict[str, Any]:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def wait(self) -> None:
        """Until every save in flight is committed."""
        self.manager.wait_until_finished()
        self._promote()

    def close(self) -> None:
        self.manager.close()
