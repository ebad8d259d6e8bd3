"""Experiment configuration: frozen dataclasses validated from YAML plus ``key=value`` command-line overrides.

This module is the one place that documents and validates the keys: every field carries its meaning
(``dpojax config --list`` prints them all), and every check that needs only the config's own values lives
here. A bad file, key, value or override is a one-line ``ConfigError`` naming the dotted key. Parsing only
reads the YAML file: no JAX calls, no devices, no writes.

Sections belong to objectives. ``model``, ``mesh``, ``logging``, ``train`` (the run: seed, folders,
checkpoints, exports, sample grids, evaluations), ``optim`` and ``scorers`` (the reward models' local files) are
read by every objective; ``dpo``, ``data`` and ``loss``
only by ``objective: dpo`` (offline Diffusion-DPO and its variants, SFT included); ``d3po`` only by
``objective: d3po`` (online D3PO and the human-feedback rounds). A key that the chosen objective does not read
is an error, so a setting never silently does nothing. Defaults are the papers': the official Diffusion-DPO
SD1.5 launcher for ``dpo``/``data``/``loss`` and the optimizer, D3PO's for ``d3po`` and, under
``objective: d3po``, for the optimizer (``OPTIM_DEFAULTS``). See docs/losses.md and docs/d3po.md.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

OBJECTIVES = ("dpo", "d3po")


class ConfigError(ValueError):
    """A bad config file, key, value or override; the message is one line naming the key."""


def _check(predicate, requirement: str) -> tuple:
    """A value check, reported as ``config: <key> must be <requirement>, got <value>``."""
    return predicate, requirement


POSITIVE = _check(lambda v: v > 0, "> 0")
NON_NEGATIVE = _check(lambda v: v >= 0, ">= 0")
PROBABILITY = _check(lambda v: 0 <= v <= 1, "in [0, 1]")
AXIS_SIZE = _check(lambda v: v > 0 or v == -1, "> 0 or -1")


def _field(default, doc: str, check: tuple | None = None):
    """A config key: its default, its meaning (printed by ``dpojax config --list``) and an optional check."""
    if isinstance(default, list | dict):
        raise TypeError("use tuples for sequence defaults")  # keeps the dataclasses frozen and hashable
    return dataclasses.field(default=default, metadata={"doc": doc, "check": check})


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The models: which pipeline folder, dtypes, activation checkpointing, attention kernel, LoRA."""

    pretrained: str | None = _field(None, "local diffusers pipeline folder (SD1.x/2.x or SDXL); nothing is ever "
                                          "downloaded")
    arch: Literal["auto", "sd15", "sd2", "sdxl"] = _field(
        "auto", "the architecture; auto reads it from the folder's model_index.json, which must agree "
                "otherwise. dpojax plan uses the shipped sd15/sdxl architecture when model.pretrained is absent")
    vae: str | None = _field(None, "a replacement VAE folder, e.g. SDXL's fp16-fix VAE")
    dtype: Literal["float32", "bfloat16", "float16"] = _field("bfloat16", "compute dtype of the models")
    param_dtype: Literal["float32", "bfloat16"] = _field(
        "float32", "the trained (policy) weights' dtype; bfloat16 is refused: no optimizer here keeps fp32 master "
                   "weights, and lr-sized updates fall below bfloat16's resolution (set dtype bfloat16 instead)")
    reference_dtype: Literal["float32", "bfloat16", "float16"] = _field(
        "bfloat16", "dtype of the frozen weights: the reference UNet, VAE and text encoders")
    remat: Literal["none", "block", "full", "dots_saveable"] = _field(
        "none", "activation checkpointing of the UNet: block recomputes each down/mid/up block from its "
                "inputs in the backward pass, full each resnet and transformer layer (diffusers' granularity), "
                "dots_saveable is full keeping the layers' matmul outputs")
    attention: Literal["auto", "xla", "cudnn", "splash", "blocked"] = _field(
        "auto", "attention kernel in training and sampling: auto is cudnn on GPU, splash on TPU, xla on CPU; "
                "blocked runs xla over query blocks (long sequences)")
    lora_rank: int = _field(0, "0 trains the whole UNet; r > 0 trains rank-r adapters only, the frozen base "
                               "(in reference_dtype) serving as the reference", NON_NEGATIVE)
    lora_alpha: float | None = _field(None, "adapters scale by alpha/rank; null: alpha = rank", POSITIVE)
    lora_targets: tuple[str, ...] = _field(("to_q", "to_k", "to_v", "to_out.0"),
                                           "linear layers that get adapters: names or dotted path suffixes")

    def __post_init__(self):
        if self.lora_alpha is not None and not self.lora_rank:
            raise ConfigError("config: model.lora_alpha applies only when model.lora_rank > 0")
        if self.lora_rank and not self.lora_targets:
            raise ConfigError("config: model.lora_targets must name at least one layer when model.lora_rank > 0")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the (data, fsdp, tensor) device mesh axes; one may be -1 to take the remaining devices."""

    data: int = _field(1, "data-parallel axis: weights replicated along it", AXIS_SIZE)
    fsdp: int = _field(-1, "fully sharded axis: weights, optimizer state and batch split along it", AXIS_SIZE)
    tensor: int = _field(1, "tensor-parallel axis (the 'mlp' logical axis of the weights)", AXIS_SIZE)


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    """Where metrics go besides <output_dir>/metrics.jsonl and the console."""

    tensorboard: bool = _field(True, "write TensorBoard events to <output_dir>/tensorboard")
    wandb: bool = _field(False, "log to Weights & Biases (if installed)")
    wandb_project: str = _field("dpojax", "the W&B project")
    run_name: str | None = _field(None, "the W&B run name")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The run, whatever the objective; every cadence here counts optimizer steps."""

    seed: int = _field(0, "seeds the data order, noise, timesteps, LoRA initialisation and sampling")
    output_dir: str = _field("runs/default", "the run folder: checkpoints/, metrics.jsonl, tensorboard/, samples/, "
                                             "final/; a run resumes from its latest checkpoint here")
    checkpoint_every: int = _field(500, "save a checkpoint every N optimizer steps (0: only at the end and on "
                                        "SIGTERM/SIGINT)", NON_NEGATIVE)
    keep_checkpoints: int = _field(3, "checkpoints kept (the oldest are deleted)", POSITIVE)
    export: Literal["pipeline", "unet", "lora", "none"] = _field(
        "pipeline", "what <output_dir>/final holds at the end: the pipeline with the trained UNet, the UNet "
                    "alone, a LoRA run's adapters (diffusers' load_lora_weights format), or nothing")
    sample_every: int = _field(0, "write samples/step_N.png every N optimizer steps and at step 0 (0: never)",
                               NON_NEGATIVE)
    sample_prompts: tuple[str, ...] = _field(("a photo of a cat", "a bright sunny landscape",
                                              "a portrait of an astronaut", "a bowl of fruit on a table"),
                                             "prompts of the sample grids (one fixed seed, so grids compare)")
    sample_steps: int = _field(20, "DDIM steps (eta 0) of the sample grids", POSITIVE)
    sample_guidance: float = _field(5.0, "classifier-free guidance scale of the sample grids", POSITIVE)
    eval_every: int = _field(0, "score the policy's images every N optimizer steps and at the last (0: never): "
                                "train.eval_images_per_prompt images of each eval prompt, the same seeds each time; "
                                "the checkpoint with the best median score is kept (dpojax export RUN OUT --step "
                                "best)", NON_NEGATIVE)
    eval_scorer: str | None = _field(None, "the scorer of train.eval_every: a d3po.reward spec (pickscore, "
                                           "clip_score, aesthetic, brightness, 'package.module:callable'); its model "
                                           "files are in the scorers section")
    eval_prompt_file: str | None = _field(None, "eval prompts, one per line (default: train.sample_prompts)")
    eval_images_per_prompt: int = _field(2, "images of each eval prompt (seeds train.seed, train.seed + 1, ...)",
                                         POSITIVE)
    debug_nan_at_step: int = _field(0, "test hook: this optimizer step's loss becomes NaN (0: off)", NON_NEGATIVE)


