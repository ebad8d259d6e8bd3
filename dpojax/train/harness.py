"""The run harness: one setup and one set of loop services under every objective.

Every trainer (``dpojax.train.dpo``, ``dpojax.train.d3po``) reads in the same stage order:

1. mesh → load → state: ``Run`` builds a ``Setup`` (mesh and batch devices, the models through the one loader
   ``dpojax.components.load_components``, optimizer, state shardings) and its starting state: fresh, or the
   latest checkpoint's, in which case the pretrained policy weights are never read;
2. data: the objective's source, placed at the checkpoint's position;
3. compile: ``Run.compile`` compiles ahead of time and logs each program's memory and FLOPs;
4. loop: ``Loop`` holds the services every loop needs: the stop agreement across processes (a SIGTERM that
   reached one host stops all of them after the same step), one cadence rule (``itstime``) for logs,
   checkpoints, evaluations and sample grids, the finite-loss check, and checkpoints that store the data
   source's position (``DataSource``: one meaning for every objective);
5. save and export: ``Run.finish``.

``Setup.build(config, weights="none")`` runs the same code on shape-only models: ``dpojax plan`` compiles the
trainer's own programs against ``Setup.abstract_state``, the ``jax.eval_shape`` of the trainer's own
``init_state``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import math
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from dpojax import parallel
from dpojax.components import Components, Weights, load_components, policy_unet_params, shardings_of
from dpojax.config import Config
from dpojax.distributed import any_process, barrier
from dpojax.train.checkpoint import Checkpointer, abstract_like
from dpojax.train.metrics import MetricsLog
from dpojax.train.optim import make_optimizer
from dpojax.train.state import TrainState, init_state, state_shardings

OBJECTIVE_MODULES = {"dpo": "dpojax.train.dpo", "d3po": "dpojax.train.d3po"}
GIB = 1024 ** 3


def objective_module(config: Config):
    """The module of ``config.objective``: its ``train(config)`` and ``update_program(setup)``."""
    return importlib.import_module(OBJECTIVE_MODULES[config.objective])


def itstime(step: int, every: int, total: int | None = None) -> bool:
    """The one cadence rule: every ``every`` steps (never when 0), and at the last step ``total``."""
    return bool(every and step % every == 0) or step == total


# --- setup -----------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Setup:
    """Mesh, models, optimizer and state shardings of a config: what any run, benchmark or plan of it holds."""

    config: Config
    mesh: jax.sharding.Mesh
    platform: str  # what the programs are built for: the mesh's devices', or the accelerator a plan is for
    components: Components
    params: Any  # the policy's initial parameters: arrays, or shape-only leaves
    frozen: dict  # reference, VAE, text encoders: arrays, or shape-only leaves
    tx: optax.GradientTransformation
    lr_schedule: optax.Schedule
    shardings: TrainState

    @classmethod
    def build(cls, config: Config, *, weights: Weights = "all", mesh: jax.sharding.Mesh | None = None,
              folder: str | Path | None = None, platform: str | None = None) -> Setup:
        """``weights`` as ``load_components`` takes it; ``folder`` replaces ``model.pretrained`` and ``platform``
        the mesh's (``dpojax plan`` builds an accelerator's programs on CPU devices)."""
        if mesh is None:
            mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
        platform = platform or mesh.devices.flat[0].platform
        batch_devices = parallel.batch_devices(mesh)
        if batch_devices % jax.process_count():
            raise ValueError(f"the {batch_devices} devices along the batch mesh axes (data x fsdp) do not split "
                             f"over {jax.process_count()} processes")
        components, params, frozen = load_components(config, mesh, weights=weights, folder=folder,
                                                     platform=platform)
        if config.resolution % components.vae_scale_factor:
            raise ValueError(f"config: the resolution {config.resolution} must be a multiple of the VAE scale "
                             f"factor {components.vae_scale_factor}")
        tx, lr_schedule = make_optimizer(config.optim, config.learning_rate(batch_devices))
        return cls(config, mesh, platform, components, params, frozen, tx, lr_schedule,
                   state_shardings(tx, params, mesh))

    @property
    def batch_devices(self) -> int:
        """Devices along the batch mesh axes (data x fsdp): batch sizes per device are multiplied by it."""
        return parallel.batch_devices(self.mesh)

    @property
    def local_batch_devices(self) -> int:
        """This process's share of the batch devices: its rows of a global batch are this many devices' rows."""
        return self.batch_devices // jax.process_count()

    @property
    def batch_sharding(self) -> NamedSharding:
        return parallel.batch_sharding(self.mesh)

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    @property
    def gradient_mesh(self) -> jax.sharding.Mesh | None:
        """The mesh the steps take gradients per device on (``parallel.data_parallel``), or None."""
        replicated = (self.shardings.params, shardings_of(self.frozen))
        return self.mesh if parallel.per_device_gradients(self.platform, self.mesh, replicated) else None

    def _init(self, params) -> TrainState:
        return init_state(self.tx, params, self.config.train.seed)

    def init_state(self) -> TrainState:
        """A fresh run's state on its shardings (the state buffers are the step's to donate)."""
        return jax.jit(self._init, out_shardings=self.shardings)(self.params)

    def abstract_state(self) -> TrainState:
        """The state's shapes, dtypes and shardings: ``eval_shape`` of ``init_state``, no memory."""
        return abstract_like(jax.eval_shape(self._init, self.params), self.shardings)

    def abstract_frozen(self) -> dict:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self.frozen)

    def replicated_spec(self, shape: tuple[int, ...], dtype) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, dtype, sharding=self.replicated)

    def batch_spec(self, shapes: dict[str, tuple[tuple[int, ...], Any]]) -> dict[str, jax.ShapeDtypeStruct]:
        """Shape-only global batch arrays, sharded over the batch mesh axes: ``{name: (shape, dtype)}``."""
        return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=self.batch_sharding)
                for k, (shape, dtype) in shapes.items()}


