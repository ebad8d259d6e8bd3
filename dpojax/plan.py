"""``dpojax plan``: will a training config fit, and what does one step cost, before renting the machines?

The objective's real training step is compiled ahead of time against shape-only models and batch on a mesh of
fake CPU devices of the requested shape: the trainer's own setup (``dpojax.train.harness.Setup.build`` with
``weights="none"``) and its own update program, so what the plan counts is what the trainer holds. No weights
are read or allocated, only the architecture configs (a diffusers pipeline folder that may hold nothing but its
JSON files; the full-size SD1.5 and SDXL ones ship in ``dpojax/arch``). XLA's buffer assignment of the
compiled per-device program gives what one device holds (arguments: policy weights, optimizer state, reference
and frozen encoders, batch; plus outputs and temporaries, minus donated buffers), its cost analysis the FLOPs
of a step. The compile runs in a fresh process (``dpojax.plan_worker``) with the planning XLA flags and as many
fake devices as the mesh needs, and stops at the buffer assignment. The numbers are the CPU compiler's: a TPU
or GPU compiler fuses and schedules differently, so treat the temporaries as an estimate; the argument bytes
are exact. docs/planner.md says more.
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
import numpy as np

from dpojax import parallel
from dpojax.config import Config, ConfigError
from dpojax.weights.folder import component_folder

ARCH_ROOT = Path(__file__).resolve().parent / "arch"
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


# XLA:CPU flags for planning (docs/planner.md has the measurements). Its all-reduce combiner rebuilds a
# reachability map over the whole partitioned step again and again (quadratic); GPU/TPU compilers combine
# collectives their own way. It removes optimization barriers before its last CSE passes, which then merge
# remat's recomputation back into the forward pass, so remat would save nothing; GPU/TPU compilers keep them
# until after scheduling. The memory-optimized scheduler keeps remat's recomputation next to its use, as GPU/TPU
# schedulers do.
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
    the full-size configs of ``model.arch`` shipped in ``dpojax/arch``."""
    if arch_dir is not None:
        return component_folder(arch_dir)
    pretrained = config.model.pretrained
    if pretrained is not None and (Path(pretrained) / "model_index.json").is_file():
        return Path(pretrained)
    if config.model.arch not in ARCH_FOLDERS:
        raise ConfigError(f"config: model.pretrained={pretrained!r} is not a pipeline folder and model.arch="
                          f"{config.model.arch!r} has no shipped architecture (use sd15 or sdxl, or --arch-dir)")
    return ARCH_ROOT / ARCH_FOLDERS[config.model.arch]


