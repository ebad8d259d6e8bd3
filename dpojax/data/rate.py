"""The training input pipeline's own rate: pairs per second from the loader alone, with no step consuming them,
so ``dpojax bench --loader N`` can say whether the loader keeps the step fed."""

from __future__ import annotations

import dataclasses
import time

from dpojax.config import Config


@dataclasses.dataclass(frozen=True)
class LoaderRate:
    source: str  # what was read, in words
    pairs_per_batch: int  # this process's pairs per batch
    batches: int
    seconds: float

    @property
    def pairs_per_second(self) -> float:
        return self.pairs_per_batch * self.batches / self.seconds


def describe_source(config: Config) -> str:
    data = config.data
    if data.cache_dir is not None:
        return f"latent cache {data.cache_dir}"
    crop = "random" if data.random_crop else "centre"
    return (f"{data.data_dir}: JPEG decode, resize and {crop} crop to {data.resolution} px, flip {data.flip}, "
            f"{data.worker_count} grain workers")


def measure_loader(config: Config, per_process: int, batches: int, warmup: int = 2) -> LoaderRate:
    """Time ``batches`` batches of ``per_process`` pairs from the loader ``dpojax train`` would read for
    ``config`` (the latent cache when ``data.cache_dir`` is set, else the prepared pairs), after ``warmup``
    untimed ones (worker start-up)."""
    from dpojax.train.dpo import make_loader

    iterator = iter(make_loader(config, per_process))
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return LoaderRate(describe_source(config), per_process, batches, time.perf_counter() - start)
