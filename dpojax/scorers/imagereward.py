"""ImageReward (THUDM's image-reward 1.5): a BLIP model fine-tuned on human preferences, scoring how well an image
matches its prompt, read from local files the user points to.

Its ``ImageReward.score(prompt, image)``: BERT's tokenizer (bert-base-uncased plus BLIP's [DEC] and [ENC] tokens;
padding to 35 tokens, truncation, attention mask), the image resized (shorter side, bicubic), centre-cropped and
normalised as torchvision's ``_transform(224)`` does, the ViT's tokens, the BERT text encoder attending to them,
its [CLS] state through an MLP (the LAION aesthetic head's layout) and ``(r - mean) / std``. The weights are
``ImageReward.pt``, a flat state dict (``blip.visual_encoder.*``, ``blip.text_encoder.*``, ``mlp.layers.*``, and
BLIP's unused contrastive projections), read without torch; ``med_config.json`` beside it sizes the text encoder.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from transformers import BertTokenizer

from dpojax.models.blip import BertModel, VisionTransformer, bert_config
from dpojax.models.clip_vision import clip_preprocess
from dpojax.scorers.aesthetic import AestheticHead
from dpojax.scorers.batched import BatchedScores
from dpojax.weights import naming
from dpojax.weights.torch_pickle import read_weights

# ImageReward.__init__'s normalisation of the MLP's output.
MEAN, STD = 0.16717362830052426, 1.0333394966054072
MAX_TOKENS = 35  # ImageReward.score's tokenizer(..., max_length=35)
VIT_HEAD_DIM = 64  # BLIP's create_vit: 'base' is 768 wide with 12 heads, 'large' 1024 wide with 16
CHECKPOINT_NAMES = ("ImageReward.safetensors", "ImageReward.pt")
CONFIG_NAME = "med_config.json"
# The BLIP parts that score() runs. The published state dict also has BLIP's contrastive projections
# (blip.vision_proj, blip.text_proj), which score() never runs, and the text encoder's position-id buffer (checked
# to be 0, 1, 2...: the positions this port uses).
SCORED_BLIP_PREFIXES = ("blip.visual_encoder.", "blip.text_encoder.")
POSITION_IDS = "blip.text_encoder.embeddings.position_ids"


class BLIP(nnx.Module):
    def __init__(self, vision: dict[str, int], text: dict[str, Any], *, rngs: nnx.Rngs, dtype=None,
                 param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.visual_encoder = VisionTransformer(**vision, **kw)
        # BLIP_Pretrain sets the cross-attention's input width from the ViT, whatever med_config.json says.
        self.text_encoder = BertModel({**text, "encoder_width": vision["width"]}, **kw)


class ImageRewardModel(nnx.Module):
    """``model(input_ids, attention_mask, pixel_values NHWC)`` -> (N,) normalised rewards; attribute paths equal
    ImageReward.pt's keys."""

    def __init__(self, vision: dict[str, int], text: dict[str, Any], *, rngs: nnx.Rngs, dtype=None,
                 param_dtype=jnp.float32):
        self.blip = BLIP(vision, text, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.mlp = AestheticHead(text["hidden_size"], rngs=rngs, param_dtype=param_dtype)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, pixel_values: jax.Array) -> jax.Array:
        image_embeds = self.blip.visual_encoder(pixel_values)
        hidden = self.blip.text_encoder(input_ids, attention_mask, image_embeds)
        return (self.mlp(hidden[:, 0].astype(jnp.float32)) - MEAN) / STD


def score_uint8(model: ImageRewardModel, batch: dict[str, jax.Array]) -> jax.Array:
    """(N,) rewards of uint8 images (N, H, W, 3) of any size against their prompts' ids and masks."""
    size = model.blip.visual_encoder.image_size
    pixels = clip_preprocess(batch["images"], size, crop="torchvision")
    return model(batch["input_ids"], batch["attention_mask"], pixels)


# --- loading -------------------------------------------------------------------------------------------------

def _layer_count(shapes: dict[str, tuple], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for key in shapes if (m := pattern.match(key))})


