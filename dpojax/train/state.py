"""What the offline trainer holds: the trainable state, the frozen parameter trees and their static graphs.

The hot loop is functional: every model is ``nnx.split`` once into a static ``GraphDef`` (kept in
:class:`Components`) and a parameter tree, stored as a plain nested dict so that optax, orbax and jit all see
the same simple pytree. The policy UNet's fp32 master weights live in :class:`TrainState` with the optimizer
state; the reference UNet (a second copy of the *initial* weights, in ``model.reference_dtype``), the VAE and
the text encoders are frozen trees that are never differentiated, never optimized and never checkpointed:
a resumed run reloads them from ``model.pretrained``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from transformers import CLIPTokenizer

from dpojax import schedule as sched
from dpojax.config import Config, ConfigError
from dpojax.losses import REFERENCE_FREE_LOSSES

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
PIPELINE_ARCH = {"StableDiffusionPipeline": ("sd15", "sd2"), "StableDiffusionXLPipeline": ("sdxl",)}
REMAT = {"none": False, "full": True}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything a checkpoint must hold to continue a run exactly (besides the data-iterator state)."""

    step: jax.Array  # () int32, optimizer steps taken
    params: Any  # policy UNet parameters, nested dict
    opt_state: Any
    key: jax.Array  # (2,) uint32 raw PRNG key; per-step keys are folded in from the step number


@dataclasses.dataclass(frozen=True)
class Components:
    """The static half of the models (graphs, tokenizers, schedule) and the facts the step needs."""

    unet: nnx.GraphDef
    reference: nnx.GraphDef | None  # None for reference-free losses
    vae: nnx.GraphDef
    text_encoder: nnx.GraphDef
    text_encoder_2: nnx.GraphDef | None  # SDXL only
    tokenizer: CLIPTokenizer
    tokenizer_2: CLIPTokenizer | None
    schedule: sched.NoiseSchedule
    vae_scaling_factor: float
    vae_shift_factor: float | None
    latent_channels: int
    vae_scale_factor: int  # pixels per latent cell
    is_sdxl: bool
    compute_dtype: Any
    unet_config: dict


def split_params(module: nnx.Module) -> tuple[nnx.GraphDef, dict]:
    """(graph, plain nested dict of parameters); the models hold nothing but ``nnx.Param`` state."""
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise TypeError(f"{type(module).__name__} holds non-parameter state; the trainer cannot split it")
    return graphdef, nnx.to_pure_dict(params)


def read_pipeline_arch(folder: Path, requested: str) -> bool:
    """Whether ``folder`` is an SDXL pipeline; checks ``model.arch`` against the folder's model_index.json."""
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise FileNotFoundError(f"model.pretrained={str(folder)!r} has no model_index.json "
                                f"(not a diffusers pipeline folder)")
    class_name = json.loads(index_path.read_text()).get("_class_name")
    if class_name not in PIPELINE_ARCH:
        raise ValueError(f"{index_path}: pipeline class {class_name!r} is not supported "
                         f"(choose one of {', '.join(PIPELINE_ARCH)})")
    if requested != "auto" and requested not in PIPELINE_ARCH[class_name]:
        raise ConfigError(f"config: model.arch={requested!r} does not match {folder} ({class_name})")
    return class_name == "StableDiffusionXLPipeline"


def check_supported(config: Config) -> None:
    """One-line errors for settings this trainer does not implement yet."""
    if config.model.pretrained is None:
        raise ConfigError("config: model.pretrained must name a local diffusers pipeline folder, got null")
    if config.model.lora_rank:
        raise ConfigError(f"config: model.lora_rank={config.model.lora_rank} is not supported by the "
                          f"offline trainer yet (use 0: full fine-tuning)")
    if config.model.remat not in REMAT:
        raise ConfigError(f"config: model.remat={config.model.remat!r} is not supported by the UNet "
                          f"(choose one of {', '.join(REMAT)})")


def load_encoders(config: Config, mesh: jax.sharding.Mesh, is_sdxl: bool):
    """The frozen VAE and text encoder(s) of ``model.pretrained`` (or ``model.vae``), sharded over ``mesh``.

    Returns (vae module, (vae, text_encoder, text_encoder_2 or None) graphs, params dict keyed by those names).
    """
    from dpojax.models.clip_text import CLIPTextModel, CLIPTextModelWithProjection
    from dpojax.models.vae import AutoencoderKL

    folder = Path(config.model.pretrained)
    load = dict(dtype=DTYPES[config.model.reference_dtype], compute_dtype=DTYPES[config.model.dtype], mesh=mesh)
    params: dict[str, dict] = {}
    vae_folder, vae_sub = (config.model.vae, None) if config.model.vae else (folder, "vae")
    vae = AutoencoderKL.from_pretrained(vae_folder, vae_sub, **load)
    vae_graph, params["vae"] = split_params(vae)
    te_graph, params["text_encoder"] = split_params(CLIPTextModel.from_pretrained(folder, "text_encoder", **load))
    te2_graph = None
    if is_sdxl:
        te2_graph, params["text_encoder_2"] = split_params(
            CLIPTextModelWithProjection.from_pretrained(folder, "text_encoder_2", **load))
    return vae, (vae_graph, te_graph, te2_graph), params


def load_components(config: Config, mesh: jax.sharding.Mesh) -> tuple[Components, dict, dict]:
    """Load every model of ``model.pretrained`` sharded over ``mesh``.

    Returns (components, policy params, frozen params); frozen holds "vae", "text_encoder",
    ("text_encoder_2",) and, unless the loss is reference-free, "reference".
    """
    from dpojax.models.unet import UNet2DConditionModel

    check_supported(config)
    folder = Path(config.model.pretrained)
    is_sdxl = read_pipeline_arch(folder, config.model.arch)
    compute = DTYPES[config.model.dtype]
    frozen_dtype = DTYPES[config.model.reference_dtype]
    load = dict(compute_dtype=compute, mesh=mesh)

    policy = UNet2DConditionModel.from_pretrained(folder, "unet", dtype=DTYPES[config.model.param_dtype],
                                                  remat=REMAT[config.model.remat], **load)
    unet_graph, policy_params = split_params(policy)
    frozen: dict[str, dict] = {}
    reference_graph = None
    if config.loss.type not in REFERENCE_FREE_LOSSES:
        reference_graph, frozen["reference"] = split_params(
            UNet2DConditionModel.from_pretrained(folder, "unet", dtype=frozen_dtype, **load))
    vae, (vae_graph, te_graph, te2_graph), encoder_params = load_encoders(config, mesh, is_sdxl)
    frozen.update(encoder_params)
    schedule = sched.NoiseSchedule.from_config(
        json.loads((folder / "scheduler" / "scheduler_config.json").read_text()))
    components = Components(
        unet=unet_graph, reference=reference_graph, vae=vae_graph, text_encoder=te_graph,
        text_encoder_2=te2_graph, tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(folder / "tokenizer_2") if is_sdxl else None,
        schedule=schedule, vae_scaling_factor=vae.scaling_factor, vae_shift_factor=vae.shift_factor,
        latent_channels=vae.config["latent_channels"],
        vae_scale_factor=2 ** (len(vae.config["block_out_channels"]) - 1), is_sdxl=is_sdxl,
        compute_dtype=compute, unet_config=dict(policy.config))
    return components, policy_params, frozen


def shardings_of(tree):
    """The sharding of every array of ``tree`` (arrays already placed on the mesh)."""
    return jax.tree.map(lambda x: x.sharding, tree)
