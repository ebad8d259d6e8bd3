"""Tiny random pipelines in exact diffusers layout, made locally (no torch, no network).

They are the embedded default of the demo and the tests: small enough to train on a laptop CPU, shaped like
the real SDXL and SD1.5 architectures so every code path (dual text encoders, text_time embedding, cross
attention at several levels) is exercised.
"""

from __future__ import annotations

import json
from pathlib import Path

from flax import nnx

DIFFUSERS_VERSION = "0.42.1"
TEXT_HIDDEN = 32
TEXT_VOCAB = 1000

SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": DIFFUSERS_VERSION,
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}

VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,  # several channels per group, as in the real VAEs (128/32): then latent colour survives
    "sample_size": 64,
}

UNET_SDXL = {
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2],
    "attention_head_dim": [2, 4],
    "use_linear_projection": True,
    "cross_attention_dim": 2 * TEXT_HIDDEN,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 6 * 8 + TEXT_HIDDEN,
    "norm_num_groups": 32,
}

UNET_SD15 = {
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "attention_head_dim": 8,
    "cross_attention_dim": TEXT_HIDDEN,
    "norm_num_groups": 32,
}


def text_encoder_config(*, projection: bool, hidden_act: str, token_ids: dict[str, int]) -> dict:
    return {
        "architectures": ["CLIPTextModelWithProjection" if projection else "CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": TEXT_VOCAB,
        "hidden_size": TEXT_HIDDEN,
        "intermediate_size": 37,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "hidden_act": hidden_act,
        "layer_norm_eps": 1e-5,
        "projection_dim": TEXT_HIDDEN,
        **token_ids,
    }


def _model_index(arch: str) -> dict:
    common = {
        "_diffusers_version": DIFFUSERS_VERSION,
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
    }
    if arch == "sdxl":
        return {"_class_name": "StableDiffusionXLPipeline", **common,
                "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                "tokenizer_2": ["transformers", "CLIPTokenizer"], "force_zeros_for_empty_prompt": True}
    return {"_class_name": "StableDiffusionPipeline", **common, "safety_checker": [None, None],
            "requires_safety_checker": False}


def write_tiny_pipeline(path: str | Path, arch: str = "sdxl", seed: int = 0) -> Path:
    """Write a tiny random pipeline folder; refuses to touch an existing path."""
    from dpojax.models import AutoencoderKL, CLIPTextModel, CLIPTextModelWithProjection, UNet2DConditionModel
    from dpojax.weights.atomic import atomic_folder
    from dpojax.weights.tiny_tokenizer import write_tiny_clip_tokenizer

    if arch not in ("sdxl", "sd15"):
        raise ValueError(f"init-tiny: unknown arch {arch!r} (choose 'sdxl' or 'sd15')")
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"init-tiny: {path} already exists; choose a new path (nothing was changed)")
    rngs = nnx.Rngs(seed)
    with atomic_folder(path) as tmp:
        (tmp / "model_index.json").write_text(json.dumps(_model_index(arch), indent=2))
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=2))
        ids = write_tiny_clip_tokenizer(tmp / "tokenizer", vocab_size=TEXT_VOCAB, pad_token="<|endoftext|>")
        CLIPTextModel.from_config(text_encoder_config(projection=False, hidden_act="quick_gelu", token_ids=ids),
                                  rngs=rngs).save_pretrained(tmp / "text_encoder")
        if arch == "sdxl":
            ids2 = write_tiny_clip_tokenizer(tmp / "tokenizer_2", vocab_size=TEXT_VOCAB, pad_token="!")
            CLIPTextModelWithProjection.from_config(
                text_encoder_config(projection=True, hidden_act="gelu", token_ids=ids2), rngs=rngs,
            ).save_pretrained(tmp / "text_encoder_2")
        unet_config = UNET_SDXL if arch == "sdxl" else UNET_SD15
        UNet2DConditionModel.from_config(unet_config, rngs=rngs).save_pretrained(tmp / "unet")
        AutoencoderKL.from_config(VAE, rngs=rngs).save_pretrained(tmp / "vae")
    return path
