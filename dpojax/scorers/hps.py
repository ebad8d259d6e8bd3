"""HPSv2 and HPSv2.1 (github tgxs002/HPSv2, the Human Preference Score): open_clip's ViT-H-14 CLIP fine-tuned on
human choices, read from the published checkpoint without torch.

``hpsv2.score`` builds ``create_model_and_transforms('ViT-H-14', ..., light_augmentation=True)``, loads the
checkpoint's ``state_dict`` into it and scores ``image_features @ text_features.T`` of the unit-norm features: the
raw cosine, no ``logit_scale``. Its image transform (the ``light_augmentation`` one) is not CLIP's resize and crop:
``ToTensor`` first, then ``ResizeMaxSize``, a letterbox: the longer side resized to 224 (each side
``round(side * 224 / longer)``) by torchvision's bicubic resize of the float tensor (antialiased: torchvision's
default since 0.17), black padding to 224 x 224 (the odd pixel at the bottom or right), then OpenAI's mean and std.
Its tokenizer is open_clip's ``SimpleTokenizer`` (77 tokens, the end-of-text token kept on truncation), which
transformers' CLIPTokenizer with CLIP-ViT-H-14-laion2B-s32B-b79K's files matches once the HTML unescaping and
quote straightening of open_clip's cleanup are applied (its other ftfy repairs of broken text are not).

open_clip's CLIP is transformers' CLIPModel with exact GELU and no biases on the projections and patch
convolution, so the checkpoint converts to ``dpojax.models.clip.CLIPModel``'s weights: fused ``in_proj`` split into
q, k, v, and ``proj`` / ``text_projection`` transposed into Linear weights. open_clip pools the text at the
highest token id (the end-of-text token); transformers' CLIP does too when its ``eos_token_id`` is 2.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from transformers import CLIPTokenizer

from dpojax.models.clip import CLIPModel
from dpojax.models.clip_vision import CLIP_MEAN, CLIP_STD
from dpojax.scorers.clip_scorers import CLIPScorer, load_tokenizer
from dpojax.weights import io, naming
from dpojax.weights.folder import component_folder
from dpojax.weights.torch_pickle import read_weights

# open_clip's model_configs/ViT-H-14.json, which HPSv2 builds (the heads count is not in the weights' shapes).
VIT_H_14 = {"embed_dim": 1024,
            "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24}}
# The open_clip model-config keys this port runs: the plain ViT CLIP (patch_dropout acts only in training).
# Anything else (timm or HF towers, layer scale, attentional pooling...) changes the model, so it is refused.
TOP_KEYS = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu"}
VISION_KEYS = {"image_size", "layers", "width", "head_width", "patch_size", "mlp_ratio", "patch_dropout"}
TEXT_KEYS = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}
LAYER_NORM_EPS = 1e-5  # torch's LayerNorm default, which open_clip keeps
ARGMAX_POOLING = 2  # an eos_token_id of 2 makes transformers' CLIP pool at the highest id, as open_clip does
EOS_TOKEN = "<|endoftext|>"


def read_model_config(path: str | Path | None) -> tuple[dict[str, Any], str]:
    """An open_clip model config (``path``, or ViT-H-14's when None), checked: (config, its name for errors)."""
    if path is None:
        config, name = VIT_H_14, "open_clip's ViT-H-14 config"
    else:
        path, name = Path(path), str(path)
        if not path.is_file():
            raise FileNotFoundError(f"HPS model config {path} does not exist")
        try:
            config = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"HPS model config {path} is not valid JSON: {err}") from None
    for section, keys in ((None, TOP_KEYS), ("vision_cfg", VISION_KEYS), ("text_cfg", TEXT_KEYS)):
        part = config if section is None else config.get(section)
        if not isinstance(part, Mapping):
            raise ValueError(f"{name}: {section or 'the config'} must be a JSON object, got {part!r}")
        required = keys - {"quick_gelu", "mlp_ratio", "patch_dropout"}
        problem = (next((f"{key!r} is not supported" for key in part if key not in keys), None)
                   or next((f"{key!r} is missing" for key in sorted(required) if key not in part), None))
        if problem:
            where = "" if section is None else f"{section}: "
            raise ValueError(f"{name}: {where}{problem} (the HPS scorer runs open_clip's ViT CLIP with keys "
                             f"{', '.join(sorted(keys))})")
    vision, text = config["vision_cfg"], config["text_cfg"]
    if not (isinstance(config["embed_dim"], int) and config["embed_dim"] > 0):
        raise ValueError(f"{name}: embed_dim must be a positive integer, got {config['embed_dim']!r}")
    sizes = {"image_size": _square(vision["image_size"], name, "image_size"),
             "patch_size": _square(vision["patch_size"], name, "patch_size")}
    for section, values in (("vision_cfg", vision), ("text_cfg", text)):
        for key in ("layers", "width", "heads", "head_width", "context_length", "vocab_size"):
            if key in values and not (isinstance(values[key], int) and values[key] > 0):
                raise ValueError(f"{name}: {section}.{key} must be a positive integer, got {values[key]!r}")
    if vision["width"] % vision["head_width"] or text["width"] % text["heads"]:
        raise ValueError(f"{name}: vision_cfg.width must be a multiple of head_width and text_cfg.width of heads")
    if sizes["image_size"] % sizes["patch_size"]:
        raise ValueError(f"{name}: vision_cfg.image_size {sizes['image_size']} is not a multiple of patch_size "
                         f"{sizes['patch_size']}")
    return {**config, "vision_cfg": {**vision, **sizes}}, name


