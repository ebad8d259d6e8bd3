"""The reward proxies of DDPO/D3PO (``rewards.py`` there) that need no model: scoring functions of the images
alone (``dpojax.scorers.base.ScoreFn``), built-ins of the registry."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image


def jpeg_kilobytes(images: np.ndarray, prompts: Sequence[str] = ()) -> np.ndarray:
    """Size of each image as a quality-95 JPEG in kB (bytes / 1000), as DDPO's jpeg_(in)compressibility."""
    sizes = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=95)
        sizes.append(buffer.tell() / 1000)
    return np.asarray(sizes, np.float32)


def jpeg_compressibility(images: np.ndarray, prompts: Sequence[str] = ()) -> np.ndarray:
    """Smaller JPEG files are better."""
    return -jpeg_kilobytes(images, prompts)


def brightness(images: np.ndarray, prompts: Sequence[str] = ()) -> np.ndarray:
    """Mean pixel value in [0, 1] (D3PO's light_reward, which averages the decoded [0, 1] image)."""
    return images.reshape(len(images), -1).mean(axis=1, dtype=np.float64).astype(np.float32) / 255.0
