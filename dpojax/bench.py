"""`dpojax bench CONFIG`: time the real training steps and the PyTorch original on the same work.

What is timed: the trainer's own programs on the trainer's own setup (``dpojax.train.harness``): the jitted
Diffusion-DPO step of ``dpojax.train.dpo`` (policy forward+backward and reference forward on the
pair-interleaved winners and losers, the fp32 loss, global-norm clip and the optimizer update), compiled ahead
of time (compile time reported apart), then the median of ``iters`` calls after ``warmup``.
By default its inputs are cache-like (posterior moments and text encodings, as a `dpojax data encode` cache
gives), so the step runs the UNets only; ``--encode`` also times the variant that encodes pixels with the VAE
and token ids with the text encoders inside the step. The PyTorch side (``dpojax.bench_torch``, imported only
here) runs the reference Diffusion-DPO step with diffusers' UNet loaded from the same pipeline folder, on the
same inputs, batch, dtype and thread count, and the ratio JAX / PyTorch is printed. The same is done for a
D3PO step over K denoising steps (``dpojax.train.d3po.update_program``) on the same models and pairs.

With ``--scorers``, each scorer (``dpojax.scorers.registry``) is timed too, as a whole call from uint8 images and
prompts (tokenization, preprocessing, fixed-size batches) on random images and fixed prompts of varied length,
against its PyTorch original (``dpojax.bench_torch_scorers``) built from the same files and scoring the same
images in batches of the same size; images/s on both sides, and how far apart their scores are.

Rounds alternate a block of JAX calls with a block of PyTorch calls, so a change in machine load hits both;
the ratio (of times: below 1, JAX is faster) is the median of the per-round ratios. MFU divides the step's model
FLOPs (``dpojax.flops``: the UNet forward's matrix products counted from its program, times the forwards a
step makes) by the time and by the device's dense bf16 peak, printed beside it, when the device is known. XLA's
own count of the compiled step (elementwise work, recomputation and the optimizer included) is printed too.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dpojax import parallel
from dpojax.config import Config

# Dense bf16 peak FLOP/s per device, matched as a substring of ``device_kind`` (most specific first).
PEAK_FLOPS = (
    ("H200", 989e12), ("H100", 989e12), ("A100", 312e12),
    ("TPU v6 lite", 918e12), ("TPU v6e", 918e12), ("TPU v5p", 459e12), ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12), ("TPU v4", 275e12),
)
PROMPT = "a photo of a red cube on a table"


def device_peak_flops(device_kind: str) -> float | None:
    for name, peak in PEAK_FLOPS:
        if name.lower() in device_kind.lower():
            return peak
    return None


def thread_count() -> int:
    """Cores this process may run on: what XLA's CPU thread pool uses, and what PyTorch is given."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclasses.dataclass
class Timings:
    """Wall-clock seconds of timed calls, grouped by round."""

    rounds: list[list[float]] = dataclasses.field(default_factory=list)
    compile_s: float | None = None
    flops: float | None = None  # per call, per device (XLA cost analysis)

    @property
    def all(self) -> list[float]:
        return [t for r in self.rounds for t in r]

    @property
    def median(self) -> float:
        return statistics.median(self.all)


def timed_block(call: Callable[[], None], iters: int) -> list[float]:
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


@dataclasses.dataclass
class Case:
    """One benchmarked call doing ``count`` ``unit`` of work: the JAX call (a training step carries its state
    between calls) and optionally the PyTorch one. A scorer is timed as a whole call, host work included, so it
    has no FLOP count; its ``compile_s`` is its first call, which compiles."""

    name: str
    count: int
    jax_call: Callable[[], None]
    compile_s: float
    flops: float | None
    torch_call: Callable[[], None] | None = None
    unit: str = "pairs"
    call: str = "step"
    compile_label: str = "compile"
    show_mfu: bool = True
    model_flops: float | None = None  # per call, per device (``set_model_flops``)
    forwards: str = ""  # how the model FLOPs were counted


