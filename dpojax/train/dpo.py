"""The offline Diffusion-DPO training loop: resume, step, log, checkpoint, stop cleanly, export.

``train(config)`` continues from the latest checkpoint in ``<train.output_dir>/checkpoints`` when there is
one (same parameters, optimizer state, step, PRNG key and data position, so the result is the one an
uninterrupted run would give), saves every ``train.checkpoint_every`` optimizer steps and when SIGTERM or
SIGINT arrives (preemption), stops with one line at the first non-finite loss without writing a checkpoint
of the bad state, and at the end writes the final model to ``<output_dir>/final``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from dpojax import parallel
from dpojax.config import Config
from dpojax.distributed import any_process, is_primary
from dpojax.train.checkpoint import Checkpointer, abstract_like, start_state, train_state_shardings
from dpojax.train.export import write_policy
from dpojax.train.metrics import MetricsLog, mean_metrics
from dpojax.train.optim import make_optimizer
from dpojax.train.samples import write_sample_grid
from dpojax.train.state import TrainState, load_components, policy_unet_params, shardings_of
from dpojax.train.step import device_batch, host_batch, make_step_functions


class NonFiniteLoss(ValueError):
    """Training hit a NaN/inf loss; the message names the step and the last good checkpoint."""


@dataclasses.dataclass(frozen=True)
class TrainResult:
    step: int  # optimizer steps completed
    run_dir: Path
    interrupted_by: str | None = None  # signal name when stopped by SIGTERM/SIGINT
    final: Path | None = None  # exported model folder


class StopRequest:
    """Turns SIGTERM/SIGINT into a flag the loop checks between optimizer steps (checkpoint, then exit)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal_name: str | None = None

    def _handle(self, signum, frame):
        self.signal_name = signal.Signals(signum).name

    def agreed(self) -> bool:
        """Whether to stop now, the same answer on every process: a signal that reached one host stops all
        of them after the same step (the others record it as SIGTERM)."""
        if any_process(self.signal_name is not None) and self.signal_name is None:
            self.signal_name = signal.SIGTERM.name
        return self.signal_name is not None

    @contextlib.contextmanager
    def installed(self):
        previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def check_finite(loss: float, step: int, checkpointer: Checkpointer) -> None:
    """Stop at a NaN/inf loss, naming the step and the last good checkpoint (the bad state is never saved)."""
    if math.isfinite(loss):
        return
    checkpointer.wait()
    last = checkpointer.latest_step()
    kept = f"last good checkpoint: {checkpointer.directory / str(last)}" if last is not None else \
        "no checkpoint was written"
    raise NonFiniteLoss(f"non-finite loss ({loss}) at step {step}; training stopped, {kept}")


def export_final(config: Config, components, params, run_dir: Path, log: MetricsLog) -> Path | None:
    """Write the trained UNet to ``<run_dir>/final`` as ``train.export`` says (None when "none")."""
    if config.train.export == "none":
        return None
    final = write_policy(components.unet, params, run_dir / "final", config.train.export, config)
    log.print(f"exported the final {config.train.export} to {final}")
    return final


def make_loader(config: Config, pairs_per_process: int):
    from dpojax.data.pipeline import PairLoaderConfig, make_pair_loader

    data = config.data
    if data.cache_dir is not None:
        from dpojax.data.cache import make_cached_loader

        return make_cached_loader(config, pairs_per_process)
    if data.data_dir is None:
        raise ValueError("config: data.data_dir must name the folder `dpojax data prepare` wrote, got null")
    return make_pair_loader(PairLoaderConfig(
        data_dir=data.data_dir, dataset=data.dataset, split=data.split, batch_size=pairs_per_process,
        resolution=data.resolution, seed=config.train.seed, shuffle=data.shuffle, random_crop=data.random_crop,
        flip=data.flip, caption_dropout=data.caption_dropout, time_ids=data.time_ids,
        worker_count=data.worker_count))


