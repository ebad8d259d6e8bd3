"""What the offline trainer holds: the trainable state, the frozen parameter trees and their static graphs.

The hot loop is functional: every model is ``nnx.split`` once into a static ``GraphDef`` (kept in
:class:`Components`) and a parameter tree, stored as a plain nested dict so that optax, orbax and jit all see
the same simple pytree. The policy UNet's fp32 master weights live in :class:`TrainState` with the optimizer
state; the reference UNet (a second copy of the *initial* weights, in ``model.reference_dtype``), the VAE and
the text encoders are frozen trees that are never differentiated, never optimized and never checkpointed:
a resumed run reloads them from ``model.pretrained``.

LoRA (``model.lora_rank`` > 0): the trainable params are the adapters alone (fp32, ``dpojax.models.lora``);
the pretrained UNet is loaded once, in ``model.reference_dtype``, as ``frozen["reference"]``. The policy is
``components.unet`` (the UNet with adapters) over those base weights plus the adapters
(:func:`policy_unet_params`); the reference is ``components.reference`` (the same UNet without adapters) over
the same base weights: adapters off, no second copy.
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

from dpojax import parallel
from dpojax import schedule as sched
from dpojax.config import Config, ConfigError, ModelConfig
from dpojax.losses import REFERENCE_FREE_LOSSES
from dpojax.models.lora import LoRASpec, add_lora, init_adapters, split_adapters, with_adapters

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
PIPELINE_ARCH = {"StableDiffusionPipeline": ("sd15", "sd2"), "StableDiffusionXLPipeline": ("sdxl",)}
# model.remat -> the UNet's remat: off; each down/mid/up block keeps only its inputs; each resnet and transformer
# layer keeps only its inputs; or also its matmul results
REMAT = {"none": False, "block": "block", "full": True, "dots_saveable": jax.checkpoint_policies.dots_saveable}
LORA_INIT_STREAM = 0x6C6F7261  # folded into the run's seed for the adapters' initial values ("lora")


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
    lora: LoRASpec | None = None  # set: the policy is frozen["reference"] plus trainable adapters


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


def with_attention_kernel(components: Components, params: dict, frozen: dict, kernel: str,
                          mesh: jax.sharding.Mesh) -> Components:
    """``components`` whose UNet and VAE graphs use attention ``kernel`` (``model.attention``; see
    attention_kernels); "auto" is what the models are built with, so they are returned as they are."""
    from dpojax.models.attention import configure_attention

    if kernel == "auto":
        return components

    def configured(graph, tree):
        return None if graph is None else split_params(configure_attention(nnx.merge(graph, tree), kernel, mesh))[0]

    return dataclasses.replace(components, unet=configured(components.unet, policy_unet_params(components, params,
                                                                                               frozen)),
                               reference=configured(components.reference, frozen.get("reference")),
                               vae=configured(components.vae, frozen["vae"]))


def load_components(config: Config, mesh: jax.sharding.Mesh) -> tuple[Components, dict, dict]:
    """Load every model of ``model.pretrained`` sharded over ``mesh``.

    Returns (components, policy params, frozen params); frozen holds "vae", "text_encoder",
    ("text_encoder_2",) and, unless the loss is reference-free, "reference". With LoRA the policy params are
    the adapters and "reference" (always present) holds the base UNet they adapt.
    """
    from dpojax.models.unet import UNet2DConditionModel

    check_supported(config)
    folder = Path(config.model.pretrained)
    is_sdxl = read_pipeline_arch(folder, config.model.arch)
    compute = DTYPES[config.model.dtype]
    frozen_dtype = DTYPES[config.model.reference_dtype]
    load = dict(compute_dtype=compute, mesh=mesh)

    spec = lora_spec(config.model)
    frozen: dict[str, dict] = {}
    reference_graph = None
    if spec is not None:  # one frozen copy of the base weights serves the reference and the policy
        base = UNet2DConditionModel.from_pretrained(folder, "unet", dtype=frozen_dtype, **load)
        unet_config = dict(base.config)
        reference_graph, frozen["reference"] = split_params(base)
        unet_graph, abstract = abstract_lora_policy(unet_config, spec, config.model, compute)
        shardings = split_adapters(nnx.to_pure_dict(parallel.state_shardings(abstract, mesh)))[1]
        abstract_adapters = split_adapters(nnx.to_pure_dict(abstract))[1]
        key = jax.random.fold_in(jax.random.key(config.train.seed), LORA_INIT_STREAM)
        policy_params = jax.jit(lambda k: init_adapters(abstract_adapters, spec.rank, k),
                                out_shardings=shardings)(key)
    else:
        policy = UNet2DConditionModel.from_pretrained(folder, "unet", dtype=DTYPES[config.model.param_dtype],
                                                      remat=REMAT[config.model.remat], **load)
        unet_config = dict(policy.config)
        unet_graph, policy_params = split_params(policy)
        if config.objective == "d3po" or config.loss.type not in REFERENCE_FREE_LOSSES:
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
        compute_dtype=compute, unet_config=unet_config, lora=spec)
    components = with_attention_kernel(components, policy_params, frozen, config.model.attention, mesh)
    return components, policy_params, frozen


def lora_spec(model: ModelConfig) -> LoRASpec | None:
    """The adapters ``model.lora_*`` ask for; None for full fine-tuning (rank 0). Alpha defaults to the rank
    (scale 1), as in PEFT and diffusers."""
    if not model.lora_rank:
        return None
    alpha = float(model.lora_rank) if model.lora_alpha is None else model.lora_alpha
    return LoRASpec(model.lora_rank, alpha, tuple(model.lora_targets))


def abstract_lora_policy(unet_config: dict, spec: LoRASpec, model: ModelConfig,
                         compute_dtype=None) -> tuple[nnx.GraphDef, nnx.State]:
    """The graph of the UNet with adapters and its abstract parameter state (shapes, dtypes, logical axes):
    base weights in ``model.reference_dtype``, adapters in ``model.param_dtype``."""
    from dpojax.models.unet import UNet2DConditionModel
    from dpojax.weights.io import abstract_module

    problems = []

    def adapt(unet, rngs):  # errors are raised after the abstract evaluation, which would add lines to them
        try:
            return add_lora(unet, spec, rngs=rngs, lora_param_dtype=DTYPES[model.param_dtype])
        except ValueError as err:
            problems.append(err)
            return unet

    unet = abstract_module(UNet2DConditionModel, unet_config, adapt=adapt, dtype=compute_dtype,
                           param_dtype=DTYPES[model.reference_dtype], remat=REMAT[model.remat])
    if problems:
        raise ConfigError(f"config: model.lora_targets: {problems[0]}")
    return nnx.split(unet, nnx.Param)


def policy_unet_params(components: Components, params, frozen: dict):
    """The whole parameter tree of the policy UNet ``components.unet``: ``params`` themselves, or with LoRA
    the frozen base weights ``frozen["reference"]`` plus the adapters ``params`` (gradients reach only them)."""
    return params if components.lora is None else with_adapters(frozen["reference"], params)


def shardings_of(tree):
    """The sharding of every array of ``tree`` (arrays already placed on the mesh)."""
    return jax.tree.map(lambda x: x.sharding, tree)
