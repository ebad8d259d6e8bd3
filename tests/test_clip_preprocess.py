"""clip_preprocess and its resize against PIL and transformers' PIL processor, bit for bit."""

import jax
import numpy as np
import pytest
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from dpojax.models.clip_vision import clip_preprocess, pil_bicubic_resize

# (height, width) -> (height, width): non-integer and large downscales, upscales, one axis kept, square, and shapes
# on either side of Pillow 13's rule for resizing the height first.
RESIZES = [((97, 61), (30, 30)), ((512, 300), (28, 47)), ((300, 512), (47, 28)), ((16, 20), (30, 37)),
           ((40, 64), (40, 30)), ((64, 40), (30, 40)), ((50, 50), (30, 30)), ((64, 64), (96, 96)),
           ((1, 5), (3, 30)), ((333, 257), (224, 289)), ((200, 60), (90, 10)), ((200, 60), (90, 5))]


def _image(height, width, kind, seed=0):
    """Uniform noise (every level, sharp edges) or a smooth pattern (the in-between values resizing produces)."""
    if kind == "random":
        return np.random.RandomState(seed).randint(0, 256, (height, width, 3)).astype(np.uint8)
    y, x = np.mgrid[:height, :width]
    base = np.stack([127 + 127 * np.sin(x / 7 + c) * np.cos(y / (5 + c)) for c in range(3)], -1)
    return np.clip(np.round(base), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("kind", ["random", "smooth"])
@pytest.mark.parametrize("shape,out", RESIZES)
def test_resize_equals_pil_bicubic(shape, out, kind):
    image = _image(*shape, kind)
    expected = np.asarray(Image.fromarray(image).resize(out[::-1], Image.BICUBIC, reducing_gap=None))
    ours = np.asarray(jax.jit(pil_bicubic_resize, static_argnums=(1, 2))(image[None], *out))[0]
    assert ours.dtype == np.uint8 and np.array_equal(ours, expected)


@pytest.mark.parametrize("kind", ["random", "smooth"])
@pytest.mark.parametrize("shape", [(97, 61), (512, 300), (16, 20), (50, 50), (30, 64), (600, 31)])
def test_preprocess_equals_clip_image_processor(shape, kind):
    """Size 30 (the tiny test towers'): down- and up-scaling, both orientations, one side already 30."""
    images = np.stack([_image(*shape, kind, seed) for seed in range(2)])
    processor = CLIPImageProcessorPil(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30})
    expected = processor(images=list(images), return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    ours = np.asarray(clip_preprocess(images, 30))
    assert ours.dtype == np.float32 and np.array_equal(ours, expected)