@dataclasses.dataclass(frozen=True)
class Program:
    """A jitted function of an objective and the shape-only arguments it is compiled for.

    ``roles`` names each argument ("state", "accumulator", "frozen", "batch", "params", "scalar") so that
    ``dpojax plan`` can say what the bytes are.
    """

    name: str
    jitted: Callable
    args: tuple
    roles: tuple[str, ...]

    def lower(self):
        return self.jitted.lower(*self.args)


def compile_program(program: Program) -> tuple[Any, float]:
    """(the compiled program, seconds it took to lower and compile)."""
    start = time.perf_counter()
    compiled = program.lower().compile()
    return compiled, time.perf_counter() - start


def compiled_flops(compiled) -> float | None:
    """FLOPs per call and device from XLA's cost analysis (None where the backend gives none)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost["flops"]) if cost and cost.get("flops", -1) > 0 else None


def describe_compiled(name: str, compiled, seconds: float) -> str:
    """One line: compile time, per-device memory (XLA's memory analysis) and FLOPs of a compiled program."""
    parts = [f"compiled {name} in {seconds:.1f} s"]
    memory = compiled.memory_analysis()
    if memory is not None:
        parts.append("per device: " + ", ".join(
            f"{what} {getattr(memory, attr) / GIB:.3f} GiB" for what, attr in (
                ("arguments", "argument_size_in_bytes"), ("outputs", "output_size_in_bytes"),
                ("donated", "alias_size_in_bytes"), ("temporaries", "temp_size_in_bytes"))))
    flops = compiled_flops(compiled)
    if flops is not None:
        parts.append(f"{flops / 1e9:.3g} GFLOP per call")
    return "; ".join(parts)


# --- the run ---------------------------------------------------------------------------------------------------

class NonFiniteLoss(ValueError):
    """Training hit a NaN/inf loss; the message names the step and the last good checkpoint."""


@dataclasses.dataclass(frozen=True)
class TrainResult:
    step: int  # optimizer steps completed
    run_dir: Path
    interrupted_by: str | None = None  # signal name when stopped by SIGTERM/SIGINT
    final: Path | None = None  # exported model folder


class DataSource(Protocol):
    """What a run's data is, as far as the harness cares: where it is, for the checkpoint."""

    def position(self) -> dict:
        """JSON position of the next batch; the objective's source starts there on resume."""

    def arrays(self) -> dict[str, jax.Array] | None:
        """Global arrays the position needs and that cannot be made again (saved with the checkpoint)."""


class Run:
    """A training run in ``train.output_dir``: its setup, checkpointer, state and metrics log.

    Used as a context manager: leaving it waits for the last checkpoint and closes the log.
    """

    def __init__(self, config: Config, *, total_steps: int, out=None):
        self.config, self.total_steps, self.out = config, total_steps, out or sys.stdout
        self.run_dir = Path(config.train.output_dir).absolute()
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", keep=config.train.keep_checkpoints)
        latest = self.checkpointer.latest_step()
        try:
            self.setup = Setup.build(config, weights="all" if latest is None else "frozen")
            if latest is None:
                self.state, self.resumed = self.setup.init_state(), None
            else:
                self.state, self.resumed = self.checkpointer.restore(latest, self.setup.abstract_state())
        except BaseException:
            self.checkpointer.close()
            raise
        self.step = int(jax.device_get(self.state.step))  # on the host: the loop never waits for the device
        self.log = MetricsLog(self.run_dir, config.logging, total_steps=total_steps, resume_step=self.step,
                              run_config=config.to_dict(), out=self.out)
        if self.resumed is not None:
            self.log.print(f"resumed from {self.checkpointer.directory / str(self.step)} (step {self.step})")

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc) -> None:
        self.checkpointer.wait()
        self.checkpointer.close()
        self.log.close()

    @property
    def components(self) -> Components:
        return self.setup.components

    @property
    def frozen(self) -> dict:
        return self.setup.frozen

    @property
    def mesh(self) -> jax.sharding.Mesh:
        return self.setup.mesh

    def restore_data(self, target: dict[str, jax.ShapeDtypeStruct]) -> dict[str, jax.Array]:
        """The data arrays the resumed checkpoint holds (``DataSource.arrays`` of the run that saved it)."""
        return self.checkpointer.restore_data(self.resumed["step"], target)

    def compile(self, program: Program):
        """Compile ``program`` ahead of time, logging its memory and FLOPs, before the first step runs."""
        compiled, seconds = compile_program(program)
        self.log.print(describe_compiled(program.name, compiled, seconds))
        barrier(f"dpojax: compiled {program.name}")  # no host starts its collectives while another compiles
        return compiled

    def loop(self, source: DataSource) -> Loop:
        return Loop(self, source)

    def finish(self, loop: Loop) -> TrainResult:
        """The result once the loop ended, as the last agreement decided it on every process: stopped by a
        signal (its checkpoint saved), or complete and exported. Called inside the loop's context, so a signal
        after the last agreement is only recorded: every host finishes the same way."""
        self.checkpointer.wait()
        stop = loop.stop
        if stop.stopped_by is not None:  # every process says it: each host's log shows where it stopped
            print(f"stopped by {stop.stopped_by} at step {self.step}; checkpoint saved in "
                  f"{self.checkpointer.directory / str(self.step)}", file=self.out, flush=True)
            return TrainResult(self.step, self.run_dir, interrupted_by=stop.stopped_by)
        result = TrainResult(self.step, self.run_dir, final=self.export())
        if stop.signal_name is not None:
            print(f"{stop.signal_name} arrived after the last step was agreed; the run completed at step "
                  f"{self.step}", file=self.out, flush=True)
        return result

    def export(self) -> Path | None:
        """Write the trained policy to ``<output_dir>/final`` as ``train.export`` says (None when "none")."""
        from dpojax.train.export import write_policy

        kind = self.config.train.export
        if kind == "none":
            return None
        final = write_policy(self.components.unet, self.state.params, self.run_dir / "final", kind, self.config)
        self.log.print(f"exported the final {kind} to {final}")
        return final