def unet_forwards_per_pair(config: Config, d3po_k: int = 0) -> int:
    """UNet forward-equivalents one pair costs in a step: the policy's forward and backward count 3 (the backward
    is two products per forward product), the reference's forward 1. Diffusion-DPO: both images through both
    UNets, 8 (reference-free losses 6, winners-only 3). D3PO: that for each of the K trained denoising steps,
    doubled under classifier-free guidance (a conditional and an unconditional pass)."""
    from dpojax import losses

    if d3po_k:
        return d3po_k * 2 * (2 if config.d3po.guidance_scale > 1 else 1) * 4
    loss = config.loss.type
    images = 1 if loss in losses.WINNERS_ONLY_LOSSES else 2
    return images * (3 if loss in losses.REFERENCE_FREE_LOSSES else 4)


def unet_image_flops(setup) -> int:
    """Matmul FLOPs of one UNet forward on one image at the config's resolution (``dpojax.flops``)."""
    from dpojax.components import policy_unet_params
    from dpojax.flops import unet_forward_flops

    components, config = setup.components, setup.config
    params = policy_unet_params(components, setup.params, setup.frozen)
    shapes = unet_shapes(components, config)
    added = ({"text_embeds": (shapes["pooled"],), "time_ids": (6,)} if components.is_sdxl else None)
    return unet_forward_flops(components.unet, params, added=added, hidden=(77, shapes["hidden"]),
                              latent=(components.latent_channels, shapes["latent"], shapes["latent"]))


def set_model_flops(case: Case, setup, forwards_per_pair: int, image_flops: int) -> None:
    """The case's model FLOPs per device: its pairs per device x the forwards each costs x one forward's."""
    pairs_per_device = case.count / setup.batch_devices
    case.model_flops = forwards_per_pair * pairs_per_device * image_flops
    case.forwards = f"{forwards_per_pair} UNet forwards per pair x {image_flops / 1e9:.3g} GFLOP"


def _run_rounds(case: Case, iters: int, warmup: int, rounds: int) -> tuple[Timings, Timings | None]:
    jax_t = Timings(compile_s=case.compile_s, flops=case.flops)
    torch_t = Timings() if case.torch_call is not None else None
    for _ in range(warmup):
        case.jax_call()
        if case.torch_call is not None:
            case.torch_call()
    for _ in range(rounds):
        time.sleep(0.2)  # let the other runtime's spinning worker threads go idle
        jax_t.rounds.append(timed_block(case.jax_call, iters))
        if torch_t is not None:
            time.sleep(0.2)
            torch_t.rounds.append(timed_block(case.torch_call, iters))
    return jax_t, torch_t


# --- inputs ---------------------------------------------------------------------------------------------------

def unet_shapes(components, config: Config) -> dict[str, int]:
    unet = components.unet_config
    cross = unet["cross_attention_dim"]
    shapes = {"latent": config.data.resolution // components.vae_scale_factor,
              "hidden": cross[0] if isinstance(cross, list | tuple) else cross}
    if components.is_sdxl:
        shapes["pooled"] = unet["projection_class_embeddings_input_dim"] - 6 * unet["addition_time_embed_dim"]
    return shapes


