"""Which records each JAX process reads, so that the global batch does not depend on the number of processes.

Every process walks the same global, seeded record order; global batch ``b`` is positions ``[b*G, (b+1)*G)``
of it, and process ``p`` of ``P`` reads the ``p``-th slice of ``G/P`` consecutive positions, which become its
rows of the global batch (``jax.make_array_from_process_local_data`` puts them at the same place). So one
process with 8 devices and two processes with 4 each train on identical batches, with identical per-record
random augmentation (grain seeds it by the global position), and every process consumes the same number of
local positions: their iterator states are equal, and process 0's one is the checkpoint's.
(grain's ``ShardByJaxProcess`` instead gives each process a contiguous part of the dataset, shuffled on its
own: the batches then change with the process count.)
"""

from __future__ import annotations

import sys

import grain
import jax


class ProcessSlices:
    """A grain sampler: local position ``k`` of process ``p`` -> global position ``b*G + p*L + k % L``
    (``b = k // L``, ``L`` local and ``G = P*L`` global batch size) of an unsharded ``IndexSampler``.

    With several processes only complete global batches are read (a finite sampler's remainder is dropped),
    so no process waits on a batch the others do not have.
    """

    def __init__(self, sampler: grain.samplers.IndexSampler, local_batch: int, process_index: int,
                 process_count: int):
        if not 0 <= process_index < process_count:
            raise ValueError(f"process index {process_index} is not in [0, {process_count})")
        self.sampler, self.local_batch = sampler, local_batch
        self.process_index, self.process_count = process_index, process_count

    def _global_position(self, position: int) -> int:
        batch, row = divmod(position, self.local_batch)
        return (batch * self.process_count + self.process_index) * self.local_batch + row

    def __len__(self) -> int:
        total = len(self.sampler)
        if self.process_count == 1 or total == sys.maxsize:
            return total
        return total // (self.local_batch * self.process_count) * self.local_batch

    def __getitem__(self, position: int):
        if position < 0 or position >= len(self):
            raise IndexError(f"position {position} is past the last complete global batch ({len(self)})")
        metadata = self.sampler[self._global_position(position)]
        return grain.RecordMetadata(index=position, record_key=metadata.record_key, rng=metadata.rng)

    def __repr__(self) -> str:
        # Without the process index: grain checks a restored iterator state against this text, and all
        # processes share process 0's state.
        return f"ProcessSlices({self.sampler!r}, local_batch={self.local_batch}, processes={self.process_count})"


def process_sampler(num_records: int, local_batch: int, *, shuffle: bool, num_epochs: int | None, seed: int,
                    drop_remainder: bool = True, process: tuple[int, int] | None = None) -> ProcessSlices:
    """The sampler of process ``process = (index, count)`` (default: this JAX process) over ``num_records``
    records (see the module docstring); with ``drop_remainder`` one global batch must fit in the records."""
    index, count = process or (jax.process_index(), jax.process_count())
    if drop_remainder and num_records < local_batch * count:
        raise ValueError(f"too few for {count} process(es) x batch_size {local_batch}")
    sampler = grain.samplers.IndexSampler(num_records=num_records, shuffle=shuffle, num_epochs=num_epochs,
                                          seed=seed)
    return ProcessSlices(sampler, local_batch, index, count)