def vision_sizes(shapes: dict[str, tuple], path: Path) -> dict[str, int]:
    """The ViT's sizes from the checkpoint's shapes: width, depth, patch and image size; 64-wide heads."""
    prefix = "blip.visual_encoder."
    for key in ("pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight"):
        if prefix + key not in shapes:
            raise ValueError(f"{path} is not an ImageReward checkpoint: it has no {prefix + key!r} "
                             f"(keys: {', '.join(sorted(shapes)[:5])}{', ...' if len(shapes) > 5 else ''})")
    pos, proj = shapes[prefix + "pos_embed"], shapes[prefix + "patch_embed.proj.weight"]
    width, patch = int(proj[0]), int(proj[-1])
    grid = math.isqrt(max(int(pos[1]) - 1, 0)) if len(pos) == 3 else 0
    if len(pos) != 3 or grid * grid + 1 != pos[1] or len(proj) != 4 or proj[1] != 3:
        raise ValueError(f"{path}: {prefix}pos_embed {tuple(pos)} and patch_embed.proj.weight {tuple(proj)} are "
                         f"not a square ViT's (1, 1 + grid^2, width) and (width, 3, patch, patch)")
    if width % VIT_HEAD_DIM:
        raise ValueError(f"{path}: the ViT is {width} wide, not a multiple of BLIP's {VIT_HEAD_DIM}-wide heads")
    return {"image_size": grid * patch, "patch_size": patch, "width": width,
            "depth": _layer_count(shapes, prefix + "blocks."), "heads": width // VIT_HEAD_DIM,
            "mlp_dim": int(shapes[prefix + "blocks.0.mlp.fc1.weight"][0])}


def check_weights(model: ImageRewardModel, shapes: dict[str, tuple], path: Path, config_path: Path) -> None:
    """One-line errors naming the first tensor that the model, sized by the checkpoint and ``config_path``, does
    not find as it expects: blamed on the config for text-encoder and head tensors, else on the checkpoint."""
    expected = naming.to_state_dict_shapes(model)
    missing = [key for key in expected if key not in shapes]
    unexpected = sorted(set(shapes) - set(expected))
    if missing or unexpected:
        first = (f"{len(missing)} tensors missing, the first {missing[0]!r}" if missing
                 else f"{len(unexpected)} unexpected tensors, the first {unexpected[0]!r}")
        raise ValueError(f"{path} is not an ImageReward checkpoint for {config_path.name}: {first}")
    for key, shape in expected.items():
        if tuple(shapes[key]) != tuple(shape):
            if key.startswith("blip.visual_encoder."):
                raise ValueError(f"{path}: {key} has shape {tuple(shapes[key])}, not {tuple(shape)} as the rest "
                                 f"of its ViT implies")
            raise ValueError(f"{config_path} does not match {path}: {key} has shape {tuple(shapes[key])}, the "
                             f"config implies {tuple(shape)}")


def model_files(model: str | Path) -> tuple[Path, Path]:
    """(checkpoint, med_config.json) of an ImageReward folder, or of a checkpoint file with the config beside."""
    model = Path(model)
    if model.is_file():
        folder, checkpoint = model.parent, model
    elif model.is_dir():
        folder = model
        checkpoint = next((model / n for n in CHECKPOINT_NAMES if (model / n).is_file()), None)
        if checkpoint is None:
            raise FileNotFoundError(f"{model} has no {' or '.join(CHECKPOINT_NAMES)} (not an ImageReward model "
                                    f"folder: THUDM/ImageReward's ImageReward.pt and med_config.json)")
    else:
        raise FileNotFoundError(f"ImageReward model folder {model} does not exist")
    config = folder / CONFIG_NAME
    if not config.is_file():
        raise FileNotFoundError(f"{folder} has no {CONFIG_NAME} (ImageReward's text encoder config, published "
                                f"beside ImageReward.pt)")
    return checkpoint, config