@dataclasses.dataclass(frozen=True)
class ScorersConfig:
    """Local files of the reward models that d3po.reward and train.eval_scorer name (nothing is downloaded)."""

    clip_model: str | None = _field(None, "a local transformers CLIP folder: CLIP ViT-L/14 for the aesthetic scorer, "
                                          "any CLIPModel for clip_score and clip_cosine")
    clip_processor: str | None = _field(None, "clip_score/clip_cosine: the folder with the CLIP tokenizer and "
                                              "processor files (default: clip_model)")
    pickscore_model: str | None = _field(None, "the pickscore reward's local PickScore_v1 folder (a CLIPModel)")
    pickscore_processor: str | None = _field(None, "the pickscore reward's tokenizer and processor folder "
                                                   "(CLIP-ViT-H-14-laion2B-s32B-b79K; default: pickscore_model)")
    aesthetic_head: str | None = _field(None, "the aesthetic reward's LAION predictor weights (.pth or .safetensors)")
    hps_checkpoint: str | None = _field(None, "the hps reward's HPSv2 checkpoint (HPS_v2.1_compressed.pt or "
                                              "HPS_v2_compressed.pt, or a .safetensors of the same keys)")
    hps_processor: str | None = _field(None, "the hps reward's tokenizer folder (CLIP-ViT-H-14-laion2B-s32B-b79K)")
    hps_model_config: str | None = _field(None, "the hps reward's open_clip model config JSON, for a checkpoint "
                                                "that is not ViT-H-14 (default: ViT-H-14's)")
    imagereward_model: str | None = _field(None, "the imagereward reward's local THUDM/ImageReward folder "
                                                 "(ImageReward.pt and med_config.json)")
    imagereward_tokenizer: str | None = _field(None, "the imagereward reward's local bert-base-uncased tokenizer "
                                                     "folder (default: imagereward_model)")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW (SD1.5, D3PO) or Adafactor (SDXL), linear warmup then constant, global-norm clipping; the
    defaults are the objective's paper's (Diffusion-DPO's SD1.5 launcher, D3PO's where shown)."""

    name: Literal["adamw", "adafactor"] = _field("adamw", "adamw, or adafactor as the official SDXL run sets it up")
    lr: float = _field(2.048e-5, "peak learning rate (DPO's 1e-8 per pair x 2048 pairs at beta 5000; the DPO "
                                 "gradient grows with loss.beta, so scale lr by 5000/beta)", POSITIVE)
    lr_scaling: Literal["none", "pairs"] = _field(
        "none", "pairs: lr is per pair and is multiplied by the global pairs per optimizer step, the official "
                "--scale_lr (dpo: pairs_per_device x batch devices x grad_accum; d3po: train_batch_size x batch "
                "devices)")
    warmup_steps: int = _field(500, "optimizer steps of linear warmup from 0", NON_NEGATIVE)
    weight_decay: float = _field(1e-2, "decoupled weight decay", NON_NEGATIVE)
    betas: tuple[float, float] = _field((0.9, 0.999), "AdamW's (beta1, beta2)")
    eps: float = _field(1e-8, "AdamW's epsilon", POSITIVE)
    max_grad_norm: float | None = _field(1.0, "global-norm gradient clipping (null: none)", POSITIVE)


# What differs from OptimConfig's defaults under each objective (D3PO's config/base.py and paper Table 2).
OPTIM_DEFAULTS: dict[str, dict[str, Any]] = {"dpo": {}, "d3po": {"lr": 3e-5, "warmup_steps": 0, "weight_decay": 1e-4}}


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    """Offline preference training (objective dpo): the length of the run and its batches."""

    steps: int = _field(2000, "optimizer steps of the run", NON_NEGATIVE)
    pairs_per_device: int = _field(1, "pairs per device along the batch mesh axes in one micro-batch", POSITIVE)
    grad_accum: int = _field(1, "micro-batches per optimizer step (official: 128, for 2048 pairs on 16 GPUs)",
                             POSITIVE)
    log_every: int = _field(10, "print a progress line every N optimizer steps (metrics.jsonl has every step)",
                            POSITIVE)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The preference pairs of objective dpo: a `dpojax data prepare` dataset, or a `dpojax data encode` cache."""

    data_dir: str | None = _field(None, "the folder `dpojax data prepare` wrote (TFDS array_record)")
    cache_dir: str | None = _field(None, "a `dpojax data encode` cache: the step then runs only the UNets")
    dataset: str = _field("pickapic_v2/default", "the TFDS builder/config in data_dir")
    split: str = _field("train", "the split to train on")
    resolution: int = _field(512, "training image size in pixels (square)", POSITIVE)
    caption_dropout: float = _field(0.2, "probability that a pair's caption becomes empty", PROBABILITY)
    random_crop: bool = _field(False, "random instead of centre crop after the resize")
    flip: Literal["per_image", "joint", "none"] = _field(
        "per_image", "horizontal flips: each image on its own (official), both images of a pair together "
                     "(diffusers' SDXL script), or none")
    time_ids: Literal["constant", "original"] = _field(
        "constant", "SDXL micro-conditioning: the official constant [res, res, 0, 0, res, res], or each image's "
                    "real size and crop (diffusers)")
    shuffle: bool = _field(True, "shuffle the pairs (seeded by train.seed, resumable)")
    worker_count: int = _field(0, "grain worker processes decoding images (0: in the training process)",
                               NON_NEGATIVE)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The pair loss of objective dpo (docs/losses.md)."""

    type: Literal["sigmoid", "hinge", "ipo", "robust", "sft", "mapo"] = _field(
        "sigmoid", "sigmoid: Diffusion-DPO; hinge, ipo, robust: its variants; sft: the winners' denoising loss, "
                   "no reference; mapo: reference-free MaPO")
    beta: float = _field(5000.0, "the DPO beta on per-image mean squared errors", POSITIVE)
    label_smoothing: float = _field(0.0, "robust only: the probability that a label is wrong",
                                    _check(lambda v: 0 <= v < 0.5, "in [0, 0.5)"))
    mapo_beta: float = _field(0.1, "mapo only: weight of the odds term", NON_NEGATIVE)
    mapo_temperature: float = _field(1000.0, "mapo only: temperature of the odds term", POSITIVE)


@dataclasses.dataclass(frozen=True)
class D3POConfig:
    """D3PO (objective d3po): online training with a reward proxy, and the human-feedback rounds.

    Batch sizes are per device along the batch mesh axes, as D3PO's are per GPU. An epoch samples
    num_batches_per_epoch x sample_batch_size pairs per device from the current policy, then takes one
    optimizer step per train_batch_size pairs per device, each accumulating K = int(num_steps x
    timestep_fraction) denoising steps of its pairs (docs/d3po.md).
    """

    resolution: int = _field(512, "image size in pixels (square)", POSITIVE)
    num_steps: int = _field(20, "DDIM sampling steps T", POSITIVE)
    eta: float = _field(1.0, "DDIM eta", _check(lambda v: v > 0, "> 0 (the log-prob needs a stochastic step)"))
    guidance_scale: float = _field(5.0, "classifier-free guidance scale when sampling and re-scoring")
    beta: float = _field(0.1, "the DPO beta on log-probability ratios", POSITIVE)
    eps: float = _field(0.1, "ratios to the reference are clamped to [1 - eps, 1 + eps]",
                        _check(lambda v: 0 < v < 1, "in (0, 1)"))
    timestep_fraction: float = _field(1.0, "fraction of the T denoising steps trained per pair",
                                      _check(lambda v: 0 < v <= 1, "in (0, 1]"))
    unroll: int = _field(0, "timesteps per iteration of the update's loop over K; 0: 1 on GPU/TPU, and on CPU "
                            "all K without a loop (XLA:CPU runs a loop's convolution gradients slowly, "
                            "docs/performance.md)", NON_NEGATIVE)
    sample_batch_size: int = _field(10, "pairs per device per sampling batch", POSITIVE)
    num_batches_per_epoch: int = _field(2, "sampling batches per epoch", POSITIVE)
    num_epochs: int = _field(400, "epochs of the run (online) or passes over a round's pairs (rounds)", POSITIVE)
    num_inner_epochs: int = _field(1, "training passes over each epoch's samples", POSITIVE)
    train_batch_size: int = _field(1, "pairs per device per optimizer step", POSITIVE)
    log_every: int = _field(1, "print a progress line every N epochs (metrics.jsonl has every epoch)", POSITIVE)
    eval_every: int = _field(10, "epochs between evaluations of fresh single samples of fixed prompts and noise, "
                                 "and after the last epoch (0: never)", NON_NEGATIVE)
    eval_batch_size: int = _field(10, "images per device per evaluation", POSITIVE)
    reward: str = _field("jpeg_compressibility", "the reward proxy: brightness, jpeg_compressibility, "
                                                 "jpeg_incompressibility, aesthetic, pickscore, clip_score (100 "
                                                 "max(cos, 0)), clip_cosine, imagereward, a 'package.module:callable', "
                                                 "or several joined by ',' (a vector reward, Pareto-compared)")
    prompts: tuple[str, ...] = _field((), "prompts drawn uniformly with replacement ...")
    prompt_file: str | None = _field(None, "... or from this text file, one prompt per line; a bare name that is "
                                           "not a file here is one of the shipped lists (e.g. animals.txt: the "
                                           "paper's 45 simple animals)")
    images_per_prompt: int = _field(7, "human rounds: images per prompt",
                                    _check(lambda v: v >= 2, ">= 2"))
    round_prompts: int = _field(143, "human rounds: prompts per round (D3PO: about 1,000 images)", POSITIVE)
    seed: int | None = _field(None, "human rounds: the sampling seed (null: a fresh one, recorded in the round)")

    @property
    def pairs_per_epoch(self) -> int:
        """Pairs per device sampled in one epoch."""
        return self.num_batches_per_epoch * self.sample_batch_size


# Which objectives read each section; a section not listed is read by every objective.
SECTION_OBJECTIVES = {"dpo": ("dpo",), "data": ("dpo",), "loss": ("dpo",), "d3po": ("d3po",)}


@dataclasses.dataclass(frozen=True)
class Config:
    objective: Literal["dpo", "d3po"] = _field(
        "dpo", "dpo: offline Diffusion-DPO (and its variants, SFT) on preference pairs; d3po: D3PO on sampled "
               "trajectory pairs, online or in human-feedback rounds")
    model: ModelConfig = ModelConfig()
    mesh: MeshConfig = MeshConfig()
    logging: LoggingConfig = LoggingConfig()
    train: TrainConfig = TrainConfig()
    optim: OptimConfig = OptimConfig()
    dpo: DPOConfig = DPOConfig()
    data: DataConfig = DataConfig()
    loss: LossConfig = LossConfig()
    d3po: D3POConfig = D3POConfig()
    scorers: ScorersConfig = ScorersConfig()

    def __post_init__(self):
        if self.model.param_dtype != "float32":  # neither optimizer keeps an fp32 master copy of the weights
            raise ConfigError(
                f"config: model.param_dtype={self.model.param_dtype} with optim.name={self.optim.name} would stall "
                f"training: updates of about the learning rate fall below {self.model.param_dtype}'s resolution "
                f"(8 bits of mantissa) and round away, and the optimizer keeps no fp32 master weights; keep "
                f"param_dtype float32 and set model.dtype=bfloat16 to compute in bfloat16")
        if self.train.eval_every and not self.train.eval_scorer:
            raise ConfigError("config: train.eval_every needs train.eval_scorer (e.g. pickscore, with "
                              "scorers.pickscore_model)")
        if self.train.export == "lora" and not self.model.lora_rank:
            raise ConfigError("config: train.export 'lora' needs model.lora_rank > 0")
        if self.objective == "dpo" and self.loss.label_smoothing and self.loss.type != "robust":
            raise ConfigError(f"config: loss.label_smoothing applies only to loss.type 'robust', "
                              f"got type {self.loss.type!r}")
        if self.objective == "d3po":
            d3po = self.d3po
            if bool(d3po.prompts) == (d3po.prompt_file is not None):
                raise ConfigError("config: objective 'd3po' needs exactly one of d3po.prompts (a list) or "
                                  "d3po.prompt_file (one prompt per line)")
            if d3po.pairs_per_epoch % d3po.train_batch_size:
                raise ConfigError(f"config: d3po.train_batch_size={d3po.train_batch_size} must divide the "
                                  f"{d3po.pairs_per_epoch} pairs per device of an epoch (num_batches_per_epoch x "
                                  f"sample_batch_size)")

    @property
    def resolution(self) -> int:
        """The objective's image size in pixels."""
        return self.d3po.resolution if self.objective == "d3po" else self.data.resolution

    def sections(self) -> tuple[str, ...]:
        """The sections the objective reads."""
        return tuple(name for name in _SECTION_TYPES if self.objective in SECTION_OBJECTIVES.get(name, OBJECTIVES))

    def pairs_per_step(self, batch_devices: int) -> int:
        """Global pairs per optimizer step, given the number of devices along the batch mesh axes."""
        if self.objective == "d3po":
            return self.d3po.train_batch_size * batch_devices
        return self.dpo.pairs_per_device * batch_devices * self.dpo.grad_accum

    def learning_rate(self, batch_devices: int) -> float:
        """The peak learning rate after ``optim.lr_scaling``."""
        scale = self.pairs_per_step(batch_devices) if self.optim.lr_scaling == "pairs" else 1
        return self.optim.lr * scale

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready nesting of the objective and the sections it reads (tuples become lists);
        ``from_dict`` reads it back."""
        return _to_plain({"objective": self.objective,
                          **{name: dataclasses.asdict(getattr(self, name)) for name in self.sections()}})

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Config:
        if not isinstance(raw, dict):
            raise ConfigError(f"config: the config must be a mapping, got {raw!r}")
        objective = _coerce(raw.get("objective", "dpo"), typing.get_type_hints(cls)["objective"], "objective")
        for name, value in raw.items():
            readers = SECTION_OBJECTIVES.get(name, OBJECTIVES)
            if name in _SECTION_TYPES and objective not in readers:
                raise ConfigError(_unread_message(name, value, objective))
        raw = dict(raw)
        optim_defaults = OPTIM_DEFAULTS[objective]
        if optim_defaults:
            optim = raw.get("optim", {})
            raw["optim"] = {**optim_defaults, **optim} if isinstance(optim, dict) else optim
        return _build(cls, raw, "")


_SECTION_TYPES = {name: tp for name, tp in typing.get_type_hints(Config).items() if name != "objective"}


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """The validated config from a YAML file (None: all defaults), then ``a.b=value`` overrides in order."""
    raw: Any = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"config: cannot read {path}: {e.strerror or e}") from None
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"config: {path} is not valid YAML: {' '.join(str(e).split())}") from None
        raw = {} if raw is None else raw
        if not isinstance(raw, dict):
            raise ConfigError(f"config: {path} must hold a mapping of sections, got {type(raw).__name__}")
    return apply_overrides(raw, overrides)


def apply_overrides(raw: dict[str, Any], overrides: typing.Sequence[str] = ()) -> Config:
    """The validated config of a plain mapping (e.g. one saved with ``to_dict``) after ``a.b=value`` overrides."""
    raw = _to_plain(raw)  # a copy: the caller's mapping is left as it was
    for override in overrides:
        _apply_override(raw, override)
    return Config.from_dict(raw)


# --- documentation ------------------------------------------------------------------------------------------

def describe_keys() -> str:
    """Every key with its type, default and meaning, section by section (``dpojax config --list``)."""
    lines = [_describe(dataclasses.fields(Config)[0], "objective", Config, _yaml_value(Config.objective)), ""]
    for name, section in _SECTION_TYPES.items():
        readers = SECTION_OBJECTIVES.get(name, OBJECTIVES)
        who = "every objective" if readers == OBJECTIVES else f"objective {' or '.join(readers)} only"
        lines.append(f"[{name}] ({who}) {' '.join(section.__doc__.split())}")
        for f in dataclasses.fields(section):
            default = _yaml_value(getattr(section(), f.name))
            if name == "optim":  # the defaults that differ per objective
                default += "".join(f" ({o}: {_yaml_value(d[f.name])})" for o, d in OPTIM_DEFAULTS.items()
                                   if f.name in d)
            lines.append(_describe(f, f"{name}.{f.name}", section, default))
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _describe(f: dataclasses.Field, key: str, owner, default: str) -> str:
    kind = _type_name(typing.get_type_hints(owner)[f.name])
    return f"  {key} = {default}  ({kind})\n      {f.metadata['doc']}"


def _yaml_value(value) -> str:
    return yaml.safe_dump(_to_plain(value), default_flow_style=True, width=1000).strip().removesuffix("...").strip()


# --- validation ---------------------------------------------------------------------------------------------

def _type_name(tp) -> str:
    tp, optional = _optional_inner(tp)
    names = {int: "an int", float: "a float", bool: "a bool (true/false)", str: "a string"}
    if tp in names:
        name = names[tp]
    elif typing.get_origin(tp) is tuple:
        name = "a list"
    elif typing.get_origin(tp) is Literal:
        name = "one of " + ", ".join(map(repr, typing.get_args(tp)))
    else:
        name = getattr(tp, "__name__", str(tp))
    return f"{name} or null" if optional else name


def _optional_inner(tp):
    """(inner type, allows None) for ``X | None``; other types pass through."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported config type {tp}")
        return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def _coerce(value, tp, key: str):
    tp, optional = _optional_inner(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"config: {key} must be {_type_name(tp)}, got null")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".")
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"config: {key} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
        return value
    if origin is tuple:
        return _coerce_tuple(value, tp, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads "1e-8" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"unsupported config type {tp} for {key}")
    raise ConfigError(f"config: {key} must be {_type_name(tp)}, got {value!r}")