def _square(value: Any, name: str, key: str) -> int:
    """An open_clip size: an int, or a [height, width] pair, which must be square here."""
    if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
        value = value[0]
    if not (isinstance(value, int) and value > 0):
        raise ValueError(f"{name}: vision_cfg.{key} must be a positive integer (or a square pair), got {value!r}")
    return value


def _mlp_width(section: Mapping[str, Any]) -> int:
    return int(section["width"] * section.get("mlp_ratio", 4.0))  # open_clip's int(width * mlp_ratio)


def open_clip_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every key of the open_clip CLIP state dict that ``config`` builds, with its shape."""
    vision, text, embed = config["vision_cfg"], config["text_cfg"], config["embed_dim"]

    def blocks(prefix: str, width: int, layers: int, mlp: int) -> dict[str, tuple[int, ...]]:
        block = {"ln_1.weight": (width,), "ln_1.bias": (width,), "attn.in_proj_weight": (3 * width, width),
                 "attn.in_proj_bias": (3 * width,), "attn.out_proj.weight": (width, width),
                 "attn.out_proj.bias": (width,), "ln_2.weight": (width,), "ln_2.bias": (width,),
                 "mlp.c_fc.weight": (mlp, width), "mlp.c_fc.bias": (mlp,), "mlp.c_proj.weight": (width, mlp),
                 "mlp.c_proj.bias": (width,)}
        return {f"{prefix}transformer.resblocks.{i}.{key}": shape for i in range(layers)
                for key, shape in block.items()}

    width, patch = vision["width"], vision["patch_size"]
    grid = vision["image_size"] // patch
    return {
        "visual.class_embedding": (width,), "visual.positional_embedding": (grid * grid + 1, width),
        "visual.proj": (width, embed), "visual.conv1.weight": (width, 3, patch, patch),
        "visual.ln_pre.weight": (width,), "visual.ln_pre.bias": (width,),
        **blocks("visual.", width, vision["layers"], _mlp_width(vision)),
        "visual.ln_post.weight": (width,), "visual.ln_post.bias": (width,),
        "positional_embedding": (text["context_length"], text["width"]),
        "text_projection": (text["width"], embed), "logit_scale": (),
        "token_embedding.weight": (text["vocab_size"], text["width"]),
        **blocks("", text["width"], text["layers"], _mlp_width(text)),
        "ln_final.weight": (text["width"],), "ln_final.bias": (text["width"],),
    }


def check_checkpoint(state_dict: Mapping[str, np.ndarray], config: Mapping[str, Any], what: str,
                     config_name: str) -> None:
    """One-line errors for a state dict that is not open_clip's CLIP or not the one ``config`` builds (as
    ``load_state_dict(strict=True)`` would refuse it); the first mismatched key is named."""
    expected = open_clip_shapes(config)
    if not any(key.startswith("visual.") for key in state_dict):
        stray = next((key for key in state_dict if key not in expected), next(iter(state_dict), None))
        raise ValueError(f"{what} is not an open_clip CLIP state dict (HPSv2's layout): it has no visual.* "
                         f"weights (it has {stray!r})")
    for key, shape in expected.items():
        found = state_dict.get(key)
        if found is None or tuple(np.shape(found)) != shape:
            detail = "is missing" if found is None else f"has shape {tuple(np.shape(found))}"
            raise ValueError(f"{what} does not match {config_name}: {key} {detail}, the config gives {shape} "
                             f"(name the checkpoint's open_clip model config in hps_model_config)")
    extra = next((key for key in state_dict if key not in expected), None)
    if extra is not None:
        raise ValueError(f"{what} does not match {config_name}: it has {extra!r}, which that model lacks "
                         f"(name the checkpoint's open_clip model config in hps_model_config)")


def clip_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The transformers CLIPConfig (as a dict) of the CLIPModel that computes what the open_clip ``config``
    does."""
    vision, text = config["vision_cfg"], config["text_cfg"]
    common = {"hidden_act": "quick_gelu" if config.get("quick_gelu", False) else "gelu",
              "layer_norm_eps": LAYER_NORM_EPS}
    return {
        "architectures": ["CLIPModel"], "projection_dim": config["embed_dim"],
        "text_config": {**common, "vocab_size": text["vocab_size"], "hidden_size": text["width"],
                        "intermediate_size": _mlp_width(text), "num_hidden_layers": text["layers"],
                        "num_attention_heads": text["heads"], "max_position_embeddings": text["context_length"],
                        "eos_token_id": ARGMAX_POOLING},
        "vision_config": {**common, "hidden_size": vision["width"], "intermediate_size": _mlp_width(vision),
                          "num_hidden_layers": vision["layers"],
                          "num_attention_heads": vision["width"] // vision["head_width"],
                          "image_size": vision["image_size"], "patch_size": vision["patch_size"],
                          "num_channels": 3},
    }