def device_bytes(tree) -> int:
    """Bytes one device holds of ``tree`` (ShapeDtypeStructs with shardings; the largest shard counts)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree))


@dataclasses.dataclass(frozen=True)
class Plan:
    """Per-device bytes of one compiled optimizer step, and its FLOPs."""

    objective: str
    platform: str  # the accelerator whose program is planned (gpu, tpu)
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
        lines = [f"{self.objective} step, mesh {mesh} ({devices} devices), {self.pairs_per_device} pair(s) per device, "
                 f"remat {self.remat}, attention {self.attention}, the program of {self.platform}; compiled in "
                 f"{self.compile_seconds:.0f} s"]
        lines.append("per device:")
        lines += [f"  {name:<30} {value / GIB:9.3f} GiB" for name, value in rows]
        verdict = "fits" if self.fits else "does NOT fit"
        lines.append(f"{verdict} in {self.device_memory / GIB:g} GiB per device "
                     f"({100 * self.peak / self.device_memory:.0f}% used)")
        lines.append(f"FLOPs per optimizer micro-step: {self.flops_per_device / 1e12:.3g} TFLOP per device, "
                     f"{self.flops_per_device * devices / 1e12:.3g} TFLOP in all")
        lines.append("note: temporaries are XLA:CPU's (memory-optimized scheduler); GPU and TPU compilers fuse and "
                     "schedule differently, so leave headroom")
        return "\n".join(lines)


PLATFORMS = ("gpu", "tpu")  # what a plan is for; its programs take their paths (not the CPU-only ones)
FUSED_KERNELS = ("cudnn", "splash")  # they hold no score matrix; on CPU, blocked stands in for them


def plan_training(config: Config, mesh_sizes: dict[str, int], device_memory_gib: float,
                  arch_dir: str | Path | None = None, platform: str = "gpu") -> Plan:
    """Compile ``config``'s training step for ``mesh_sizes`` of ``platform`` devices, on fake CPU devices, and
    measure it.

    The compile runs in a fresh process (``dpojax.plan_worker``): XLA's flags and the number of CPU devices
    can only be set before JAX starts, and the worker stops XLA:CPU after its buffer assignment, long before the
    whole compile would end (docs/planner.md).
    """
    if platform not in PLATFORMS:
        raise ValueError(f"plan: --platform {platform!r} is not one of {', '.join(PLATFORMS)}")
    folder = architecture_folder(config, arch_dir)
    with tempfile.TemporaryDirectory(prefix="dpojax-plan-") as tmp:
        workdir = Path(tmp)
        (workdir / "request.pkl").write_bytes(pickle.dumps(
            (config, mesh_sizes, str(folder), int(device_memory_gib * GIB), platform)))
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


def abstract_step(config: Config, mesh, folder: Path, platform: str = "gpu"):
    """The objective's update program for ``platform`` on shape-only models of ``folder`` (the trainer's own
    setup and program), and the config as planned (architecture folder, attention kernel)."""
    from dpojax.models.attention_kernels import resolve
    from dpojax.train.harness import Setup, objective_module

    kernel = resolve(config.model.attention, platform)
    kernel = "blocked" if kernel in FUSED_KERNELS else kernel
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, pretrained=str(folder),
                                                                   attention=kernel))
    setup = Setup.build(config, weights="none", mesh=mesh, platform=platform)
    return setup, objective_module(config).update_program(setup), config


def flops_per_device(lowered, devices: int) -> float:
    """FLOPs of a lowered step per device: XLA's cost analysis of the whole step, before partitioning, split
    evenly (the accelerator's program has no per-device body to count at other shapes)."""
    return float(lowered.cost_analysis().get("flops", 0.0)) / devices


def micro_pairs_per_device(config: Config) -> int:
    """Pairs per device of one compiled step: a DPO micro-batch, a D3PO optimizer step."""
    return config.d3po.train_batch_size if config.objective == "d3po" else config.dpo.pairs_per_device


def held_bytes(setup, program) -> dict[str, int]:
    """Per-device bytes of what the training process holds, by kind, from the shapes alone."""
    by_role = {role: arg for role, arg in zip(program.roles, program.args, strict=True)}
    state = setup.abstract_state()
    frozen = setup.abstract_frozen()
    encoders = {k: v for k, v in frozen.items() if k != "reference"}
    scalars = [arg for role, arg in zip(program.roles, program.args, strict=True) if role == "scalar"]
    return dict(policy_params=device_bytes(state.params), optimizer_state=device_bytes(state.opt_state),
                accumulator=device_bytes(by_role.get("accumulator")), reference=device_bytes(frozen.get("reference")),
                encoders=device_bytes(encoders), batch=device_bytes(by_role.get("batch")),
                step_and_key=device_bytes((state.step, state.key, scalars)))


def plan_from_command_line(config_path: str, overrides, mesh: str | None, device_memory_gib: float,
                           arch_dir: str | None = None, platform: str = "gpu") -> Plan:
    """``dpojax plan``: the mesh from ``--mesh`` (else the config's, which must then have no -1 axis)."""
    from dpojax.config import load_config

    if device_memory_gib <= 0:
        raise ValueError(f"--device-memory must be > 0 GiB, got {device_memory_gib:g}")
    config = load_config(config_path, overrides)
    if mesh is None:
        sizes = dataclasses.asdict(config.mesh)
        if -1 in sizes.values():
            raise ValueError(f"config: mesh {sizes} has a -1 (fill) axis: give the mesh with --mesh, "
                             f"e.g. --mesh data=1,fsdp=8,tensor=1")
    else:
        sizes = parse_mesh(mesh)
    return plan_training(config, sizes, device_memory_gib, arch_dir, platform)