def _coerce_tuple(value, tp, key: str) -> tuple:
    if not isinstance(value, list | tuple):
        raise ConfigError(f"config: {key} must be a list, got {value!r}")
    args = typing.get_args(tp)
    if len(args) == 2 and args[1] is Ellipsis:
        args = (args[0],) * len(value)
    elif len(args) != len(value):
        raise ConfigError(f"config: {key} must be a list of {len(args)} items, got {value!r}")
    return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))


def _build(cls, raw, prefix: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"config: {prefix.rstrip('.') or 'the config'} must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for name in raw:
        if name not in fields:
            raise ConfigError(_unknown_key_message(prefix + str(name)))
    values = {}
    for name, value in raw.items():
        key = prefix + name
        values[name] = _coerce(value, hints[name], key)
        check = fields[name].metadata.get("check")
        if check and values[name] is not None and not check[0](values[name]):
            raise ConfigError(f"config: {key} must be {check[1]}, got {values[name]!r}")
    return cls(**values)


def _all_keys(cls=Config, prefix: str = "") -> list[str]:
    keys, hints = [], typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        keys.append(prefix + f.name)
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            keys.extend(_all_keys(tp, prefix + f.name + "."))
    return keys


def _unknown_key_message(key: str) -> str:
    known = _all_keys()
    close = difflib.get_close_matches(key, known, n=1)
    if not close:  # a right name in the wrong section, e.g. "lr" for "optim.lr"
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in known if k.rsplit(".", 1)[-1] == leaf][:1]
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"config: unknown key '{key}'{hint}"