def dpo_inputs(components, config: Config, pairs: int, encode: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """Host arrays for ``pairs`` pairs: a cache-like batch (posterior moments, text encodings) or, with
    ``encode``, pixels and token ids. Both sides of the benchmark read these same arrays."""
    rng = np.random.default_rng(seed)
    shapes, res = unet_shapes(components, config), config.data.resolution
    batch: dict[str, np.ndarray] = {}
    if encode:
        batch["pixels"] = rng.uniform(-1, 1, (pairs, 2, res, res, 3)).astype(np.float32)
        batch.update(components.folder.token_ids([PROMPT] * pairs))
    else:
        latent = (pairs, 2, components.latent_channels, shapes["latent"], shapes["latent"])
        batch["latent_mean"] = rng.standard_normal(latent, dtype=np.float32)
        batch["latent_logvar"] = np.full(latent, -4.0, np.float32)
        batch["hidden"] = rng.standard_normal((pairs, 77, shapes["hidden"]), dtype=np.float32)
        if components.is_sdxl:
            batch["pooled"] = rng.standard_normal((pairs, shapes["pooled"]), dtype=np.float32)
    if components.is_sdxl:
        batch["time_ids"] = np.tile(np.array([res, res, 0, 0, res, res], np.float32), (pairs, 2, 1))
    return batch


def d3po_inputs(components, config: Config, pairs: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Stored trajectories of ``pairs`` pairs (both members' x_T..x_0), prompts and ±1 preferences."""
    from dpojax.train.d3po_step import text_inputs, text_shapes

    rng = np.random.default_rng(seed)
    size, steps = unet_shapes(components, config)["latent"], config.d3po.num_steps
    if components.folder.tokenizer is not None:
        batch = text_inputs(components, [PROMPT] * pairs, config.d3po.resolution)
    else:  # an architecture folder (random weights) has no tokenizers, and the ids' values do not matter then
        batch = {name: np.zeros(shape, dtype) for name, (shape, dtype) in text_shapes(components, pairs).items()}
    batch["latents"] = rng.standard_normal((pairs, 2, steps + 1, components.latent_channels, size, size),
                                           dtype=np.float32)
    first = rng.choice([-1, 1], pairs).astype(np.int32)
    batch["preference"] = np.stack([first, -first], axis=-1)
    return batch


def bench_config(config: Config, d3po_k: int) -> Config:
    """``config`` with the D3PO step benchmarked on the DPO step's models, pairs and resolution: K of
    ``d3po.num_steps`` denoising steps, ``dpo.pairs_per_device`` pairs per device."""
    pairs = config.dpo.pairs_per_device
    return dataclasses.replace(config, d3po=dataclasses.replace(
        config.d3po, resolution=config.data.resolution, timestep_fraction=max(d3po_k, 1) / config.d3po.num_steps,
        train_batch_size=pairs, sample_batch_size=pairs, num_batches_per_epoch=1))


# --- the JAX side -----------------------------------------------------------------------------------------------

def bench_mesh(config: Config) -> jax.sharding.Mesh:
    """The config's mesh; with every axis size given, over the first that many devices."""
    sizes = (config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    devices = jax.devices()
    if -1 not in sizes:
        devices = devices[:int(np.prod(sizes))]
    return parallel.make_mesh(*sizes, devices=devices)


def random_weights(tree, seed: int = 0):
    """Random arrays for the shape-only leaves of ``tree`` on their shardings: what a benchmark of a full-size
    architecture needs when only its config files are at hand. Drawn on the host (one program per leaf would
    cost more compile time than the benchmark), the same on every process."""
    rng = np.random.default_rng(seed)

    def make(leaf):
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            return jax.device_put(np.zeros(leaf.shape, leaf.dtype), leaf.sharding)
        values = rng.standard_normal(leaf.shape, dtype=np.float32)
        values *= 0.02
        return jax.device_put(values.astype(leaf.dtype), leaf.sharding)

    return jax.tree.map(make, tree)


def bench_setup(config: Config, random: bool):
    """The trainer's setup on the config's mesh: weights read from ``model.pretrained``, or random ones on the
    architecture its config files describe."""
    from dpojax.train.harness import Setup

    mesh = bench_mesh(config)
    if not random:
        return Setup.build(config, mesh=mesh)
    setup = Setup.build(config, weights="none", mesh=mesh)
    return dataclasses.replace(setup, params=random_weights(setup.params, 1), frozen=random_weights(setup.frozen, 2))


def peak_memory_gib() -> float | None:
    """The first device's peak memory in use so far (GiB), where the runtime reports it (GPU, TPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats["peak_bytes_in_use"] / 2 ** 30 if "peak_bytes_in_use" in stats else None


def fresh_state(setup):
    """A new initial state for each case: the step donates its state, and jit hands the setup's own parameter
    arrays through to the state, so each case starts from a copy."""
    return dataclasses.replace(setup, params=jax.tree.map(jnp.copy, setup.params)).init_state()


def timed_case(name: str, jitted, args: tuple, pairs: int) -> Case:
    """A ``Case`` calling ``jitted``, compiled for ``args``, carrying the (donated) state between calls."""
    from dpojax.train.harness import Program, compile_program, compiled_flops

    compiled, compile_s = compile_program(Program(name, jitted, args, ()))
    holder = {"args": list(args)}

    def call():
        out = compiled(*holder["args"])
        holder["args"][0] = out[0]  # the new state
        jax.block_until_ready(out[-1])  # the metrics

    return Case(name, pairs, call, compile_s, compiled_flops(compiled))


def dpo_case(setup, batch: dict[str, np.ndarray], name: str) -> Case:
    from dpojax.train.dpo import update_program

    args = (fresh_state(setup), None, setup.frozen, parallel.global_batch(batch, setup.mesh), jnp.int32(0))
    return timed_case(name, update_program(setup).jitted, args, batch_pairs(batch))


def d3po_case(setup, batch: dict[str, np.ndarray]) -> Case:
    from dpojax.train.d3po import update_program

    args = (fresh_state(setup), setup.frozen, parallel.global_batch(batch, setup.mesh))
    return timed_case(f"D3PO step, K={d3po_positions(setup.config)} of {setup.config.d3po.num_steps} steps",
                      update_program(setup).jitted, args, batch_pairs(batch))


def batch_pairs(batch: dict[str, np.ndarray]) -> int:
    return len(next(iter(batch.values())))


def d3po_positions(config: Config) -> int:
    return max(1, int(config.d3po.num_steps * config.d3po.timestep_fraction))


# --- report ---------------------------------------------------------------------------------------------------

def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"


def report(case: Case, jax_t: Timings, torch_t: Timings | None, torch_note: str | None, out,
           peak: float | None = None) -> dict:
    """Print the case's lines; ``peak``: FLOP/s to take MFU against (default: the device's from the table)."""
    device = jax.devices()[0]
    devices = len(jax.devices())
    line = (f"{case.name} [jax]   {case.compile_label} {jax_t.compile_s:.1f} s; {case.call} median "
            f"{_ms(jax_t.median)} (min {_ms(min(jax_t.all))}, n={len(jax_t.all)}); "
            f"{case.count / jax_t.median:.2f} {case.unit}/s")
    peak = peak or device_peak_flops(device.device_kind)
    mfu = None
    if case.show_mfu:
        xla = "unknown" if jax_t.flops is None else f"{jax_t.flops / 1e9:.2f}"
        line += f"; XLA counts {xla} GFLOP/step/device"
    if case.model_flops is not None:
        line += f"; model {case.model_flops / 1e9:.2f} GFLOP/step/device ({case.forwards})"
        if peak is None:
            line += f"; MFU: peak unknown ({device.platform}: {device.device_kind})"
        else:
            mfu = case.model_flops / jax_t.median / peak
            line += f"; MFU {100 * mfu:.1f}% of {peak / 1e12:.3g} TFLOP/s (assumed dense bf16 peak)"
    memory = None
    if case.show_mfu:
        memory = peak_memory_gib()
        line += "; peak memory " + ("unknown (not reported on this device)" if memory is None
                                    else f"{memory:.2f} GiB on device 0")
    print(line, file=out)
    result = {"name": case.name, case.unit: case.count, "jax_median_s": jax_t.median, "jax_compile_s": jax_t.compile_s,
              "jax_flops": jax_t.flops, "model_flops": case.model_flops, "mfu": mfu, "devices": devices,
              "peak_memory_gib": memory}
    if torch_t is None:
        print(f"{case.name} [torch] skipped: {torch_note}", file=out)
        return result
    ratios = [statistics.median(j) / statistics.median(t) for j, t in zip(jax_t.rounds, torch_t.rounds,
                                                                          strict=True)]
    ratio = statistics.median(ratios)
    print(f"{case.name} [torch] {case.call} median {_ms(torch_t.median)} (min {_ms(min(torch_t.all))}, "
          f"n={len(torch_t.all)}); {case.count / torch_t.median:.2f} {case.unit}/s; {torch_note}", file=out)
    print(f"{case.name} ratio jax/torch = {ratio:.2f} (median of rounds: "
          f"{' '.join(f'{r:.2f}' for r in ratios)}; time per {case.call}, below 1: JAX faster)", file=out)
    return {**result, "torch_median_s": torch_t.median, "ratio": ratio, "round_ratios": ratios}


def print_attention_kernels(out) -> None:
    from dpojax.models.attention_kernels import CHOSEN

    for (requested, used), reason in sorted(CHOSEN.items()):
        print(f"attention kernel: {used} (requested {requested}; {reason})", file=out)
    CHOSEN.clear()


def _not_importable(err: ImportError) -> str:
    if isinstance(err, ModuleNotFoundError) and err.name:
        return f"{err.name} is not installed"
    return " ".join(str(err).split())


def _torch_module(name: str = "dpojax.bench_torch", extras: str = "torch and diffusers"):
    """The PyTorch side ``name``, or (None, reason) when what it imports is not installed."""
    try:  # import_module, not `from dpojax import`: that finds a stale package attribute after a failed import
        module = importlib.import_module(name)
    except ImportError as err:
        return None, f"PyTorch side not timed ({_not_importable(err)}; `pip install dpojax[test]` adds {extras})"
    return module, None


def check_counts(iters: int, warmup: int, rounds: int, d3po_k: int = 0) -> None:
    if iters < 1 or rounds < 1 or warmup < 0 or d3po_k < 0:
        raise ValueError(f"bench: --iters ({iters}) and --rounds ({rounds}) must be >= 1, --warmup ({warmup}) "
                         f"and --d3po-k ({d3po_k}) >= 0")


def run_bench(config: Config, *, iters: int = 10, warmup: int = 2, rounds: int = 3, encode: bool = False,
              d3po_k: int = 2, with_torch: bool = True, random: bool = False, peak_tflops: float | None = None,
              out=None) -> list[dict]:
    """Benchmark the steps ``config`` describes; prints one block per step and returns the numbers. ``random``:
    random weights on the architecture of ``model.pretrained`` (config files suffice); ``peak_tflops``: the
    device peak MFU is taken against, instead of the known devices' table."""
    out = out or sys.stdout
    check_counts(iters, warmup, rounds, d3po_k)
    if config.objective != "dpo":
        raise ValueError(f"bench: give a DPO config (objective dpo): the D3PO step is timed on its models and "
                         f"pairs; got objective {config.objective!r}")
    if d3po_k > config.d3po.num_steps:
        raise ValueError(f"bench: --d3po-k {d3po_k} is more than d3po.num_steps={config.d3po.num_steps}")
    if peak_tflops is not None and peak_tflops <= 0:
        raise ValueError(f"bench: --peak-tflops must be > 0, got {peak_tflops}")
    config = bench_config(config, d3po_k)
    setup = bench_setup(config, random)
    pairs = config.dpo.pairs_per_device * setup.batch_devices
    device = jax.devices()[0]
    threads = thread_count()
    print(f"dpojax bench: {config.model.pretrained} on {len(setup.mesh.devices.flat)} x {device.device_kind} "
          f"({device.platform}), {threads} CPU threads; {pairs} pairs, {config.data.resolution} px, "
          f"compute {config.model.dtype}, params {config.model.param_dtype}, reference {config.model.reference_dtype}, "
          f"optimizer {config.optim.name}, attention {config.model.attention}, remat {config.model.remat}, "
          f"{'random' if random else 'pretrained'} weights", file=out)
    bench_torch, torch_note = _torch_module() if with_torch else (None, "--no-torch")
    torch_runner = None
    if bench_torch is not None:
        from dpojax.bench_torch_scorers import torch_device

        torch_runner = bench_torch.TorchRunner(config, threads, device=torch_device(jax.default_backend()),
                                               random=random)

    image_flops = unet_image_flops(setup)
    peak = peak_tflops * 1e12 if peak_tflops else None
    results = []

    def run_case(case: Case, forwards_per_pair: int, torch_step) -> None:
        set_model_flops(case, setup, forwards_per_pair, image_flops)
        case.torch_call = torch_step
        timings = _run_rounds(case, iters, warmup, rounds)
        note = torch_note if torch_runner is None else torch_runner.describe()  # with its peak memory by now
        results.append(report(case, *timings, note, out, peak=peak))
        print_attention_kernels(out)

    cases = [("DPO step (UNets only: cached latents + text embeddings)", False)]
    if encode:
        cases.append(("DPO step (with VAE + text encoding)", True))
    for name, with_encoding in cases:
        batch = dpo_inputs(setup.components, config, pairs, with_encoding)
        run_case(dpo_case(setup, batch, name), unet_forwards_per_pair(config),
                 torch_runner and torch_runner.dpo_step(batch))
    if d3po_k and setup.components.reference is None:
        print(f"D3PO step skipped: loss.type {config.loss.type!r} loads no reference UNet", file=out)
    elif d3po_k:
        batch = d3po_inputs(setup.components, config, pairs)
        run_case(d3po_case(setup, batch), unet_forwards_per_pair(config, d3po_positions(config)),
                 torch_runner and torch_runner.d3po_step(batch))
    return results


# --- the scorers -----------------------------------------------------------------------------------------------

# Of varied length: empty, a few words, and one past CLIP's 77 tokens and ImageReward's 35 (truncated).
SCORER_PROMPTS = (PROMPT, "a cat", "", "an astronaut riding a horse on the moon, oil painting, dramatic light",
                  "a busy street market at dusk, lanterns and crowds, " * 10, "Tom & Jerry's house, 4K!")


def scorer_inputs(count: int, size: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """``count`` random uint8 ``size`` x ``size`` images and the fixed prompts, cycled."""
    images = np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)
    return images, [SCORER_PROMPTS[i % len(SCORER_PROMPTS)] for i in range(count)]


def scorer_options(config: Config, specs: list[str], cli_options: dict, images: int, size: int) -> dict:
    """The model files of the config's ``scorers`` section, with the ``--scorer-option`` ones over them; the
    arguments checked."""
    from dpojax.scorers.registry import check_options_taken, config_files

    if images < 1 or size < 1:
        raise ValueError(f"bench: --scorer-images ({images}) and --scorer-size ({size}) must be >= 1")
    try:
        check_options_taken(specs, cli_options)
    except ValueError as err:
        raise ValueError(f"bench: {err}") from None
    return {**config_files(config.scorers), **cli_options}


def scorer_case(spec: str, options: dict, images: np.ndarray, prompts: list[str]) -> tuple[Case, np.ndarray, int]:
    """(the case calling the JAX scorer ``spec`` on ``images``, its scores, its batch size)."""
    from dpojax.scorers.base import score_images
    from dpojax.scorers.registry import make_scorer, options_taken

    try:
        scorer = make_scorer(spec, **options_taken(spec, options))
    except ValueError as err:
        where = " (give it with --scorer-option KEY=VALUE or in the config's scorers section)"
        raise ValueError(f"bench: {err}{where if ' needs ' in str(err) else ''}") from None
    start = time.perf_counter()
    scores = score_images(scorer, images, prompts)
    first = time.perf_counter() - start
    case = Case(f"scorer {spec}", len(images), lambda: scorer(images, prompts), first, None, unit="images",
                call="call", compile_label="first call (compiles)", show_mfu=False)
    return case, scores, getattr(scorer.fn, "batch_size", len(images))


def torch_scorer(torch_side, spec: str, options: dict, batch_size: int, images: np.ndarray, prompts: list[str],
                 jax_scores: np.ndarray):
    """(the PyTorch original's call or None, what it runs or why not)."""
    from dpojax.scorers.registry import options_taken

    device = torch_side.torch_device(jax.default_backend())
    try:
        original = torch_side.original(spec, options_taken(spec, options), batch_size=batch_size, device=device)
    except ImportError as err:
        return None, f"PyTorch side not timed ({_not_importable(err)}; {torch_side.NEEDS.get(spec, '')})"
    if original is None:
        return None, "no PyTorch original (not one of the model-based built-in scorers)"
    expected = original(images, prompts)
    diff = np.linalg.norm(jax_scores.reshape(expected.shape) - expected) / max(np.linalg.norm(expected), 1e-12)
    return (lambda: original(images, prompts)), f"{original.describe()}; scores differ from JAX's by {diff:.1e}"


def run_scorer_bench(config: Config, specs: list[str], cli_options: dict, *, images: int = 32, size: int = 512,
                     iters: int = 10, warmup: int = 2, rounds: int = 3, with_torch: bool = True,
                     out=None) -> list[dict]:
    """Time each scorer of ``specs`` (JAX, then its PyTorch original) on the same random images and prompts;
    prints one block per scorer and returns the numbers."""
    out = out or sys.stdout
    check_counts(iters, warmup, rounds)
    options = scorer_options(config, specs, cli_options, images, size)
    pixels, prompts = scorer_inputs(images, size)
    device, threads = jax.devices()[0], thread_count()
    print(f"dpojax bench scorers: {images} random {size}x{size} images, {len(SCORER_PROMPTS)} prompts of "
          f"{min(map(len, SCORER_PROMPTS))} to {max(map(len, SCORER_PROMPTS))} characters; JAX on 1 x "
          f"{device.device_kind} ({device.platform}), {threads} CPU threads", file=out)
    torch_side, skipped = (_torch_module("dpojax.bench_torch_scorers", "torch") if with_torch
                           else (None, "--no-torch"))
    if torch_side is not None:
        torch_side.use_threads(threads)
    results = []
    for spec in specs:
        case, scores, batch_size = scorer_case(spec, options, pixels, prompts)
        note = skipped
        if torch_side is not None:
            case.torch_call, note = torch_scorer(torch_side, spec, options, batch_size, pixels, prompts, scores)
        results.append(report(case, *_run_rounds(case, iters, warmup, rounds), note, out))
        del case  # both models go before the next scorer's load
    return results


def report_loader(config: Config, batches: int, warmup: int, dpo_step: dict | None, out) -> None:
    """Print the input pipeline's pairs/s (all processes), beside what the timed DPO step consumes."""
    from dpojax.data.rate import measure_loader

    per_process = (config.dpo.pairs_per_device * parallel.batch_devices(bench_mesh(config))
                   // jax.process_count())
    rate = measure_loader(config, per_process, batches, warmup)
    pairs_per_second = rate.pairs_per_second * jax.process_count()
    line = (f"input pipeline [{rate.source}] {pairs_per_second:.2f} pairs/s ({rate.batches} batches of "
            f"{rate.pairs_per_batch} pairs per process, {rate.seconds:.3f} s)")
    if dpo_step is not None:
        needed = dpo_step["pairs"] / dpo_step["jax_median_s"]
        line += (f"; the DPO step takes {needed:.2f} pairs/s: the loader "
                 + (f"keeps up ({pairs_per_second / needed:.1f}x)" if pairs_per_second >= needed
                    else f"starves it ({pairs_per_second / needed:.2f}x)"))
    print(line, file=out)


def cmd_bench(args) -> int:
    from dpojax.config import load_config
    from dpojax.scorers.registry import parse_options, split_specs

    config = load_config(args.config, args.overrides)
    specs = [] if args.scorers is None else split_specs(args.scorers)
    options = parse_options(args.scorer_option)
    if args.scorers_only and not specs:
        raise ValueError("bench: --scorers-only needs --scorers")
    if args.loader < 0:
        raise ValueError(f"bench: --loader must be >= 0 batches (0: not timed), got {args.loader}")
    if args.loader_only and not args.loader:
        raise ValueError("bench: --loader-only needs --loader BATCHES")
    if specs:  # a wrong argument fails now, not after the steps have run
        check_counts(args.iters, args.warmup, args.rounds)
        scorer_options(config, specs, options, args.scorer_images, args.scorer_size)
    steps = []
    if not (args.scorers_only or args.loader_only):
        steps = run_bench(config, iters=args.iters, warmup=args.warmup, rounds=args.rounds, encode=args.encode,
                          d3po_k=args.d3po_k, with_torch=not args.no_torch, random=args.random_weights,
                          peak_tflops=args.peak_tflops)
    if args.loader:
        report_loader(config, args.loader, args.warmup, steps[0] if steps else None, sys.stdout)
    if specs:
        run_scorer_bench(config, specs, options, images=args.scorer_images, size=args.scorer_size, iters=args.iters,
                         warmup=args.warmup, rounds=args.rounds, with_torch=not args.no_torch)
    return 0


def register_cli(subparsers) -> None:
    """Add ``bench`` to the ``dpojax`` parser."""
    p = subparsers.add_parser("bench", help="time the DPO and D3PO training steps and the scorers (JAX) against "
                                            "their PyTorch originals on the same inputs; pairs/s or images/s, "
                                            "compile time, MFU")
    p.add_argument("config", help="YAML file, e.g. configs/tiny_sdxl_dpo.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. dpo.pairs_per_device=4")
    p.add_argument("--iters", type=int, default=10, help="timed calls per round (default 10)")
    p.add_argument("--rounds", type=int, default=3, help="rounds alternating JAX and PyTorch blocks (default 3)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls first (default 2)")
    p.add_argument("--encode", action="store_true", help="also time the DPO step with VAE and text encoding")
    p.add_argument("--d3po-k", type=int, default=2, help="denoising steps per D3PO update (0: skip D3PO; default 2)")
    p.add_argument("--no-torch", action="store_true", help="time the JAX side only")
    p.add_argument("--random-weights", action="store_true",
                   help="random weights on the architecture of model.pretrained (its config files suffice, e.g. "
                        "dpojax/arch/sdxl-base-1.0); both sides")
    p.add_argument("--peak-tflops", type=float,
                   help="the device's peak in TFLOP/s for MFU (default: known GPUs' and TPUs' dense bf16 peak)")
    p.add_argument("--scorers", metavar="SPEC[,SPEC...]",
                   help="also time these scorers, e.g. pickscore,aesthetic,hps,imagereward (files from the config's "
                        "scorers section or --scorer-option)")
    p.add_argument("--scorer-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a scorer's model file or batch size, e.g. pickscore_model=DIR, head=FILE, batch_size=16; "
                        "repeatable")
    p.add_argument("--scorer-images", type=int, default=32, help="random images per scorer call (default 32)")
    p.add_argument("--scorer-size", type=int, default=512, help="their side in pixels (default 512)")
    p.add_argument("--scorers-only", action="store_true", help="skip the training steps (no pipeline is loaded)")
    p.add_argument("--loader", type=int, default=0, metavar="BATCHES",
                   help="also time the training input pipeline alone over this many batches (the config's data: "
                        "JPEG decode and crop, or the latent cache); 0: not timed")
    p.add_argument("--loader-only", action="store_true", help="time only the input pipeline (no model is loaded)")
    p.set_defaults(run=cmd_bench)
