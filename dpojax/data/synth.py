"""Synthetic Pick-a-Pic v2 shards with a known, measurable preference: the brighter image is preferred.

Every row has two real JPEGs of one random scene (smooth colour field plus a disc) rendered at two brightness
levels drawn from disjoint ranges, so the mean brightness separates winner from loser on every non-tie pair,
even after JPEG compression and resizing. A tiny diffusion model trained with DPO on these pairs should make
brighter samples than its reference, and a test can measure that with the same mean (``preference_score`` of
tests/helpers.py).
"""

from __future__ import annotations

import dataclasses
import datetime
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from dpojax.data.schema import PICKAPIC_SCHEMA, shard_name

PROMPTS = (
    "a red cube on a wooden table",
    "a lighthouse on a cliff at dusk",
    "a bowl of oranges, studio photo",
    "an astronaut riding a horse",
    "a snowy mountain village at night",
    "a cat sleeping on a windowsill",
    "a watercolor painting of a forest",
    "a city street in the rain, neon lights",
    "a vintage car parked by the sea",
    "a portrait of an old fisherman",
    "a field of sunflowers under a blue sky",
    "a dragon made of glass",
)
MODELS = (
    "dreamlike-art/dreamlike-photoreal-2.0",
    "dreamlike-art/dreamlike-diffusion-1.0",
    "stabilityai/stable-diffusion-xl-beta-v2-2-2",
    "runwayml/stable-diffusion-v1-5",
)
WINNER_LEVELS = (0.62, 0.80)  # mean brightness of the preferred image
LOSER_LEVELS = (0.20, 0.38)  # mean brightness of the other one; disjoint from the winner's range
TIE_LEVELS = (0.35, 0.65)


@dataclasses.dataclass(frozen=True)
class SynthReport:
    """What was written, so tests can compare the builder's counts with the truth."""

    files: tuple[Path, ...]
    rows: dict[str, int]
    ties: dict[str, int]
    corrupt_images: int
    missing_captions: int


