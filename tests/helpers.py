"""Helpers the test modules share (imported by them, not a test): parity against PyTorch, error measures,
subprocess runs of the ``dpojax`` command, and measurements of a trained model."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
from collections.abc import Iterable
from io import BytesIO
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from PIL import Image

from dpojax import parallel
from dpojax import schedule as sched
from dpojax.components import Components, policy_unet_params
from dpojax.diffusers_folder import PipelineFolder
from dpojax.tiny import SCHEDULER
from dpojax.train.step import denoiser_mse, host_batch, micro_batch_inputs, winners_first
from dpojax.weights import io, naming

REPO = Path(__file__).resolve().parents[1]
D3PO_CONFIG = REPO / "configs" / "tiny_d3po_brightness.yaml"  # the D3PO demo: brighter images win


# --- parity with the PyTorch originals ----------------------------------------------------------------------

def perturb_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Add seeded noise to every parameter so that no weight is at its init value (zeros, ones) and a
    parameter that is loaded into the wrong place, or ignored, changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            scale = p.std().item() if p.numel() > 1 and p.std().item() > 0 else 0.1
            p.add_(0.5 * scale * torch.randn(p.shape, generator=gen))
    return module


def numpy_state_dict(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def load_from_torch(cls: type, config: dict, torch_module: torch.nn.Module, **kwargs) -> nnx.Module:
    """``cls.from_config(config, **kwargs)`` built abstractly (not initialised), then given torch weights."""
    model = io.abstract_module(cls, config, **kwargs)
    naming.load_state_dict(model, numpy_state_dict(torch_module))
    return model


def grads_as_torch(grads: nnx.State) -> dict[str, np.ndarray]:
    """NNX gradient state in PyTorch keys and layouts (the same rule as the weights)."""
    out = {}
    for path, var in nnx.to_flat_state(grads):
        value = np.asarray(var.get_value())
        perm = naming.to_torch_perm(path, value.ndim)
        out[naming.torch_key(path)] = value.transpose(perm) if perm else value
    return out


def rel_err(actual, expected) -> float:
    """Relative L2 error ||actual - expected|| / ||expected||, in float64."""
    expected = np.asarray(expected, dtype=np.float64)
    return float(np.linalg.norm(np.asarray(actual, dtype=np.float64) - expected)
                 / max(np.linalg.norm(expected), 1e-12))


def policy_and_nearby_reference(distance: float):
    """A perturbed tiny SDXL torch UNet as the policy and a copy moved by ``distance`` (relative to each weight's
    spread) as the reference, with their JAX (graph, params) splits: (policy, reference, policy split,
    reference split)."""
    from diffusers import UNet2DConditionModel as TorchUNet

    from dpojax.components import split_params
    from dpojax.models import UNet2DConditionModel
    from dpojax.tiny import UNET_SDXL

    torch.manual_seed(0)
    policy = perturb_(TorchUNet(**UNET_SDXL), seed=1).eval()
    reference = TorchUNet(**UNET_SDXL).eval()
    reference.load_state_dict(policy.state_dict())
    with torch.no_grad():
        gen = torch.Generator().manual_seed(2)
        for p in reference.parameters():
            p.add_(distance * p.std().nan_to_num(0.1) * torch.randn(p.shape, generator=gen))
    return (policy, reference, split_params(load_from_torch(UNet2DConditionModel, UNET_SDXL, policy)),
            split_params(load_from_torch(UNet2DConditionModel, UNET_SDXL, reference)))


def unet_only_components(policy_graph, reference_graph) -> Components:
    """SDXL-shaped Components with the UNets and schedule only: the objectives need nothing else."""
    fields = {f.name: None for f in dataclasses.fields(Components)}
    folder = PipelineFolder(path=Path("."), class_name="StableDiffusionXLPipeline",
                            scheduler=sched.NoiseSchedule.from_config(SCHEDULER), tokenizer=None, tokenizer_2=None,
                            force_zeros_for_empty_prompt=True)
    return Components(**{**fields, "folder": folder, "unet": policy_graph, "reference": reference_graph,
                         "compute_dtype": jnp.float32})


def patterned_images(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 (n, height, width, 3): smooth patterns plus noise, so resizing matters and JPEG sizes differ."""
    y, x = np.mgrid[:height, :width]
    rng = np.random.RandomState(seed)
    out = []
    for i in range(n):
        base = np.stack([127 + 100 * np.sin(x / (3 + i) + c) * np.cos(y / (5 + c)) for c in range(3)], -1)
        out.append(np.clip(base + rng.randn(height, width, 3) * 15 * i, 0, 255))
    return np.stack(out).astype(np.uint8)


# --- Pick-a-Pic shards and prepared datasets ---------------------------------------------------------------

