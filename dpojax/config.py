"""Experiment configuration: frozen dataclasses validated from YAML plus ``key=value`` command-line overrides.

Parsing only reads the YAML file: no JAX calls, no devices, no writes. Every validation error is a one-line
``ConfigError`` that names the offending dotted key. Defaults are the official Diffusion-DPO SD1.5 launcher's
(``reference/diffusion_dpo.md`` §4); D3PO-only settings live in ``d3po`` and default to the D3PO paper's
(``reference/d3po.md`` §5). D3PO runs use the same ``optim`` section, so their YAML sets the paper's optimizer
values there (lr 3e-5, weight_decay 1e-4, warmup_steps 0).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A bad config file, key, value or override; the message is one line naming the key."""


def _check(predicate, requirement: str) -> dict:
    """Field metadata: a value check, reported as ``config: <key> must be <requirement>, got <value>``."""
    return {"check": (predicate, requirement)}


_POSITIVE = _check(lambda v: v > 0, "> 0")
_NON_NEGATIVE = _check(lambda v: v >= 0, ">= 0")
_PROBABILITY = _check(lambda v: 0 <= v <= 1, "in [0, 1]")


def _field(default, meta: dict | None = None):
    if isinstance(default, list | dict):
        raise TypeError("use tuples for sequence defaults")  # keeps the dataclasses frozen and hashable
    return dataclasses.field(default=default, metadata=meta or {})


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    pretrained: str | None = None  # local diffusers pipeline folder; nothing is ever downloaded
    arch: Literal["auto", "sd15", "sd2", "sdxl"] = "auto"  # "auto": read from the folder's unet config
    vae: str | None = None  # optional replacement VAE folder, e.g. the fp16-fix VAE for SDXL
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"  # compute dtype of the UNets
    param_dtype: Literal["float32", "bfloat16"] = "float32"  # policy master weights
    reference_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"  # frozen reference weights
    # Activation checkpointing of the UNet: "block" recomputes each down/mid/up block in the backward pass from
    # its inputs; "full" each resnet and transformer layer (diffusers' granularity); "dots_saveable" is "full"
    # keeping the layers' matmul outputs.
    remat: Literal["none", "block", "full", "dots_saveable"] = "none"
    attention: Literal["auto", "xla", "cudnn", "splash", "blocked"] = "auto"  # auto: cudnn on GPU, splash on TPU
    lora_rank: int = _field(0, _NON_NEGATIVE)  # 0 trains the full UNet; r > 0 trains rank-r adapters only
    lora_alpha: float | None = _field(None, _POSITIVE)  # adapters scale by alpha/rank; None: alpha = rank
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")  # linear layers: names or path suffixes

    def __post_init__(self):
        if self.lora_alpha is not None and not self.lora_rank:
            raise ConfigError("config: model.lora_alpha applies only when model.lora_rank > 0")
        if self.lora_rank and not self.lora_targets:
            raise ConfigError("config: model.lora_targets must name at least one layer when model.lora_rank > 0")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Names and values follow ``dpojax.data.pipeline.PairLoaderConfig``."""

    data_dir: str | None = None  # where `dpojax data prepare` wrote the TFDS dataset
    cache_dir: str | None = None  # a `dpojax data encode` cache: the step then runs only the UNets
    dataset: str = "pickapic_v2/default"
    split: str = "train"
    resolution: int = _field(512, _POSITIVE)
    caption_dropout: float = _field(0.2, _PROBABILITY)
    random_crop: bool = False
    flip: Literal["per_image", "joint", "none"] = "per_image"  # official: each image on its own
    time_ids: Literal["constant", "original"] = "constant"  # SDXL: official constant vs diffusers real sizes
    drop_ties: bool = True
    dreamlike_only: bool = False
    shuffle: bool = True
    worker_count: int = _field(0, _NON_NEGATIVE)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    type: Literal["sigmoid", "hinge", "ipo", "robust", "sft", "mapo"] = "sigmoid"  # see dpojax.losses
    beta: float = _field(5000.0, _POSITIVE)  # β of the DPO family on per-sample mean MSEs
    label_smoothing: float = _field(0.0, _check(lambda v: 0 <= v < 0.5, "in [0, 0.5)"))  # "robust" only
    mapo_beta: float = _field(0.1, _NON_NEGATIVE)
    mapo_temperature: float = _field(1000.0, _POSITIVE)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW (SD1.5) or Adafactor (SDXL), linear warmup then constant.

    ``lr_scaling``: "none" uses ``lr`` as given (2.048e-5 is the launchers' 1e-8 per pair × 2048 pairs, at
    β 5000); "pairs" treats ``lr`` as per pair and multiplies it by the global pairs per optimizer step, like
    the official ``--scale_lr``. If β changes, scale lr by 5000/β yourself (the gradient is ∝ β).
    """

    name: Literal["adamw", "adafactor"] = "adamw"
    lr: float = _field(2.048e-5, _POSITIVE)
    lr_scaling: Literal["none", "pairs"] = "none"
    warmup_steps: int = _field(500, _NON_NEGATIVE)
    weight_decay: float = _field(1e-2, _NON_NEGATIVE)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = _field(1e-8, _POSITIVE)
    max_grad_norm: float | None = _field(1.0, _POSITIVE)  # None: no global-norm clipping
    grad_accum: int = _field(1, _POSITIVE)  # micro-batches per optimizer step (official: 128)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = _field(2000, _NON_NEGATIVE)  # optimizer steps
    pairs_per_device: int = _field(1, _POSITIVE)  # micro-batch per device along the batch mesh axes
    seed: int = 0
    output_dir: str = "runs/default"
    checkpoint_every: int = _field(500, _NON_NEGATIVE)  # 0: only at the end (and on preemption)
    keep_checkpoints: int = _field(3, _POSITIVE)
    log_every: int = _field(10, _POSITIVE)
    sample_every: int = _field(0, _NON_NEGATIVE)  # write samples/step_N.png every N steps and at step 0 (0: never)
    sample_prompts: tuple[str, ...] = ("a photo of a cat", "a bright sunny landscape", "a portrait of an astronaut",
                                       "a bowl of fruit on a table")
    sample_steps: int = _field(20, _POSITIVE)  # DDIM steps (eta 0) of the sample grids
    sample_guidance: float = _field(5.0, _POSITIVE)
    export: Literal["pipeline", "unet", "lora", "none"] = "pipeline"  # written to <output_dir>/final at the end
    debug_nan_at_step: int = _field(0, _NON_NEGATIVE)  # test hook: make this step's loss NaN (0: off)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the (data, fsdp, tensor) mesh axes; one may be -1 to take the remaining devices."""

    data: int = _field(1, _check(lambda v: v > 0 or v == -1, "> 0 or -1"))
    fsdp: int = _field(-1, _check(lambda v: v > 0 or v == -1, "> 0 or -1"))
    tensor: int = _field(1, _check(lambda v: v > 0 or v == -1, "> 0 or -1"))


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "dpojax"
    run_name: str | None = None


