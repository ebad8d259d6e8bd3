"""``dpojax plan``: will a training config fit, and what does one step cost, before renting the machines?

The real training step (``dpojax.train.step.make_step_functions``) is compiled ahead of time against
shape-only models and batch on a mesh of fake CPU devices of the requested shape: no weights are read or
allocated, only the architecture configs (a diffusers pipeline folder that may hold nothing but its JSON files;
the full-size SD1.5 and SDXL ones live in ``configs/arch``). XLA's buffer assignment of the compiled
per-device program gives what one device holds (arguments: policy weights, optimizer state, reference and
frozen encoders, batch; plus outputs and temporaries, minus donated buffers), its cost analysis the FLOPs of a
step. The compile runs in a fresh process (``dpojax.plan_worker``) with the planning XLA flags and as many
fake devices as the mesh needs, and stops at the buffer assignment. The numbers are the CPU compiler's: a TPU
or GPU compiler fuses and schedules differently, so treat the temporaries as an estimate; the argument bytes
are exact.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from dpojax import parallel
from dpojax import schedule as sched
from dpojax.config import Config, ConfigError
from dpojax.losses import REFERENCE_FREE_LOSSES
from dpojax.models.lora import split_adapters
from dpojax.train.state import (
    DTYPES,
    REMAT,
    Components,
    TrainState,
    abstract_lora_policy,
    check_supported,
    lora_spec,
    read_pipeline_arch,
    with_attention_kernel,
)
from dpojax.weights.folder import component_folder, read_config
from dpojax.weights.io import abstract_module

ARCH_ROOT = Path(__file__).resolve().parents[1] / "configs" / "arch"
ARCH_FOLDERS = {"sd15": "sd-v1-5", "sdxl": "sdxl-base-1.0"}
GIB = 1024 ** 3


def parse_mesh(text: str) -> dict[str, int]:
    """``"data=2,fsdp=8"`` -> ``{"data": 2, "fsdp": 8, "tensor": 1}`` (absent axes are 1)."""
    sizes = dict.fromkeys(parallel.MESH_AXES, 1)
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep or name.strip() not in sizes or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"--mesh {text!r}: expected axis=size with axes {', '.join(parallel.MESH_AXES)} "
                             f"and sizes >= 1, e.g. data=1,fsdp=8,tensor=1 (bad part {part!r})")
        sizes[name.strip()] = int(value)
    return sizes


# XLA:CPU flags for planning. Its all-reduce combiner rebuilds a reachability map over the whole partitioned
# step again and again (gdb: minutes on SDXL, quadratic); GPU/TPU compilers combine collectives their own way.
# It removes optimization barriers before its last CSE passes, which then merge remat's recomputation back
# into the forward pass: remat saved nothing on CPU (a 16-layer checkpointed toy: 256 MiB of temporaries, 136
# with the barriers kept). GPU/TPU compilers keep them until after scheduling.
# The memory-optimized scheduler keeps remat's recomputation next to its use, as GPU/TPU schedulers do
# (SDXL at 1024 px with its deepest stacks cut to 1 layer: 42 GiB of temporaries with the default scheduler, 21
# GiB with this one).
PLAN_DISABLED_PASSES = ("cpu-all-reduce-combiner", "cse_barrier_expander")
PLAN_SCHEDULER = "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"


def plan_xla_flags(user_flags: str) -> str:
    """``XLA_FLAGS`` for the plan's compile: the user's, with the plan's disabled passes joined to theirs (XLA
    keeps only the last ``--xla_disable_hlo_passes``), the memory-optimized scheduler unless they chose one,
    and no fake-device count (the plan worker sets the mesh's)."""
    passes, kept = list(PLAN_DISABLED_PASSES), []
    for flag in user_flags.split():
        name, _, value = flag.partition("=")
        if name == "--xla_disable_hlo_passes":
            passes += [p for p in value.split(",") if p and p not in passes]
        elif name != "--xla_force_host_platform_device_count":
            kept.append(flag)
    if not any(flag.startswith("--xla_cpu_scheduler_type=") for flag in kept):
        kept.append(PLAN_SCHEDULER)
    return " ".join([*kept, f"--xla_disable_hlo_passes={','.join(passes)}"])


def architecture_folder(config: Config, arch_dir: str | Path | None = None) -> Path:
    """Where the architecture configs come from: ``arch_dir``, else ``model.pretrained`` when it exists, else
    the full-size configs of ``model.arch`` shipped in ``configs/arch``."""
    if arch_dir is not None:
        return component_folder(arch_dir)
    pretrained = config.model.pretrained
    if pretrained is not None and (Path(pretrained) / "model_index.json").is_file():
        return Path(pretrained)
    if config.model.arch not in ARCH_FOLDERS:
        raise ConfigError(f"config: model.pretrained={pretrained!r} is not a pipeline folder and model.arch="
                          f"{config.model.arch!r} has no shipped architecture (use sd15 or sdxl, or --arch-dir)")
    return ARCH_ROOT / ARCH_FOLDERS[config.model.arch]


def _with_shardings(params: nnx.State, mesh) -> dict:
    """An abstract parameter state as a plain dict of ShapeDtypeStructs carrying their mesh shardings."""
    shardings = nnx.to_pure_dict(parallel.state_shardings(params, mesh))
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nnx.to_pure_dict(params),
                        shardings)