_BLOCK_KEYS = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
               "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_RENAMED = {"visual.class_embedding": "vision_model.embeddings.class_embedding",
            "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
            "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
            "visual.ln_pre": "vision_model.pre_layrnorm", "visual.ln_post": "vision_model.post_layernorm",
            "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
            "positional_embedding": "text_model.embeddings.position_embedding.weight",
            "ln_final": "text_model.final_layer_norm", "logit_scale": "logit_scale"}


def to_clip_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """An open_clip CLIP state dict (checked by ``check_checkpoint``) in transformers CLIPModel's keys and
    layouts."""
    out = {"visual_projection.weight": np.asarray(state_dict["visual.proj"]).T,
           "text_projection.weight": np.asarray(state_dict["text_projection"]).T}
    for key, value in state_dict.items():
        value = np.asarray(value)
        block = re.fullmatch(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)", key)
        if block:
            tower, index, name = block.groups()
            prefix = f"{'vision_model' if tower else 'text_model'}.encoder.layers.{index}."
            if name.startswith("attn.in_proj_"):  # q, k and v fused, in that order along the output axis
                for part, chunk in zip("qkv", np.split(value, 3, axis=0), strict=True):
                    out[f"{prefix}self_attn.{part}_proj.{name.removeprefix('attn.in_proj_')}"] = chunk
            else:
                stem, leaf = name.rsplit(".", 1)
                out[f"{prefix}{_BLOCK_KEYS[stem]}.{leaf}"] = value
        elif key in _RENAMED:
            out[_RENAMED[key]] = value
        elif key.rsplit(".", 1)[0] in _RENAMED:
            stem, leaf = key.rsplit(".", 1)
            out[f"{_RENAMED[stem]}.{leaf}"] = value
    return out