def write_synthetic_pickapic(out_dir: str | Path, num_rows: int, *, seed: int, image_size: int = 64,
                             shards: int = 2, tie_fraction: float = 0.1, eval_rows: int | None = None,
                             corrupt_images: int = 0, missing_captions: int = 0) -> SynthReport:
    """Write train, validation and validation_unique shards in the Hub layout: out_dir/data/<split>-*.parquet.

    ``num_rows`` train rows go into ``shards`` files; each evaluation split gets ``eval_rows`` rows in one
    file (default ``max(2, num_rows // 8)``). ``image_size`` is the shorter side; images are square or 5:4
    either way, so resizing and SDXL original-size conditioning see real variety. ``corrupt_images`` train
    rows get one truncated JPEG and ``missing_captions`` train rows a null or blank caption (never on a
    tie, so each damaged row has one skip reason), to exercise the builder's skips.
    """
    if num_rows < 1 or shards < 1 or image_size < 8:
        raise ValueError(f"write_synthetic_pickapic needs num_rows >= 1, shards >= 1, image_size >= 8; got "
                         f"num_rows={num_rows}, shards={shards}, image_size={image_size}")
    if not 0.0 <= tie_fraction <= 1.0:
        raise ValueError(f"tie_fraction must be in [0, 1], got {tie_fraction}")
    if corrupt_images + missing_captions > num_rows - round(tie_fraction * num_rows):
        raise ValueError(f"corrupt_images + missing_captions ({corrupt_images + missing_captions}) exceeds "
                         f"the {num_rows - round(tie_fraction * num_rows)} rows that are not ties")
    data_dir = Path(out_dir) / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    eval_rows = max(2, num_rows // 8) if eval_rows is None else eval_rows
    plan = {"train": (num_rows, shards, corrupt_images, missing_captions),
            "validation": (eval_rows, 1, 0, 0), "validation_unique": (eval_rows, 1, 0, 0)}
    files, rows, ties = [], {}, {}
    for split_index, (split, (count, num_shards, n_corrupt, n_missing)) in enumerate(plan.items()):
        rng = np.random.default_rng([seed, split_index])
        table = _split_table(rng, count, image_size, tie_fraction, n_corrupt, n_missing)
        num_shards = min(num_shards, count)
        for shard, index in enumerate(np.array_split(np.arange(count), num_shards)):
            path = data_dir / shard_name(split, shard, num_shards)
            pq.write_table(table.take(pa.array(index)), path)
            files.append(path)
        rows[split] = count
        ties[split] = int(np.sum(np.asarray(table["label_0"]) == 0.5))
    return SynthReport(tuple(files), rows, ties, corrupt_images, missing_captions)


def _split_table(rng: np.random.Generator, count: int, image_size: int, tie_fraction: float,
                 n_corrupt: int, n_missing: int) -> pa.Table:
    is_tie = np.zeros(count, bool)
    is_tie[rng.choice(count, round(tie_fraction * count), replace=False)] = True
    damaged = rng.permutation(np.flatnonzero(~is_tie))  # never ties, so each skip has exactly one reason
    corrupt, missing = set(damaged[:n_corrupt].tolist()), damaged[n_corrupt:n_corrupt + n_missing].tolist()
    start = datetime.datetime(2023, 5, 1)
    records = []
    for i in range(count):
        label_0 = 0.5 if is_tie[i] else float(rng.integers(0, 2))
        jpgs = _render_pair(rng, image_size, label_0)
        if i in corrupt:
            side = int(rng.integers(0, 2))
            jpgs[side] = jpgs[side][: len(jpgs[side]) // 2]
        uids = [f"{rng.integers(1 << 62):016x}" for _ in range(2)]
        caption = PROMPTS[int(rng.integers(len(PROMPTS)))]
        if i in missing:
            caption = None if missing.index(i) % 2 == 0 else "  "
        best = "" if label_0 == 0.5 else uids[0 if label_0 == 1.0 else 1]
        records.append({
            "are_different": True, "best_image_uid": best, "caption": caption,
            "created_at": start + datetime.timedelta(minutes=i), "has_label": True,
            "image_0_uid": uids[0], "image_0_url": f"https://example.invalid/{uids[0]}.jpg",
            "image_1_uid": uids[1], "image_1_url": f"https://example.invalid/{uids[1]}.jpg",
            "jpg_0": jpgs[0], "jpg_1": jpgs[1], "label_0": label_0, "label_1": 1.0 - label_0,
            "model_0": MODELS[rng.integers(len(MODELS))], "model_1": MODELS[rng.integers(len(MODELS))],
            "ranking_id": int(rng.integers(1 << 40)), "user_id": int(rng.integers(1 << 20)),
            "num_example_per_prompt": 1, "__index_level_0__": i,
        })
    return pa.Table.from_pylist(records, schema=PICKAPIC_SCHEMA)


def _render_pair(rng: np.random.Generator, image_size: int, label_0: float) -> list[bytes]:
    """Two JPEGs of one scene; the image that ``label_0`` prefers is rendered brighter."""
    long_side = image_size * 5 // 4
    shapes = [(image_size, image_size), (image_size, long_side), (long_side, image_size)]
    height, width = shapes[rng.integers(len(shapes))]
    scene = _scene(rng, height, width)
    if label_0 == 0.5:
        levels = rng.uniform(*TIE_LEVELS, size=2)
    else:
        levels = np.array([rng.uniform(*WINNER_LEVELS), rng.uniform(*LOSER_LEVELS)])
        if label_0 == 0.0:
            levels = levels[::-1]
    return [_jpeg(np.clip(scene + level, 0.0, 1.0)) for level in levels]


def _scene(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A zero-mean smooth colour field with a disc, amplitude 0.15: the level alone sets the brightness."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    field = np.zeros((height, width, 3))
    for _ in range(3):
        freq, phase, colour = rng.uniform(1, 4, 2), rng.uniform(0, 2 * np.pi), rng.uniform(-1, 1, 3)
        field += np.sin(2 * np.pi * (freq[0] * y + freq[1] * x) + phase)[..., None] * colour
    cy, cx, radius = rng.uniform(0.25, 0.75), rng.uniform(0.25, 0.75), rng.uniform(0.1, 0.25)
    field += ((y - cy) ** 2 + (x - cx) ** 2 < radius**2)[..., None] * rng.uniform(-1, 1, 3)
    field -= field.mean(axis=(0, 1))
    return 0.15 * field / max(np.abs(field).max(), 1e-6)


def _jpeg(image01: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.round(image01 * 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()