def _unread_message(section: str, value, objective: str) -> str:
    """A section the objective does not read, naming its first key and the objective's key of that name."""
    key = f"{section}.{next(iter(value))}" if isinstance(value, dict) and value else section
    leaf = key.rsplit(".", 1)[-1]
    readable = [name for name in _SECTION_TYPES if objective in SECTION_OBJECTIVES.get(name, OBJECTIVES)]
    same = [f"{name}.{leaf}" for name in readable
            if leaf in {f.name for f in dataclasses.fields(_SECTION_TYPES[name])}]
    hint = f" (did you mean '{same[0]}'?)" if same and key != section else ""
    return f"config: {key} is not read by objective {objective!r}{hint}"


# --- overrides ----------------------------------------------------------------------------------------------

def _field_type(key: str):
    """The declared type at a dotted key, or a one-line error naming the unknown part."""
    cls: Any = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(cls) or part not in {f.name for f in dataclasses.fields(cls)}:
            raise ConfigError(_unknown_key_message(".".join(parts[: i + 1])))
        cls = typing.get_type_hints(cls)[part]
    return cls


def _parse_override_value(text: str, tp):
    """Strings stay verbatim for string fields (``model.pretrained=2024`` is a path); the rest is YAML."""
    inner, optional = _optional_inner(tp)
    is_text = inner is str or (typing.get_origin(inner) is Literal and all(
        isinstance(a, str) for a in typing.get_args(inner)))
    try:
        parsed = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        parsed = text  # left for the type check to reject with the key's name
    if is_text:
        return None if optional and parsed is None else text
    return parsed


def _apply_override(raw: dict, override: str) -> None:
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"config: bad override {override!r} (expected key=value, e.g. optim.lr=1e-5)")
    value = _parse_override_value(text, _field_type(key))
    *sections, leaf = key.split(".")
    node = raw
    for i, section in enumerate(sections):
        child = node.setdefault(section, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config: {'.'.join(sections[: i + 1])} must be a mapping, got {child!r}")
        node = child
    node[leaf] = value


def _to_plain(value):
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_plain(v) for v in value]
    return value
