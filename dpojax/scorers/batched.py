"""The loop the model-based scorers share: a jitted score function over fixed-size batches of host rows,
optionally with the rows of each batch split over a mesh."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dpojax import parallel


class BatchedScores:
    """``batched(arrays)`` -> float32 scores: ``score(model, batch)`` under jit, one compilation per input shape,
    over ``batch_size``-row batches of ``arrays`` (the last padded, its padding rows dropped from the result).

    With a ``mesh``, each batch's rows are split over its batch axes ("data", "fsdp") and the weights replicated;
    every process then calls with its own rows, the same number of them (as the D3PO sampler does). ``what``
    names the scorer in errors.
    """

    def __init__(self, model: nnx.Module, score: Callable[[nnx.Module, dict[str, jax.Array]], jax.Array],
                 batch_size: int, mesh: Mesh | None, what: str):
        if int(batch_size) < 1:
            raise ValueError(f"{what}: batch_size must be >= 1, got {batch_size}")
        shards = 1 if mesh is None else max(1, parallel.batch_devices(mesh) // jax.process_count())
        self.batch_size = -(-int(batch_size) // shards) * shards  # rounded up: every device gets equal rows
        self.mesh = mesh
        graph, state = nnx.split(model)
        # On the device once: weights loaded into host arrays would otherwise be copied there on every call.
        self._state = jax.device_put(state, None if mesh is None else NamedSharding(mesh, PartitionSpec()))
        self._score = jax.jit(lambda state, batch: score(nnx.merge(graph, state), batch))

    def __call__(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        out = []
        for batch, count in fixed_size_batches(arrays, self.batch_size):
            if self.mesh is None:
                scores = np.asarray(self._score(self._state, batch))
            else:
                scores = parallel.local_rows(self._score(self._state, parallel.global_batch(batch, self.mesh)),
                                             self.mesh)
            out.append(scores[:count])
        return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)


def fixed_size_batches(arrays: dict[str, np.ndarray], size: int) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """Consecutive ``size``-row batches of every array, the last padded with copies of its last row, so a jitted
    scorer compiles one shape: (batch, how many of its rows are real)."""
    total = len(next(iter(arrays.values())))
    for start in range(0, total, size):
        rows = {k: v[start:start + size] for k, v in arrays.items()}
        count = min(size, total - start)
        yield {k: np.concatenate([v, np.repeat(v[-1:], size - count, axis=0)]) for k, v in rows.items()}, count