@dataclasses.dataclass(frozen=True)
class D3POConfig:
    """D3PO online training (``objective: d3po``) and the human-feedback rounds (``dpojax d3po ...``).

    Batch sizes are per device along the batch mesh axes, as D3PO's are per GPU. One optimizer step takes
    ``train_batch_size`` pairs per device and accumulates all K = int(num_steps·timestep_fraction) of their
    denoising steps; the run lasts ``num_epochs`` epochs (``train.steps`` is not used).
    """

    num_steps: int = _field(20, _POSITIVE)  # DDIM sampling steps
    eta: float = _field(1.0, _check(lambda v: v > 0, "> 0 (the log-prob needs a stochastic step)"))
    guidance_scale: float = 5.0
    beta: float = _field(0.1, _POSITIVE)
    eps: float = _field(0.1, _check(lambda v: 0 < v < 1, "in (0, 1)"))  # ratio clamp [1−ε, 1+ε]
    timestep_fraction: float = _field(1.0, _check(lambda v: 0 < v <= 1, "in (0, 1]"))
    # timesteps per iteration of the update's loop over K; 0: all K on CPU (XLA:CPU ran the rolled loop ~7x
    # slower, `dpojax bench`), 1 elsewhere (one UNet fwd+bwd to compile)
    unroll: int = _field(0, _NON_NEGATIVE)
    sample_batch_size: int = _field(10, _POSITIVE)  # pairs per device per sampling batch
    num_batches_per_epoch: int = _field(2, _POSITIVE)
    num_epochs: int = _field(400, _POSITIVE)
    num_inner_epochs: int = _field(1, _POSITIVE)
    train_batch_size: int = _field(1, _POSITIVE)  # pairs per device per optimizer step
    eval_every: int = _field(10, _NON_NEGATIVE)  # epochs between evaluations of fresh single samples (0: never)
    eval_batch_size: int = _field(10, _POSITIVE)  # single images per device per evaluation
    reward: str = "jpeg_compressibility"  # a dpojax.feedback.scorers spec (name, "module:callable", or a,b)
    clip_model: str | None = None  # the aesthetic scorer's local CLIP ViT-L/14 folder
    aesthetic_head: str | None = None  # the aesthetic scorer's local LAION predictor weights
    prompts: tuple[str, ...] = ()  # prompts drawn uniformly with replacement ...
    prompt_file: str | None = None  # ... or from this text file, one prompt per line
    images_per_prompt: int = _field(7, _check(lambda v: v >= 2, ">= 2"))  # human rounds: images per prompt
    round_prompts: int = _field(143, _POSITIVE)  # human rounds: prompts per round (D3PO: ~1,000 images)
    seed: int | None = None  # human rounds: sampling seed (None: a fresh one, recorded in the round)


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    mesh: MeshConfig = MeshConfig()
    logging: LoggingConfig = LoggingConfig()
    d3po: D3POConfig = D3POConfig()
    objective: Literal["dpo", "d3po"] = "dpo"  # offline Diffusion-DPO on pairs, or online D3PO

    def __post_init__(self):
        if self.objective == "d3po":
            if bool(self.d3po.prompts) == (self.d3po.prompt_file is not None):
                raise ConfigError("config: objective 'd3po' needs exactly one of d3po.prompts (a list) or "
                                  "d3po.prompt_file (one prompt per line)")
            if self.optim.grad_accum != 1:
                raise ConfigError(f"config: optim.grad_accum must be 1 for objective 'd3po' (the step already "
                                  f"accumulates every timestep; raise d3po.train_batch_size), "
                                  f"got {self.optim.grad_accum}")
        if self.train.export == "lora" and not self.model.lora_rank:
            raise ConfigError("config: train.export 'lora' needs model.lora_rank > 0")
        if self.loss.label_smoothing and self.loss.type != "robust":
            raise ConfigError(f"config: loss.label_smoothing applies only to loss.type 'robust', "
                              f"got type {self.loss.type!r}")

    def pairs_per_step(self, batch_devices: int) -> int:
        """Global pairs per optimizer step, given the number of devices along the batch mesh axes."""
        return self.train.pairs_per_device * batch_devices * self.optim.grad_accum

    def learning_rate(self, batch_devices: int) -> float:
        """The peak learning rate after ``optim.lr_scaling``."""
        scale = self.pairs_per_step(batch_devices) if self.optim.lr_scaling == "pairs" else 1
        return self.optim.lr * scale

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready nesting (tuples become lists); ``from_dict`` reads it back."""
        return _to_plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Config:
        return _build(cls, raw, "")


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


# --- validation ---------------------------------------------------------------------------------------------

def _type_name(tp) -> str:
    names = {int: "an int", float: "a float", bool: "a bool (true/false)", str: "a string"}
    if tp in names:
        return names[tp]
    if typing.get_origin(tp) is tuple:
        return "a list"
    return getattr(tp, "__name__", str(tp))


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
