"""grain input pipeline over the prepared Pick-a-Pic pairs: sharded per JAX process, seeded, resumable.

Batches are dicts of NumPy arrays, winner at index 0 and loser at index 1 of the pair axis:
``pixels`` (B, 2, H, W, 3) float32 in [-1, 1] (NHWC), ``captions`` (B,) str (empty after caption dropout),
``time_ids`` (B, 2, 6) float32 SDXL micro-conditioning (ignored by SD1.x/2.x). B is the per-process batch.
``iter(loader)`` gives a grain ``DataLoaderIterator``; its ``get_state()`` bytes go into the checkpoint and
``set_state(state)`` on a fresh iterator continues with exactly the batches that would have come next.
"""

from __future__ import annotations

from pathlib import Path

import grain
import tensorflow_datasets as tfds
from absl import flags

import dpojax.data.pickapic  # noqa: F401  (registers the pickapic_v2 builder that tfds.data_source looks up)
from dpojax.config import DataConfig
from dpojax.data.sharding import process_sampler
from dpojax.data.transforms import PreparePair


def open_pairs(data_dir: str | Path, dataset: str = "pickapic_v2/default", split: str = "train"):
    """The random-access source of stored pairs (raw records, before `PreparePair`)."""
    if not (Path(data_dir) / dataset.split(":")[0]).is_dir():  # a ":1.0.0" version suffix is allowed
        raise FileNotFoundError(f"no prepared dataset {dataset} in {data_dir} (run `dpojax data prepare`)")
    return tfds.data_source(dataset, split=split, data_dir=str(data_dir), download=False)


def make_pair_loader(data: DataConfig, *, batch_size: int, seed: int, num_epochs: int | None = None,
                     drop_remainder: bool = True, process: tuple[int, int] | None = None) -> grain.DataLoader:
    """The loader of ``data`` (the config's ``data`` section) in batches of ``batch_size`` pairs per process,
    repeating ``num_epochs`` times (None: forever); each JAX process (or ``process = (index, count)``) reads
    its rows of every global batch (``dpojax.data.sharding``)."""
    if data.data_dir is None:
        raise ValueError("config: data.data_dir must name the folder `dpojax data prepare` wrote, got null")
    source = open_pairs(data.data_dir, data.dataset, data.split)
    try:
        sampler = process_sampler(len(source), batch_size, shuffle=data.shuffle, num_epochs=num_epochs, seed=seed,
                                  drop_remainder=drop_remainder, process=process)
    except ValueError as err:
        raise ValueError(f"split '{data.split}' of {data.dataset} has {len(source)} pairs: {err}") from None
    prepare = PreparePair(resolution=data.resolution, random_crop=data.random_crop, flip=data.flip,
                          caption_dropout=data.caption_dropout, time_ids=data.time_ids)
    if data.worker_count and not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()  # grain workers read absl flags; outside an absl app nobody parsed them
    return grain.DataLoader(
        data_source=source, sampler=sampler, shard_options=grain.sharding.NoSharding(),
        operations=[prepare, grain.transforms.Batch(batch_size, drop_remainder=drop_remainder)],
        worker_count=data.worker_count, worker_buffer_size=1)
