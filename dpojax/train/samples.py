"""The policy's images during training, for fixed prompts and seeds, so those of different steps of a run (and
of different runs) compare image by image: periodic sample grids (step 0's is the reference model's), and the
images that ``train.eval_every`` scores."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from flax import nnx

from dpojax.components import Components
from dpojax.config import Config
from dpojax.pipeline import Pipeline, write_png


def policy_pipeline(components: Components, unet: nnx.Module, frozen: dict) -> Pipeline:
    """A sampling pipeline around the trained UNet and the frozen encoders/decoder the step already holds."""
    return Pipeline.from_folder(
        components.folder, unet=unet, vae=nnx.merge(components.vae, frozen["vae"]),
        text_encoder=nnx.merge(components.text_encoder, frozen["text_encoder"]),
        text_encoder_2=(nnx.merge(components.text_encoder_2, frozen["text_encoder_2"])
                        if components.is_sdxl else None))


def image_grid(images: np.ndarray, columns: int) -> np.ndarray:
    """uint8 (N, H, W, 3) images tiled row-major into one (rows*H, columns*W, 3) image; gaps stay black."""
    n, h, w, c = images.shape
    rows = -(-n // columns)
    grid = np.zeros((rows * h, columns * w, c), np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = image
    return grid


def write_sample_grid(config: Config, components: Components, unet: nnx.Module, frozen: dict, step: int,
                      run_dir: Path) -> Path | None:
    """Sample ``train.sample_prompts`` and write ``samples/step_{step:06d}.png`` (process 0 writes; every
    process runs the sampler, whose parameters may be spread over all of them)."""
    train = config.train
    pipe = policy_pipeline(components, unet, frozen)
    size = config.resolution
    images = pipe.sample(list(train.sample_prompts), num_steps=train.sample_steps,
                         guidance_scale=train.sample_guidance, seed=train.seed, height=size, width=size)
    if jax.process_index() != 0:
        return None
    out_dir = run_dir / "samples"
    out_dir.mkdir(parents=True, exist_ok=True)
    return write_png(image_grid(images, columns=len(images)), out_dir / f"step_{step:06d}.png")


def eval_images(config: Config, components: Components, unet: nnx.Module, frozen: dict,
                prompts: list[str]) -> tuple[np.ndarray, list[str]]:
    """``train.eval_images_per_prompt`` images of each prompt (seed ``train.seed + i`` for the i-th image of
    every prompt), with the sample grids' sampler: (uint8 images, their prompts). Every process runs it."""
    train = config.train
    pipe = policy_pipeline(components, unet, frozen)
    size = config.resolution
    images = [pipe.sample(prompts, num_steps=train.sample_steps, guidance_scale=train.sample_guidance,
                          seed=train.seed + i, height=size, width=size)
              for i in range(train.eval_images_per_prompt)]
    return np.concatenate(images), prompts * train.eval_images_per_prompt