def _abstract(cls, folder: Path, subfolder: str, mesh, **kwargs) -> tuple[nnx.GraphDef, dict, nnx.Module]:
    """(graph, ShapeDtypeStructs carrying their shardings, the abstract module) of one component."""
    module = abstract_module(cls, read_config(component_folder(folder, subfolder)), **kwargs)
    graph, params, _ = nnx.split(module, nnx.Param, ...)
    return graph, _with_shardings(params, mesh), module


def abstract_components(config: Config, folder: Path, mesh) -> tuple[Components, dict, dict]:
    """``train.state.load_components`` with shapes only: (components, policy params, frozen params); with
    LoRA (``model.lora_rank`` > 0) the policy params are the adapters and the base UNet is the reference."""
    from dpojax.models.clip_text import CLIPTextModel, CLIPTextModelWithProjection
    from dpojax.models.unet import UNet2DConditionModel
    from dpojax.models.vae import AutoencoderKL

    check_supported(config)
    is_sdxl = read_pipeline_arch(folder, config.model.arch)
    model = config.model
    compute, frozen_dtype = DTYPES[model.dtype], DTYPES[model.reference_dtype]
    spec = lora_spec(model)
    frozen: dict[str, dict] = {}
    reference_graph = None
    if spec is not None:  # as load_components: the base UNet is the reference, the adapters are trained
        reference_graph, frozen["reference"], base = _abstract(UNet2DConditionModel, folder, "unet", mesh,
                                                               dtype=compute, param_dtype=frozen_dtype)
        unet_config = dict(base.config)
        unet_graph, lora_state = abstract_lora_policy(unet_config, spec, model, compute)
        params = split_adapters(_with_shardings(lora_state, mesh))[1]
    else:
        unet_graph, params, policy = _abstract(UNet2DConditionModel, folder, "unet", mesh, dtype=compute,
                                               param_dtype=DTYPES[model.param_dtype], remat=REMAT[model.remat])
        unet_config = dict(policy.config)
        if config.loss.type not in REFERENCE_FREE_LOSSES:
            reference_graph, frozen["reference"], _ = _abstract(UNet2DConditionModel, folder, "unet", mesh,
                                                                dtype=compute, param_dtype=frozen_dtype)
    kw = dict(dtype=compute, param_dtype=frozen_dtype)
    vae_folder, vae_sub = (Path(model.vae), None) if model.vae else (folder, "vae")
    vae_graph, frozen["vae"], vae = _abstract(AutoencoderKL, vae_folder, vae_sub, mesh, **kw)
    te_graph, frozen["text_encoder"], _ = _abstract(CLIPTextModel, folder, "text_encoder", mesh, **kw)
    te2_graph = None
    if is_sdxl:
        te2_graph, frozen["text_encoder_2"], _ = _abstract(CLIPTextModelWithProjection, folder, "text_encoder_2",
                                                           mesh, **kw)
    schedule = sched.NoiseSchedule.from_config(
        json.loads((folder / "scheduler" / "scheduler_config.json").read_text()))
    components = Components(
        unet=unet_graph, reference=reference_graph, vae=vae_graph, text_encoder=te_graph, text_encoder_2=te2_graph,
        tokenizer=None, tokenizer_2=None, schedule=schedule, vae_scaling_factor=vae.scaling_factor,
        vae_shift_factor=vae.shift_factor, latent_channels=vae.config["latent_channels"],
        vae_scale_factor=2 ** (len(vae.config["block_out_channels"]) - 1), is_sdxl=is_sdxl,
        compute_dtype=compute, unet_config=unet_config, lora=spec)
    return with_attention_kernel(components, params, frozen, model.attention, mesh), params, frozen