def read_checkpoint(path: str | Path) -> dict[str, np.ndarray]:
    """The open_clip state dict of an HPS checkpoint: the published ``torch.save`` file (its ``state_dict``
    entry), or a .safetensors file of the same keys. Read without torch; every failure is one line."""
    return read_weights(path, "HPS checkpoint", key="state_dict")


def load_hps_model(checkpoint: str | Path | Mapping[str, np.ndarray], model_config: str | Path | None = None, *,
                   dtype=jnp.float32) -> CLIPModel:
    """The CLIPModel of an HPS checkpoint (a path, or an open_clip state dict of numpy arrays), sized by the open_clip
    ``model_config`` JSON (default: ViT-H-14's)."""
    config, config_name = read_model_config(model_config)
    if isinstance(checkpoint, Mapping):
        state_dict, what = checkpoint, "HPS state dict"
    else:
        state_dict, what = read_checkpoint(checkpoint), f"HPS checkpoint {checkpoint}"
    check_checkpoint(state_dict, config, what, config_name)
    model = io.abstract_module(CLIPModel, clip_config(config), param_dtype=dtype)
    naming.load_state_dict(model, to_clip_state_dict(state_dict), what)
    return model


def _keys_cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic with a = -0.5, the kernel of torch's antialiased bicubic resize (Pillow's), in torch's form."""
    a, x = -0.5, np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def _torch_bicubic_weights(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) float32 weights of torch's antialiased bicubic resize of a float32 image along one axis
    (zero outside each output pixel's window).

    Pillow's windows and kernel, but torch keeps the scale and each output pixel's centre in float32, which moves
    the weights far more than float32 rounding would; the rest is computed in float64.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    filterscale = max(float(scale), 1.0)
    support = np.float32(2.0 * filterscale)
    center = (float(scale) * (np.arange(out_size) + 0.5)).astype(np.float32)
    # C's (int) truncates toward zero; the window starts are clamped to the image afterwards.
    xmin = np.maximum(np.trunc((center - support).astype(np.float64) + 0.5), 0)
    xmax = np.minimum(np.trunc((center + support).astype(np.float64) + 0.5), in_size)
    x = np.arange(in_size)
    inside = (x >= xmin[:, None]) & (x < xmax[:, None])
    weights = np.where(inside, _keys_cubic((x - center[:, None].astype(np.float64) + 0.5) / filterscale), 0.0)
    return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


def _resize_axis(images: jax.Array, axis: int, out_size: int) -> jax.Array:
    weights = jnp.asarray(_torch_bicubic_weights(images.shape[axis], out_size))
    # Full float32 products: accelerators' default matmul precision would round the pixels to bfloat16.
    out = jnp.tensordot(images, weights, axes=[[axis], [1]], precision=jax.lax.Precision.HIGHEST)
    return jnp.moveaxis(out, -1, axis)


def hps_preprocess(images: np.ndarray | jax.Array, size: int = 224) -> jax.Array:
    """uint8 (N, H, W, 3) -> normalised float32 (N, size, size, 3), as HPSv2's image transform does it.

    Scaled to [0, 1], the longer side resized to ``size`` (torch's antialiased bicubic on the floats, no
    clipping), the shorter one padded with black around the centre, normalised with CLIP's mean and std. HPSv2
    leaves an image whose longer side is already ``size`` unpadded (its model then fails unless it is square);
    such images are padded here.
    """
    images = jnp.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"HPS preprocessing: images must be (N, H, W, 3), got shape {images.shape}")
    _, h, w, _ = images.shape
    pixels = images.astype(jnp.float32) / jnp.float32(255)  # ToTensor
    scale = size / float(max(h, w))
    if scale != 1.0:
        # Python's round, as HPSv2's ResizeMaxSize (halves to even); at least one pixel, where torch would fail.
        h, w = (max(1, round(side * scale)) for side in (h, w))
        for axis, side in ((2, w), (1, h)):
            if pixels.shape[axis] != side:
                pixels = _resize_axis(pixels, axis, side)
    top, left = (size - h) // 2, (size - w) // 2
    pixels = jnp.pad(pixels, ((0, 0), (top, size - h - top), (left, size - w - left), (0, 0)))
    return (pixels - jnp.asarray(CLIP_MEAN, jnp.float32)) / jnp.asarray(CLIP_STD, jnp.float32)


