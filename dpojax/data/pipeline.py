"""grain input pipeline over the prepared Pick-a-Pic pairs: sharded per JAX process, seeded, resumable.

Batches are dicts of NumPy arrays, winner at index 0 and loser at index 1 of the pair axis:
``pixels`` (B, 2, H, W, 3) float32 in [-1, 1] (NHWC), ``captions`` (B,) str (empty after caption dropout),
``time_ids`` (B, 2, 6) float32 SDXL micro-conditioning (ignored by SD1.x/2.x). B is the per-process batch.
``iter(loader)`` gives a grain ``DataLoaderIterator``; its ``get_state()`` bytes go into the checkpoint and
``set_state(state)`` on a fresh iterator continues with exactly the batches that would have come next.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import grain
import tensorflow_datasets as tfds
from absl import flags

import dpojax.data.pickapic  # noqa: F401  (registers the pickapic_v2 builder that tfds.data_source looks up)
from dpojax.data.sharding import process_sampler
from dpojax.data.transforms import FLIP_MODES, TIME_ID_MODES, PreparePair


@dataclasses.dataclass(frozen=True)
class PairLoaderConfig:
    """Input pipeline settings; the defaults are the official Diffusion-DPO code's."""

    data_dir: str
    dataset: str = "pickapic_v2/default"  # "<builder>/<config>", as printed by `dpojax data prepare`
    split: str = "train"
    batch_size: int = 8  # pairs per process per step
    resolution: int = 512
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None  # None repeats forever
    drop_remainder: bool = True
    random_crop: bool = False
    flip: str = "per_image"  # official: each image flipped on its own; "joint": diffusers SDXL; "none"
    caption_dropout: float = 0.2  # probability that a pair's caption becomes ""
    time_ids: str = "constant"  # official [res, res, 0, 0, res, res]; "original": real size and crop
    worker_count: int = 0  # grain worker processes; 0 decodes in the calling process
    worker_buffer_size: int = 1

    def __post_init__(self):
        choices = {"flip": FLIP_MODES, "time_ids": TIME_ID_MODES}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"data.{key}={getattr(self, key)!r} is not one of {', '.join(allowed)}")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"data.caption_dropout={self.caption_dropout} must be in [0, 1]")
        for key in ("batch_size", "resolution"):
            if getattr(self, key) < 1:
                raise ValueError(f"data.{key}={getattr(self, key)} must be positive")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"data.num_epochs={self.num_epochs} must be positive or None (forever)")
        if self.worker_count < 0:
            raise ValueError(f"data.worker_count={self.worker_count} must be >= 0")


def open_pairs(data_dir: str | Path, dataset: str = "pickapic_v2/default", split: str = "train"):
    """The random-access source of stored pairs (raw records, before `PreparePair`)."""
    if not (Path(data_dir) / dataset.split(":")[0]).is_dir():  # a ":1.0.0" version suffix is allowed
        raise FileNotFoundError(f"no prepared dataset {dataset} in {data_dir} (run `dpojax data prepare`)")
    return tfds.data_source(dataset, split=split, data_dir=str(data_dir), download=False)


def make_pair_loader(config: PairLoaderConfig, *, process: tuple[int, int] | None = None) -> grain.DataLoader:
    """The DataLoader for ``config``; each JAX process (or ``process = (index, count)``) reads its rows of
    every global batch (``dpojax.data.sharding``)."""
    source = open_pairs(config.data_dir, config.dataset, config.split)
    try:
        sampler = process_sampler(len(source), config.batch_size, shuffle=config.shuffle,
                                  num_epochs=config.num_epochs, seed=config.seed,
                                  drop_remainder=config.drop_remainder, process=process)
    except ValueError as err:
        raise ValueError(f"split '{config.split}' of {config.dataset} has {len(source)} pairs: {err}") from None
    prepare = PreparePair(resolution=config.resolution, random_crop=config.random_crop, flip=config.flip,
                          caption_dropout=config.caption_dropout, time_ids=config.time_ids)
    if config.worker_count and not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()  # grain workers read absl flags; outside an absl app nobody parsed them
    return grain.DataLoader(
        data_source=source, sampler=sampler, shard_options=grain.sharding.NoSharding(),
        operations=[prepare, grain.transforms.Batch(config.batch_size, drop_remainder=config.drop_remainder)],
        worker_count=config.worker_count, worker_buffer_size=config.worker_buffer_size)