# --- the loop --------------------------------------------------------------------------------------------------

class StopRequest:
    """Turns SIGTERM/SIGINT into a flag, and the flags of all processes into one decision to stop.

    ``signal_name`` is the signal this process received; ``stopped_by`` the agreed decision: None until an
    agreement says stop, then the signal that stops the run (the same step on every process).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal_name: str | None = None
        self.stopped_by: str | None = None

    def _handle(self, signum, frame):
        self.signal_name = signal.Signals(signum).name

    def agreed(self) -> bool:
        """Whether to stop now, the same answer on every process: a signal that reached one host stops all
        of them after the same step (the others record it as SIGTERM). The answer is the gathered flags
        alone: a signal handled while they are gathered is this host's flag at the next agreement."""
        if self.stopped_by is None and any_process(self.signal_name is not None):
            self.stopped_by = self.signal_name or signal.SIGTERM.name
        return self.stopped_by is not None

    @contextlib.contextmanager
    def installed(self):
        previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


class Evaluator:
    """``train.eval_every``: the policy's images of fixed prompts and seeds, scored by ``train.eval_scorer``."""

    def __init__(self, run: Run):
        from dpojax.evaluate.prompts import read_prompts
        from dpojax.scorers.registry import scorer_from_config

        train = run.config.train
        self.run = run
        self.prompts = read_prompts(train.eval_prompt_file) if train.eval_prompt_file else list(train.sample_prompts)
        self.scorer = scorer_from_config(train.eval_scorer, run.config.scorers, "train.eval_scorer")

    def __call__(self) -> dict[str, float]:
        """The scores' median (the paper's checkpoint rule) and mean; their images go to TensorBoard."""
        from dpojax.scorers.base import score_per_image
        from dpojax.train.samples import eval_images, image_grid

        run = self.run
        unet = nnx.merge(run.components.unet, policy_unet_params(run.components, run.state.params, run.frozen))
        images, prompts = eval_images(run.config, run.components, unet, run.frozen, self.prompts)
        scores = score_per_image(self.scorer, images, prompts)  # a median needs one number per image
        run.log.image(run.step, "eval/images", image_grid(images, columns=len(self.prompts)))
        return {"eval_median": float(np.median(scores)), "eval_mean": float(np.mean(scores))}