# ftfy's uncurl_quotes, which open_clip's cleanup runs: curly single and double quotes become straight ones.
_SINGLE_QUOTES = re.compile("[\u02bc\u2018-\u201b]")
_DOUBLE_QUOTES = re.compile("[\u201c-\u201f]")


def clean_prompt(text: str) -> str:
    """The part of open_clip's ``basic_clean`` that transformers' CLIP tokenizer lacks: HTML entities unescaped
    twice, curly quotes straightened (whitespace and case the tokenizer normalises itself)."""
    text = html.unescape(html.unescape(str(text)))
    return _DOUBLE_QUOTES.sub('"', _SINGLE_QUOTES.sub("'", text))


class HPSScorer(CLIPScorer):
    """A CLIPScorer with HPSv2's image transform, the raw cosine, and open_clip's prompt cleanup."""

    def __init__(self, model: CLIPModel, tokenizer: CLIPTokenizer, batch_size: int = 16, mesh: Mesh | None = None):
        super().__init__(model, tokenizer, "clip_cosine", batch_size=batch_size, mesh=mesh,
                         preprocess=hps_preprocess)

    def __call__(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        return super().__call__(images, [clean_prompt(prompt) for prompt in prompts])


def hps_tokenizer(folder: str | Path) -> CLIPTokenizer:
    """The CLIP tokenizer of ``folder``, padding with its end-of-text token.

    A pad token that is also a vocabulary entry (SD2's CLIP-H tokenizer pads with ``!``) would be split out of the
    prompts as a special token, where open_clip reads an ordinary ``!``. What follows the end-of-text token is
    never read (causal attention, pooling at that token), so open_clip's padding with id 0 gives the same score.
    """
    return load_tokenizer(component_folder(folder), pad_token=EOS_TOKEN)


def hps(hps_checkpoint: str | None = None, hps_processor: str | None = None, hps_model_config: str | None = None,
        batch_size: int = 16, mesh: Mesh | None = None) -> HPSScorer:
    """The ``hps`` built-in's factory: HPS_v2_compressed.pt or HPS_v2.1_compressed.pt, the CLIP-H tokenizer
    folder, and the open_clip model config when the checkpoint is not ViT-H-14."""
    if hps_checkpoint is None or hps_processor is None:
        raise ValueError("scorer 'hps' needs hps_checkpoint=<local HPS_v2.1_compressed.pt or HPS_v2_compressed.pt> "
                         "and hps_processor=<local CLIP-ViT-H-14-laion2B-s32B-b79K folder (its tokenizer)>")
    model = load_hps_model(hps_checkpoint, hps_model_config)
    tokenizer = hps_tokenizer(hps_processor)
    text = model.text_model.embeddings
    if tokenizer.model_max_length > text.position_embedding.num_embeddings:
        raise ValueError(f"HPS tokenizer {hps_processor} makes {tokenizer.model_max_length} tokens but the model "
                         f"reads {text.position_embedding.num_embeddings} (its context_length)")
    if len(tokenizer) > text.token_embedding.num_embeddings:
        raise ValueError(f"HPS tokenizer {hps_processor} has {len(tokenizer)} tokens but the model's vocabulary "
                         f"has {text.token_embedding.num_embeddings} (its vocab_size)")
    return HPSScorer(model, tokenizer, batch_size=batch_size, mesh=mesh)