def train(config: Config, *, out=None) -> TrainResult:
    """Run (or continue) the training run described by ``config``."""
    out = out or sys.stdout
    run_dir = Path(config.train.output_dir).absolute()
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
    pairs_per_micro_batch = config.train.pairs_per_device * batch_devices
    if pairs_per_micro_batch % jax.process_count():
        raise ValueError(f"{pairs_per_micro_batch} pairs per micro-batch do not split over "
                         f"{jax.process_count()} processes")
    components, params, frozen = load_components(config, mesh)
    tx, lr_schedule = make_optimizer(config.optim, config.learning_rate(batch_devices))
    checkpointer = Checkpointer(run_dir / "checkpoints", keep=config.train.keep_checkpoints)
    loader_iter = iter(make_loader(config, pairs_per_micro_batch // jax.process_count()))
    state_shardings = train_state_shardings(tx, params, mesh)
    if checkpointer.latest_step() is not None:  # free the pretrained weights before restoring
        params = abstract_like(params, state_shardings.params)
    state, meta = start_state(checkpointer, tx, params, state_shardings, config.train.seed)
    del params
    if meta is not None:
        loader_iter.set_state(meta["data_state"].encode())
        if is_primary():
            print(f"resumed from {checkpointer.directory / str(meta['step'])} (step {meta['step']})", file=out,
                  flush=True)
    step_fns = make_step_functions(components, config, tx, lr_schedule, mesh, state_shardings,
                                   shardings_of(frozen), parallel.batch_sharding(mesh))
    start = int(jax.device_get(state.step))
    log = MetricsLog(run_dir, config.logging, total_steps=config.train.steps, resume_step=start,
                     run_config=config.to_dict(), out=out)
    meta_base = {"config": config.to_dict(), "unet_config": components.unet_config}

    def save(state: TrainState) -> None:
        checkpointer.save(state, {**meta_base, "data_state": loader_iter.get_state().decode()})

    def sample(state: TrainState, step: int) -> None:
        unet = nnx.merge(components.unet, policy_unet_params(components, state.params, frozen))
        path = write_sample_grid(config, components, unet, frozen, step, run_dir)
        if path is not None:
            log.print(f"wrote the sample grid {path}")

    stop = StopRequest()
    try:
        with stop.installed():
            state = _run_steps(config, components, step_fns, state, frozen, loader_iter, log, save, sample, stop,
                               checkpointer, start, pairs_per_micro_batch * config.optim.grad_accum,
                               parallel.batch_sharding(mesh))
            step = int(jax.device_get(state.step))
            if stop.signal_name is not None:
                checkpointer.wait()
                log.print(f"stopped by {stop.signal_name} at step {step}; checkpoint saved in "
                          f"{checkpointer.directory / str(step)}")
                return TrainResult(step, run_dir, interrupted_by=stop.signal_name)
        checkpointer.wait()
        return TrainResult(step, run_dir, final=export_final(config, components, state.params, run_dir, log))
    finally:
        checkpointer.wait()
        checkpointer.close()
        log.close()


def _run_steps(config, components, step_fns, state, frozen, loader_iter, log, save, sample, stop, checkpointer,
               start, pairs_per_step, batch_sharding) -> TrainState:
    total, grad_accum, sample_every = config.train.steps, config.optim.grad_accum, config.train.sample_every
    if sample_every and start == 0:
        sample(state, 0)  # the starting point: the reference model's images
    accum = step_fns.zeros_accum(state.params) if step_fns.zeros_accum else None
    window_start, window_steps = None, 0
    for step in range(start, total):
        micro_metrics = []
        for micro in range(grad_accum):
            batch = device_batch(host_batch(components, next(loader_iter)), batch_sharding)
            micro_index = jnp.int32(micro)
            if micro < grad_accum - 1:
                accum, metrics = step_fns.accumulate(state, accum, frozen, batch, micro_index)
            else:
                state, accum, metrics = step_fns.update(state, accum, frozen, batch, micro_index)
            micro_metrics.append(metrics)
        metrics = mean_metrics(jax.device_get(micro_metrics))
        done = step + 1
        check_finite(metrics["loss"], done, checkpointer)
        now = time.perf_counter()
        if window_start is None:  # the first step includes compilation: measure from its end
            window_start, speed = now, None
        else:
            window_steps += 1
            speed = pairs_per_step * window_steps / (now - window_start)
        show = done % config.train.log_every == 0 or done == total or done == start + 1
        log.write(done, metrics, pairs_per_second=speed, show=show)
        every = config.train.checkpoint_every
        stopping = stop.agreed()
        if (every and done % every == 0) or done == total or stopping:
            save(state)
        if sample_every and done % sample_every == 0:
            sample(state, done)
        if stopping:
            break
    return state
