"""Per-pair preprocessing, matching the official Diffusion-DPO code's torchvision transforms on PIL images.

Each image: resize so the shorter side equals the resolution (PIL bilinear, as torchvision does for PIL
inputs) -> centre or random crop -> optional horizontal flip -> float32 in [-1, 1], NHWC. The flip is drawn
per image (official code) or once per pair (diffusers SDXL script). The SDXL crop coordinates are those of the
crop in the resized image; a flip does not change them. Caption dropout blanks the caption of the whole pair.
"""

from __future__ import annotations

import dataclasses
import io

import grain
import numpy as np
from PIL import Image


def decode_rgb(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    """Shorter side -> ``size``, longer side truncated like torchvision's ``Resize(int)``."""
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_short, new_long = size, int(size * long / short)
    new_size = (new_short, new_long) if width <= height else (new_long, new_short)
    return image if new_size == image.size else image.resize(new_size, Image.BILINEAR)


def crop_top_left(height: int, width: int, size: int, rng: np.random.Generator | None) -> tuple[int, int]:
    """Top-left of a ``size`` square crop: torchvision's CenterCrop rounding, or uniform like RandomCrop."""
    if rng is None:
        return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return int(rng.integers(0, height - size + 1)), int(rng.integers(0, width - size + 1))


def sdxl_time_ids(original_hw: tuple[int, int], top_left: tuple[int, int], resolution: int,
                  mode: str) -> np.ndarray:
    """SDXL micro-conditioning: (orig_h, orig_w, crop_top, crop_left, target_h, target_w).

    "constant" is the official code's [res, res, 0, 0, res, res] whatever the image; "original" is the
    diffusers SDXL script's real original size and crop.
    """
    if mode == "constant":
        return np.array([resolution, resolution, 0, 0, resolution, resolution], np.float32)
    return np.array([*original_hw, *top_left, resolution, resolution], np.float32)


def to_unit_range(image: Image.Image) -> np.ndarray:
    return np.asarray(image, np.float32) / 127.5 - 1.0


@dataclasses.dataclass(frozen=True)
class PreparePair(grain.transforms.RandomMap):
    """A stored winner-first record -> {"pixels": (2, H, W, 3), "captions": str, "time_ids": (2, 6)}.

    grain seeds ``rng`` from the sampler seed and the record index, so the same record gets the same crop,
    flips and dropout in every run and after resuming from a saved iterator state.
    """

    resolution: int
    random_crop: bool = False
    flip: str = "per_image"
    caption_dropout: float = 0.2
    time_ids: str = "constant"

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        caption = "" if rng.random() < self.caption_dropout else element["caption"].decode("utf-8")
        joint_flip = rng.random() < 0.5
        pixels, time_ids = [], []
        for key in ("jpg_w", "jpg_l"):
            image = decode_rgb(element[key])
            original_hw = (image.height, image.width)
            image = resize_shorter_side(image, self.resolution)
            top, left = crop_top_left(image.height, image.width, self.resolution,
                                      rng if self.random_crop else None)
            image = image.crop((left, top, left + self.resolution, top + self.resolution))
            if self.flip == "joint" and joint_flip or self.flip == "per_image" and rng.random() < 0.5:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
            pixels.append(to_unit_range(image))
            time_ids.append(sdxl_time_ids(original_hw, (top, left), self.resolution, self.time_ids))
        return {"pixels": np.stack(pixels), "captions": caption, "time_ids": np.stack(time_ids)}