def load_image_reward(model: str | Path, *, dtype=jnp.float32) -> ImageRewardModel:
    """The ImageReward model of a local folder with ImageReward.pt (or ImageReward.safetensors, the same keys)
    and med_config.json, or of the checkpoint file itself with med_config.json beside it."""
    path, config_path = model_files(model)
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} is not a BertConfig (a JSON object)")
    text = bert_config(config, str(config_path))
    if text["max_position_embeddings"] < MAX_TOKENS:
        raise ValueError(f"{config_path}: max_position_embeddings={text['max_position_embeddings']} is fewer than "
                         f"the {MAX_TOKENS} tokens ImageReward scores")
    state = read_weights(path, "ImageReward checkpoint")
    position_ids = state.pop(POSITION_IDS, None)
    if position_ids is not None and not np.array_equal(np.ravel(position_ids),
                                                       np.arange(np.size(position_ids))):
        raise ValueError(f"{path}: {POSITION_IDS} is not 0, 1, 2, ... (positions other than BERT's)")
    state = {k: v for k, v in state.items() if not k.startswith("blip.") or k.startswith(SCORED_BLIP_PREFIXES)}
    shapes = {k: tuple(np.shape(v)) for k, v in state.items()}
    vision = vision_sizes(shapes, path)
    layers = _layer_count(shapes, "blip.text_encoder.encoder.layer.")
    if layers != text["num_hidden_layers"]:
        raise ValueError(f"{config_path} does not match {path}: num_hidden_layers={text['num_hidden_layers']}, "
                         f"the checkpoint has {layers} text encoder layers")
    reward = nnx.eval_shape(lambda: ImageRewardModel(vision, text, rngs=nnx.Rngs(0), param_dtype=dtype))
    check_weights(reward, shapes, path, config_path)
    naming.load_state_dict(reward, state, str(path))
    return reward


def load_tokenizer(folder: str | Path) -> BertTokenizer:
    """BLIP's tokenizer: a local BERT tokenizer folder (bert-base-uncased) with BLIP's added special tokens."""
    folder = Path(folder)
    if not any((folder / name).is_file() for name in ("vocab.txt", "tokenizer.json")):
        raise FileNotFoundError(f"{folder} has no BERT tokenizer (vocab.txt or tokenizer.json); name a local "
                                f"bert-base-uncased folder")
    tokenizer = BertTokenizer.from_pretrained(folder)
    # As BLIP's init_tokenizer: a prompt that spells one of these out is split at it there too.
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def tokenize(tokenizer: BertTokenizer, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """int32 (ids, attention mask), each (N, 35), as ImageReward.score tokenizes a prompt."""
    if not prompts:
        return np.zeros((0, MAX_TOKENS), np.int32), np.zeros((0, MAX_TOKENS), np.int32)
    out = tokenizer([str(p) for p in prompts], padding="max_length", truncation=True, max_length=MAX_TOKENS,
                    return_tensors="np")
    return np.asarray(out["input_ids"], np.int32), np.asarray(out["attention_mask"], np.int32)


class ImageRewardScorer:
    """A Scorer: ``score_uint8`` under jit in fixed-size batches, optionally split over a mesh
    (``dpojax.scorers.batched.BatchedScores``)."""

    def __init__(self, model: ImageRewardModel, tokenizer: BertTokenizer, batch_size: int = 16,
                 mesh: Mesh | None = None):
        self.tokenizer = tokenizer
        self._batches = BatchedScores(model, score_uint8, batch_size, mesh, "ImageReward scorer")
        self.batch_size, self.mesh = self._batches.batch_size, mesh

    def __call__(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        images = np.asarray(images)
        ids, mask = tokenize(self.tokenizer, prompts)
        if len(ids) != len(images):
            raise ValueError(f"ImageReward scorer: {len(images)} images but {len(ids)} prompts")
        return self._batches({"input_ids": ids, "attention_mask": mask, "images": images})


def imagereward(imagereward_model: str | None = None, imagereward_tokenizer: str | None = None,
                batch_size: int = 16, mesh: Mesh | None = None) -> ImageRewardScorer:
    """The ``imagereward`` built-in's factory; the tokenizer folder defaults to the model folder."""
    if imagereward_model is None:
        raise ValueError("scorer 'imagereward' needs imagereward_model=<local THUDM/ImageReward folder: "
                         "ImageReward.pt and med_config.json> and imagereward_tokenizer=<local bert-base-uncased "
                         "folder> (unless the model folder has the tokenizer files)")
    model = load_image_reward(imagereward_model)
    tokenizer_folder = imagereward_tokenizer
    if tokenizer_folder is None:
        tokenizer_folder = imagereward_model if Path(imagereward_model).is_dir() else Path(imagereward_model).parent
    return ImageRewardScorer(model, load_tokenizer(tokenizer_folder), batch_size=batch_size, mesh=mesh)