class Loop:
    """The services of a training loop; the objective calls ``end_step`` after every optimizer step."""

    def __init__(self, run: Run, source: DataSource):
        self.run, self.source = run, source
        self.stop = StopRequest()
        self.stopping = False
        self._signals = self.stop.installed()
        self._last_log = self._started = time.perf_counter()
        self._first_step = run.step  # this session's steps time the estimate of the rest
        self._pairs_since_log = 0
        self.evaluate = Evaluator(run) if run.config.train.eval_every else None

    def __enter__(self) -> Loop:
        self._signals.__enter__()
        if self.run.config.train.sample_every and self.run.step == 0:
            self.sample()  # the starting point: the reference model's images
        return self

    def __exit__(self, *exc) -> None:
        self._signals.__exit__(*exc)

    def end_step(self, loss: float, record: dict[str, float] | None = None, *, pairs: int = 0,
                 show: bool = False) -> bool:
        """Count one optimizer step of ``pairs`` pairs (``run.state`` holds its result): check its loss, evaluate,
        write ``record`` (with the pairs trained per second since the previous record, and the evaluation),
        checkpoint and sample at their cadence, and agree with the other processes whether to stop. Returns
        whether to stop now.

        The record is written before the checkpoint, so a checkpoint's step always has its record; an evaluated
        step is always checkpointed, so the best scored policy can be kept."""
        run, train = self.run, self.run.config.train
        run.step += 1
        self._check_finite(loss)
        self._pairs_since_log += pairs
        evaluation = None
        if self.evaluate is not None and itstime(run.step, train.eval_every, run.total_steps):
            evaluation = self.evaluate()
            record, show = {**(record or {}), **evaluation}, True
        if record is not None:
            now = time.perf_counter()
            elapsed = now - self._started
            remaining = elapsed / (run.step - self._first_step) * (run.total_steps - run.step)
            run.log.write(run.step, record, pairs_per_second=self._pairs_since_log / (now - self._last_log),
                          show=show, elapsed=elapsed, remaining=remaining)
            self._last_log, self._pairs_since_log = now, 0
        self.stopping = self.stop.agreed()
        if evaluation is not None:
            run.checkpointer.record_score(run.step, evaluation["eval_median"])
        if itstime(run.step, train.checkpoint_every, run.total_steps) or self.stopping or evaluation is not None:
            self.save()
        if itstime(run.step, train.sample_every):
            self.sample()
        return self.stopping

    def save(self) -> None:
        run = self.run
        meta = {"config": run.config.to_dict(), "unet_config": run.components.unet_config,
                "data_position": self.source.position()}
        run.checkpointer.save(run.state, meta, data=self.source.arrays())

    def sample(self) -> None:
        """The policy's sample grid at the current step (``train.sample_*``)."""
        from dpojax.train.samples import write_sample_grid

        run = self.run
        unet = nnx.merge(run.components.unet, policy_unet_params(run.components, run.state.params, run.frozen))
        path = write_sample_grid(run.config, run.components, unet, run.frozen, run.step, run.run_dir)
        if path is not None:
            run.log.print(f"wrote the sample grid {path}")

    def _check_finite(self, loss: float) -> None:
        """Stop at a NaN/inf loss, naming the step and the last good checkpoint (the bad state is never saved)."""
        if math.isfinite(loss):
            return
        checkpointer = self.run.checkpointer
        checkpointer.wait()
        last = checkpointer.latest_step()
        kept = f"last good checkpoint: {checkpointer.directory / str(last)}" if last is not None else \
            "no checkpoint was written"
        raise NonFiniteLoss(f"non-finite loss ({loss}) at step {self.run.step}; training stopped, {kept}")
