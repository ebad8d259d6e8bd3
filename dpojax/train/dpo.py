"""Offline preference training (``objective: dpo``): Diffusion-DPO, its loss variants and SFT.

What this objective owns: its data (the pairs `dpojax data prepare` wrote, or the latent cache of
`dpojax data encode`, through a grain iterator whose state is the checkpoint's data position) and its step
(``dpojax.train.dpo_step``: one micro-batch's loss and gradient, ``dpo.grad_accum`` micro-batches per optimizer
step). The setup, checkpoints, resume, stop on SIGTERM/SIGINT, finite-loss check, logs, sample grids and
export are the harness's (``dpojax.train.harness``). A resumed run gives the result an uninterrupted run
would: same parameters, optimizer state, step, PRNG key and data position.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dpojax import parallel
from dpojax.config import Config
from dpojax.train.dpo_step import StepFunctions, host_batch, make_step_functions
from dpojax.train.harness import Program, Run, Setup, TrainResult, itstime
from dpojax.train.metrics import mean_metrics


def make_loader(config: Config, pairs_per_process: int):
    """The training pairs: the latent cache when ``data.cache_dir`` is set, else the prepared dataset."""
    from dpojax.data.pipeline import make_pair_loader

    if config.data.cache_dir is not None:
        from dpojax.data.cache import make_cached_loader

        return make_cached_loader(config, pairs_per_process)
    return make_pair_loader(config.data, batch_size=pairs_per_process, seed=config.train.seed)


class PairData:
    """This process's rows of every micro-batch, from the run's data position on."""

    def __init__(self, run: Run):
        self.components, self.mesh = run.components, run.mesh
        per_process = run.config.dpo.pairs_per_device * run.setup.local_batch_devices
        self.iterator = iter(make_loader(run.config, per_process))
        if run.resumed is not None:
            self.iterator.set_state(run.resumed["data_position"]["iterator"].encode())

    def next_batch(self) -> dict[str, jax.Array]:
        return parallel.global_batch(host_batch(self.components, next(self.iterator)), self.mesh)

    def position(self) -> dict:
        return {"iterator": self.iterator.get_state().decode()}

    def arrays(self) -> None:
        return None  # the iterator state says it all


def batch_shapes(setup: Setup) -> dict[str, tuple[tuple[int, ...], object]]:
    """``{name: (shape, dtype)}`` of one global micro-batch as ``host_batch`` gives it: pixels and token ids,
    or the latent/text-embedding cache's arrays when ``data.cache_dir`` is set."""
    config, components = setup.config, setup.components
    pairs, res = config.dpo.pairs_per_device * setup.batch_devices, config.data.resolution
    text = components.folder.component_config("text_encoder")
    tokens = text.get("max_position_embeddings", 77)
    shapes: dict[str, tuple[tuple[int, ...], object]] = {}
    if config.data.cache_dir is not None:
        side = res // components.vae_scale_factor
        latent = ((pairs, 2, components.latent_channels, side, side), jnp.float32)
        hidden = text["hidden_size"]
        if components.is_sdxl:
            text_2 = components.folder.component_config("text_encoder_2")
            hidden += text_2["hidden_size"]
            shapes["pooled"] = ((pairs, text_2["projection_dim"]), jnp.float32)
        shapes.update(latent_mean=latent, latent_logvar=latent, hidden=((pairs, tokens, hidden), jnp.float32))
    else:
        shapes["pixels"] = ((pairs, 2, res, res, 3), jnp.float32)
        shapes["input_ids"] = ((pairs, tokens), jnp.int32)
        if components.is_sdxl:
            shapes["input_ids_2"] = ((pairs, tokens), jnp.int32)
    if components.is_sdxl:
        shapes["time_ids"] = ((pairs, 2, 6), jnp.float32)
    return shapes


def programs(setup: Setup, fns: StepFunctions) -> dict[str, Program]:
    """The step's programs (``update``, and ``accumulate`` with gradient accumulation) and their arguments."""
    state = setup.abstract_state()
    accum = None if fns.accumulate is None else jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32, sharding=x.sharding), state.params)
    args = (state, accum, setup.abstract_frozen(), setup.batch_spec(batch_shapes(setup)),
            setup.replicated_spec((), jnp.int32))  # the last: the micro-batch's index within the step
    roles = ("state", "accumulator", "frozen", "batch", "scalar")
    out = {"update": Program("update", fns.update, args, roles)}
    if fns.accumulate is not None:
        out["accumulate"] = Program("accumulate", fns.accumulate, args, roles)
    return out


def update_program(setup: Setup) -> Program:
    """The program that makes one optimizer step (what ``dpojax plan`` compiles)."""
    return programs(setup, make_step_functions(setup))["update"]


def train(config: Config, *, out=None) -> TrainResult:
    """Run (or continue) the offline training run described by ``config``."""
    dpo = config.dpo
    with Run(config, total_steps=dpo.steps, out=out) as run:  # mesh → load → state
        data = PairData(run)  # data, at the checkpoint's position
        fns = make_step_functions(run.setup)  # compile
        compiled = {name: run.compile(program) for name, program in programs(run.setup, fns).items()}
        update, accumulate = compiled["update"], compiled.get("accumulate")
        accum = fns.zeros_accum(run.state.params) if accumulate is not None else None
        pairs_per_step = config.pairs_per_step(run.setup.batch_devices)
        first = run.step + 1
        with run.loop(data) as loop:  # loop
            for step in range(run.step + 1, dpo.steps + 1):
                micro_metrics = []
                for micro in range(dpo.grad_accum):
                    batch, index = data.next_batch(), jnp.int32(micro)
                    if micro < dpo.grad_accum - 1:
                        accum, metrics = accumulate(run.state, accum, run.frozen, batch, index)
                    else:
                        run.state, accum, metrics = update(run.state, accum, run.frozen, batch, index)
                    micro_metrics.append(metrics)
                metrics = mean_metrics(jax.device_get(micro_metrics))
                show = itstime(step, dpo.log_every, dpo.steps) or step == first
                if loop.end_step(metrics["loss"], metrics, pairs=pairs_per_step, show=show):
                    break
            return run.finish(loop)  # save, export

