"""The models of a pipeline folder as the trainer holds them: one loader, with a shape-only mode.

Every model is ``nnx.split`` once into a static ``GraphDef`` (kept in :class:`Components`) and a parameter
tree, a plain nested dict, so optax, orbax and jit all see one simple pytree. The policy UNet's parameters are
trained; the reference UNet (a second copy of the *initial* weights, in ``model.reference_dtype``), the VAE
and the text encoders are frozen trees, never differentiated, optimized or checkpointed.

LoRA (``model.lora_rank`` > 0): the trained parameters are the adapters alone (``dpojax.models.lora``); the
pretrained UNet is loaded once, in ``model.reference_dtype``, as ``frozen["reference"]``. The policy is
``components.unet`` (the UNet with adapters) over those base weights plus the adapters
(:func:`policy_unet_params`); the reference is ``components.reference`` (the same UNet without adapters) over
the same base weights: adapters off, no second copy.

:func:`load_components` reads weights onto their shardings, or with ``weights="frozen"`` leaves the policy
shape-only (a resumed run's checkpoint replaces it), or with ``weights="none"`` reads nothing but the
architecture configs (``dpojax plan``): shape-only trees are ``jax.ShapeDtypeStruct`` leaves carrying the
shardings the real arrays get, so the planner and the trainer agree by construction.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from dpojax import parallel
from dpojax.config import Config, ConfigError, ModelConfig
from dpojax.diffusers_folder import PipelineFolder, read_pipeline_folder
from dpojax.losses import REFERENCE_FREE_LOSSES
from dpojax.models.lora import LoRASpec, add_lora, init_adapters, split_adapters, with_adapters
from dpojax.weights.folder import component_folder, read_config

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# model.remat -> the UNet's remat: off; each down/mid/up block keeps only its inputs; each resnet and transformer
# layer keeps only its inputs; or also its matmul results
REMAT = {"none": False, "block": "block", "full": True, "dots_saveable": jax.checkpoint_policies.dots_saveable}
LORA_INIT_STREAM = 0x6C6F7261  # folded into the run's seed for the adapters' initial values ("lora")

Weights = Literal["all", "frozen", "none"]


@dataclasses.dataclass(frozen=True)
class Components:
    """The static half of the models (graphs) and the facts the steps need about them."""

    folder: PipelineFolder  # schedule, tokenizers, pipeline class
    unet: nnx.GraphDef | None  # the policy; None when only the encoders were loaded
    reference: nnx.GraphDef | None  # None for reference-free losses
    vae: nnx.GraphDef
    text_encoder: nnx.GraphDef
    text_encoder_2: nnx.GraphDef | None  # SDXL only
    vae_scaling_factor: float
    vae_shift_factor: float | None
    latent_channels: int
    vae_scale_factor: int  # pixels per latent cell
    compute_dtype: Any
    unet_config: dict | None
    lora: LoRASpec | None = None  # set: the policy is frozen["reference"] plus trainable adapters

    @property
    def is_sdxl(self) -> bool:
        return self.folder.is_sdxl

    @property
    def schedule(self):
        return self.folder.schedule


def split_params(module: nnx.Module) -> tuple[nnx.GraphDef, dict]:
    """(graph, plain nested dict of parameters); the models hold nothing but ``nnx.Param`` state."""
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise TypeError(f"{type(module).__name__} holds non-parameter state; the trainer cannot split it")
    return graphdef, nnx.to_pure_dict(params)


def shape_only(state: nnx.State, mesh: jax.sharding.Mesh) -> dict:
    """An abstract parameter state as a plain dict of ShapeDtypeStructs carrying their mesh shardings."""
    shardings = nnx.to_pure_dict(parallel.state_shardings(state, mesh))
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nnx.to_pure_dict(state),
                        shardings)


def shardings_of(tree):
    """The sharding of every leaf of ``tree`` (arrays placed on the mesh, or shape-only leaves)."""
    return jax.tree.map(lambda x: x.sharding, tree)


def needs_reference(config: Config) -> bool:
    """D3PO always compares with its reference; the offline objectives unless the loss is reference-free."""
    return config.objective == "d3po" or config.loss.type not in REFERENCE_FREE_LOSSES


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


def _load(cls, folder: Path, subfolder: str | None, mesh, *, read: bool, dtype, compute_dtype,
          **model_kwargs) -> tuple[nnx.GraphDef, dict, nnx.Module]:
    """(graph, parameters, module) of one component: read from its safetensors onto the mesh, or shapes only."""
    if read:
        module = cls.from_pretrained(folder, subfolder, dtype=dtype, compute_dtype=compute_dtype, mesh=mesh,
                                     **model_kwargs)
        return (*split_params(module), module)
    from dpojax.weights.io import abstract_module

    module = abstract_module(cls, read_config(component_folder(folder, subfolder)), dtype=compute_dtype,
                             param_dtype=dtype, **model_kwargs)
    graph, state = nnx.split(module, nnx.Param)
    return graph, shape_only(state, mesh), module


def _with_attention_kernel(components: Components, params, frozen: dict, kernel: str, mesh,
                           platform: str) -> Components:
    """``components`` whose UNet and VAE graphs use attention ``kernel`` (``model.attention``; see
    attention_kernels) as resolved for ``platform``, over ``mesh``: "auto" is configured exactly as the kernel
    it resolves to."""
    from dpojax.models.attention import configure_attention

    def configured(graph, tree):
        if graph is None:
            return None
        return split_params(configure_attention(nnx.merge(graph, tree), kernel, mesh, platform))[0]

    policy = None if components.unet is None else policy_unet_params(components, params, frozen)
    return dataclasses.replace(components, unet=configured(components.unet, policy),
                               reference=configured(components.reference, frozen.get("reference")),
                               vae=configured(components.vae, frozen["vae"]))


def load_components(config: Config, mesh: jax.sharding.Mesh, *, weights: Weights = "all", unets: bool = True,
                    folder: str | Path | None = None, platform: str | None = None) -> tuple[Components, Any, dict]:
    """The models of ``model.pretrained`` (or ``folder``) on ``mesh``: (components, policy params, frozen).
    ``platform``: the one the programs are built for (default: the mesh's; ``dpojax plan`` names an accelerator).

    ``frozen`` holds "vae", "text_encoder", ("text_encoder_2",) and, when the objective compares with a
    reference (or the run is LoRA, whose base is the reference), "reference". ``weights``: "all" reads every
    model's weights (a fresh run), "frozen" all but the policy's (a resumed run), "none" none (shapes only).
    ``unets=False`` loads the VAE and text encoders alone (the latent cache; the policy params are then None).
    """
    from dpojax.models.clip_text import CLIPTextModel, CLIPTextModelWithProjection
    from dpojax.models.unet import UNet2DConditionModel
    from dpojax.models.vae import AutoencoderKL

    model = config.model
    pipeline = read_pipeline_folder(model.pretrained if folder is None else folder, model.arch)
    path = pipeline.path
    compute, frozen_dtype = DTYPES[model.dtype], DTYPES[model.reference_dtype]
    read_frozen = weights != "none"
    frozen: dict[str, Any] = {}
    unet_graph = reference_graph = unet_config = params = None
    spec = lora_spec(model) if unets else None
    if spec is not None:  # one frozen copy of the base weights serves the reference and the policy
        reference_graph, frozen["reference"], base = _load(UNet2DConditionModel, path, "unet", mesh,
                                                           read=read_frozen, dtype=frozen_dtype, compute_dtype=compute)
        unet_config = dict(base.config)
        unet_graph, lora_state = abstract_lora_policy(unet_config, spec, model, compute)
        params = abstract_adapters = split_adapters(shape_only(lora_state, mesh))[1]
        if weights == "all":
            key = jax.random.fold_in(jax.random.key(config.train.seed), LORA_INIT_STREAM)
            params = jax.jit(lambda k: init_adapters(abstract_adapters, spec.rank, k),
                             out_shardings=shardings_of(abstract_adapters))(key)
    elif unets:
        unet_graph, params, policy = _load(UNet2DConditionModel, path, "unet", mesh, read=weights == "all",
                                           dtype=DTYPES[model.param_dtype], compute_dtype=compute,
                                           remat=REMAT[model.remat])
        unet_config = dict(policy.config)
        if needs_reference(config):
            reference_graph, frozen["reference"], _ = _load(UNet2DConditionModel, path, "unet", mesh,
                                                            read=read_frozen, dtype=frozen_dtype,
                                                            compute_dtype=compute)
    encoder = dict(read=read_frozen, dtype=frozen_dtype, compute_dtype=compute)
    vae_folder, vae_sub = (Path(model.vae), None) if model.vae else (path, "vae")
    vae_graph, frozen["vae"], vae = _load(AutoencoderKL, vae_folder, vae_sub, mesh, **encoder)
    te_graph, frozen["text_encoder"], _ = _load(CLIPTextModel, path, "text_encoder", mesh, **encoder)
    te2_graph = None
    if pipeline.is_sdxl:
        te2_graph, frozen["text_encoder_2"], _ = _load(CLIPTextModelWithProjection, path, "text_encoder_2", mesh,
                                                       **encoder)
    components = Components(
        folder=pipeline, unet=unet_graph, reference=reference_graph, vae=vae_graph, text_encoder=te_graph,
        text_encoder_2=te2_graph, vae_scaling_factor=vae.scaling_factor, vae_shift_factor=vae.shift_factor,
        latent_channels=vae.config["latent_channels"],
        vae_scale_factor=2 ** (len(vae.config["block_out_channels"]) - 1), compute_dtype=compute,
        unet_config=unet_config, lora=spec)
    platform = platform or mesh.devices.flat[0].platform
    return _with_attention_kernel(components, params, frozen, model.attention, mesh, platform), params, frozen