def abstract_batch(config: Config, components: Components, folder: Path, pairs: int, sharding) -> dict:
    """The arrays ``host_batch`` gives the step for ``pairs`` pairs, as sharded ShapeDtypeStructs: pixels and
    token ids, or the latent/text-embedding cache's arrays when ``data.cache_dir`` is set."""
    res = config.data.resolution
    text = read_config(component_folder(folder, "text_encoder"))
    tokens = text.get("max_position_embeddings", 77)
    shapes: dict[str, tuple[tuple[int, ...], object]] = {}
    if config.data.cache_dir is not None:
        side = res // components.vae_scale_factor
        latent = ((pairs, 2, components.latent_channels, side, side), jnp.float32)
        hidden = text["hidden_size"]
        if components.is_sdxl:
            text_2 = read_config(component_folder(folder, "text_encoder_2"))
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
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for k, (shape, dtype) in shapes.items()}


def device_bytes(tree) -> int:
    """Bytes one device holds of ``tree`` (ShapeDtypeStructs with shardings; the largest shard counts)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree))


@dataclasses.dataclass(frozen=True)
class Plan:
    """Per-device bytes of one compiled optimizer step, and its FLOPs."""

    mesh: dict[str, int]
    pairs_per_device: int
    remat: str
    attention: str  # the kernel compiled (blocked stands in for cudnn/splash)
    policy_params: int
    optimizer_state: int
    accumulator: int  # fp32 gradient-accumulation buffer (optim.grad_accum > 1)
    reference: int
    encoders: int  # frozen VAE and text encoders
    batch: int
    step_and_key: int
    arguments: int  # XLA: everything passed in (the rows above, plus the step and key)
    outputs: int
    aliased: int  # outputs written into donated inputs (counted once)
    temporaries: int
    flops_per_device: float
    device_memory: int
    compile_seconds: float  # lowering and compiling up to XLA's buffer assignment

    @property
    def held(self) -> int:
        """What the training process keeps on the device besides the step's own temporaries."""
        return (self.policy_params + self.optimizer_state + self.accumulator + self.reference + self.encoders
                + self.batch + self.step_and_key)

    @property
    def unused(self) -> int:
        """Held but not an argument of the compiled step (jit drops unused inputs: the VAE decoder)."""
        return max(0, self.held - self.arguments)

    @property
    def peak(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.unused

    @property
    def fits(self) -> bool:
        return self.peak <= self.device_memory

    def report(self) -> str:
        devices = math.prod(self.mesh.values())
        mesh = ",".join(f"{k}={v}" for k, v in self.mesh.items())
        rows = [("policy parameters (trained)", self.policy_params), ("optimizer state", self.optimizer_state),
                ("gradient accumulator", self.accumulator),
                ("reference UNet", self.reference), ("frozen VAE + text encoders", self.encoders),
                ("batch", self.batch), ("step arguments (XLA)", self.arguments),
                ("held, not step arguments", self.unused),
                ("outputs not aliased to inputs", self.outputs - self.aliased),
                ("temporaries (XLA)", self.temporaries), ("peak", self.peak)]
        lines = [f"mesh {mesh} ({devices} devices), {self.pairs_per_device} pair(s) per device, "
                 f"remat {self.remat}, attention {self.attention}; compiled in {self.compile_seconds:.0f} s"]
        lines.append("per device:")
        lines += [f"  {name:<30} {value / GIB:9.3f} GiB" for name, value in rows]
        verdict = "fits" if self.fits else "does NOT fit"
        lines.append(f"{verdict} in {self.device_memory / GIB:g} GiB per device "
                     f"({100 * self.peak / self.device_memory:.0f}% used)")
        lines.append(f"FLOPs per optimizer micro-step: {self.flops_per_device / 1e12:.2f} TFLOP per device, "
                     f"{self.flops_per_device * devices / 1e12:.2f} TFLOP in all")
        lines.append("note: temporaries are XLA:CPU's (memory-optimized scheduler); GPU and TPU compilers fuse and "
                     "schedule differently, so leave headroom")
        return "\n".join(lines)


PLAN_KERNEL = {"auto": "blocked", "cudnn": "blocked", "splash": "blocked"}  # fused kernels hold no score matrix


def plan_training(config: Config, mesh_sizes: dict[str, int], device_memory_gib: float,
                  arch_dir: str | Path | None = None) -> Plan:
    """Compile ``config``'s training step for ``mesh_sizes`` on fake CPU devices and measure it.

    The compile runs in a fresh process (``dpojax.plan_worker``): XLA's flags and the number of CPU devices
    can only be set before JAX starts, and the worker stops XLA:CPU after its buffer assignment (SDXL: about 4
    minutes on 2 cores; the whole compile did not finish in 25).
    """
    folder = architecture_folder(config, arch_dir)
    with tempfile.TemporaryDirectory(prefix="dpojax-plan-") as tmp:
        workdir = Path(tmp)
        (workdir / "request.pkl").write_bytes(pickle.dumps(
            (config, mesh_sizes, str(folder), int(device_memory_gib * GIB))))
        log = workdir / "worker.log"
        with log.open("w") as out:
            worker = subprocess.Popen([sys.executable, "-m", "dpojax.plan_worker", tmp], stdout=out,
                                      stderr=subprocess.STDOUT)
            try:
                worker.wait()
            finally:
                if worker.poll() is None:
                    worker.kill()
                    worker.wait()
        result_path = workdir / "result.json"
        result = json.loads(result_path.read_text()) if result_path.is_file() else None
        if result is not None and "error" in result and result["user_error"]:
            raise ValueError(result["error"])  # one line for the command: a bad config value, a missing folder
        if result is None or "error" in result:
            what = (f"the compile process exited with {worker.returncode} and no result" if result is None
                    else f"{result['type']}: {result['error']}")
            tail = log.read_text(errors="replace").strip().splitlines()[-20:]  # the worker's traceback
            raise RuntimeError("\n".join([f"plan: {what}", *tail]))
    return Plan(**result["plan"])


def abstract_step(config: Config, mesh, folder: Path):
    """The jitted update, its shape-only arguments (state, accumulator, frozen, batch, micro-step) and the
    config as planned (architecture folder, attention kernel)."""
    from dpojax.train.optim import make_optimizer, opt_state_shardings
    from dpojax.train.step import make_step_functions

    kernel = PLAN_KERNEL.get(config.model.attention, config.model.attention)
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, pretrained=str(folder),
                                                                   attention=kernel))
    components, params, frozen = abstract_components(config, folder, mesh)
    batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
    tx, lr_schedule = make_optimizer(config.optim, config.learning_rate(batch_devices))
    replicated = NamedSharding(mesh, PartitionSpec())
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    opt_shardings = opt_state_shardings(tx, params, param_shardings, replicated)
    opt_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                             jax.eval_shape(tx.init, params), opt_shardings)
    scalar = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)  # noqa: E731
    state = TrainState(scalar((), jnp.int32), params, opt_state, scalar((2,), jnp.uint32))
    state_shardings = TrainState(replicated, param_shardings, opt_shardings, replicated)
    frozen_shardings = jax.tree.map(lambda x: x.sharding, frozen)
    batch_sharding = parallel.batch_sharding(mesh)
    step_fns = make_step_functions(components, config, tx, lr_schedule, mesh, state_shardings, frozen_shardings,
                                   batch_sharding)
    accum = None
    if config.optim.grad_accum > 1:
        accum = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32, sharding=x.sharding), params)
    batch = abstract_batch(config, components, folder, config.train.pairs_per_device * batch_devices,
                           batch_sharding)
    micro = scalar((), jnp.int32)  # the micro-step index within gradient accumulation
    return step_fns.update, config, (state, accum, frozen, batch, micro)