def decode_image(data: bytes) -> np.ndarray:
    """An encoded image's RGB pixels."""
    return np.asarray(Image.open(BytesIO(data)).convert("RGB"))


def shard_rows(src: Path, split: str = "train") -> list[dict]:
    """Every row of a Pick-a-Pic-schema split's parquet shards."""
    import pyarrow.parquet as pq

    from dpojax.data.schema import split_files

    return [row for path in split_files(src, split) for row in pq.read_table(path).to_pylist()]


def prepared_examples(report, split: str = "train") -> list[dict]:
    """Every example of a ``dpojax data prepare`` dataset (its report) split."""
    import tensorflow_datasets as tfds

    source = tfds.data_source(report.dataset_name, split=split, data_dir=str(report.data_dir.parents[2]))
    return [source[i] for i in range(len(source))]


# --- the dpojax command in a subprocess ---------------------------------------------------------------------

def pairs_workdir(root: Path, tiny: Path, rows: int, *, eval_rows: int, image_size: int = 32,
                  splits=None) -> Path:
    """``root`` holding the tiny pipeline (``root/tiny-sdxl``) and prepared synthetic pairs (``root/pairs``)."""
    from dpojax.data.pickapic import prepare_pickapic
    from dpojax.data.synth import write_synthetic_pickapic

    (root / "tiny-sdxl").symlink_to(tiny)
    write_synthetic_pickapic(root / "synth", rows, seed=0, image_size=image_size, eval_rows=eval_rows)
    prepare_pickapic(root / "synth", root / "pairs", **({} if splits is None else {"splits": splits}))
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_env(workdir: Path, devices: int = 1) -> dict[str, str]:
    """The environment of a ``dpojax`` subprocess: ``devices`` fake CPU devices and a compilation cache in
    ``workdir`` shared by the runs of a test module (only the first run of each program compiles); the tests
    folder is importable (scorers given by import path)."""
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu",
            "JAX_COMPILATION_CACHE_DIR": str(workdir / "jax_cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
            "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}


def dpojax_command(*args) -> list[str]:
    return [sys.executable, "-m", "dpojax.cli", *map(str, args)]


def run_dpojax(workdir: Path, *args, devices: int = 1, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``dpojax ARGS`` in ``workdir`` to its end, capturing its output."""
    return subprocess.run(dpojax_command(*args), env=cli_env(workdir, devices), cwd=workdir, capture_output=True,
                          text=True, timeout=timeout)


# --- measurements -------------------------------------------------------------------------------------------

def paired_change(after, before) -> tuple[float, float]:
    """Mean of the per-image differences ``after - before`` (same prompts and noise) and its standard error."""
    change = np.ravel(np.asarray(after) - np.asarray(before))
    return float(change.mean()), float(change.std(ddof=1) / len(change) ** 0.5)


def implicit_accuracy(components: Components, params, frozen: dict, batches: Iterable[dict], *, beta: float,
                      mesh, seed: int = 0, draws: int = 10) -> dict[str, float]:
    """Held-out implicit reward accuracy (the Diffusion-DPO paper's §5.5): for each pair the DPO logit
    u = (β/2)·[(m_ref^w − m_θ^w) − (m_ref^l − m_θ^l)] averaged over ``draws`` (noise, timestep) draws counts as
    correct when > 0. Returns the accuracy, mean logit, pairs and exact ties over loader ``batches``."""

    @jax.jit
    def pair_logits(params, frozen, batch, key):
        latents, noise, timesteps, cond = micro_batch_inputs(components, frozen, batch, key, 2)
        noisy = sched.add_noise(components.schedule, latents, noise, timesteps)
        target = sched.training_target(components.schedule, latents, noise, timesteps)
        policy = policy_unet_params(components, params, frozen)
        model = winners_first(denoiser_mse(components.unet, policy, components, noisy, timesteps, target, cond))
        ref = winners_first(denoiser_mse(components.reference, frozen["reference"], components, noisy,
                                         timesteps, target, cond))
        half = model.shape[0] // 2
        return 0.5 * beta * ((ref[:half] - model[:half]) - (ref[half:] - model[half:]))

    key = jax.random.key(seed)
    logits = []
    for i, batch in enumerate(batches):
        batch = parallel.global_batch(host_batch(components, batch), mesh)
        u = sum(pair_logits(params, frozen, batch, jax.random.fold_in(key, i * draws + d))
                for d in range(draws)) / draws
        logits.append(np.asarray(jax.device_get(u)))
    u = np.concatenate(logits)
    return {"implicit_acc": float(np.mean(u > 0)), "mean_logit": float(np.mean(u)), "pairs": int(u.size),
            "ties": int(np.sum(u == 0))}