def held_bytes(args) -> dict[str, int]:
    """Per-device bytes of what the training process holds, by kind, from the shapes alone."""
    state, accum, frozen, batch, micro = args
    encoders = {k: v for k, v in frozen.items() if k != "reference"}
    return dict(policy_params=device_bytes(state.params), optimizer_state=device_bytes(state.opt_state),
                accumulator=device_bytes(accum), reference=device_bytes(frozen.get("reference")),
                encoders=device_bytes(encoders), batch=device_bytes(batch),
                step_and_key=device_bytes((state.step, state.key, micro)))


def plan_from_command_line(config_path: str, overrides, mesh: str | None, device_memory_gib: float,
                           arch_dir: str | None = None) -> Plan:
    """``dpojax plan``: the mesh from ``--mesh`` (else the config's, which must then have no -1 axis)."""
    from dpojax.config import load_config

    if device_memory_gib <= 0:
        raise ValueError(f"--device-memory must be > 0 GiB, got {device_memory_gib:g}")
    config = load_config(config_path, overrides)
    if config.objective != "dpo":
        raise ConfigError(f"config: objective={config.objective!r}: dpojax plan compiles the offline DPO step only")
    if mesh is None:
        sizes = dataclasses.asdict(config.mesh)
        if -1 in sizes.values():
            raise ValueError(f"config: mesh {sizes} has a -1 (fill) axis: give the mesh with --mesh, "
                             f"e.g. --mesh data=1,fsdp=8,tensor=1")
    else:
        sizes = parse_mesh(mesh)
    return plan_training(config, sizes, device_memory_gib, arch_dir)
