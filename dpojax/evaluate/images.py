"""The evaluation's images on disk, cached per (model, prompt, seed, sampler settings), so a killed run resumes.

Each model gets ``OUT/images/<role>-<key>/``, where the key hashes the model folder (its path and every file's
size and modification time) and the sampler settings: retraining a model in place or changing a setting starts a
new folder instead of mixing images. Inside, ``<prompt index>_<seed>.png`` and ``manifest.json``, the prompt of
every finished image. A batch's PNGs are written first (each atomically) and the manifest after them, so an image
counts as cached only once it is whole; a run killed in between samples that batch again.

Sampling is DDIM with eta 0 (deterministic), and image (prompt, seed) starts from the x_T that ``dpojax sample
--seed SEED`` draws for one prompt, so it does not depend on which other rows share its batch. The batches are
fixed slices of the row list (the last one padded), so a resumed run computes every image exactly as an
uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from dpojax.pipeline import Pipeline, write_png
from dpojax.weights.atomic import atomic_file


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Sampler settings shared by every model of an evaluation (``resolution`` None: the model's own size).
    The batch size is one of them: XLA may round differently at another batch shape."""

    num_steps: int
    guidance: float
    resolution: int | None
    batch_size: int


@dataclasses.dataclass(frozen=True)
class Row:
    """One image to make for each model: prompt number ``index`` sampled with ``seed``."""

    index: int
    prompt: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.index:05d}_{self.seed}"


def model_key(folder: Path, sampling: Sampling) -> str:
    """Hash of the model folder's files (path, size, mtime) and the sampler settings."""
    folder = folder.resolve()
    files = sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
                   for p in folder.rglob("*") if p.is_file())
    identity = {"folder": str(folder), "files": files, "sampling": dataclasses.asdict(sampling)}
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:12]


class ImageCache:
    """The cached images of one model under one set of sampler settings."""

    def __init__(self, out_dir: Path, role: str, folder: Path, sampling: Sampling):
        self.model, self.sampling = folder, sampling
        self.dir = out_dir / "images" / f"{role}-{model_key(folder, sampling)}"
        self.dir.mkdir(parents=True, exist_ok=True)
        manifest = self.dir / "manifest.json"
        self.prompts: dict[str, str] = json.loads(manifest.read_text())["images"] if manifest.exists() else {}

    def path(self, row: Row) -> Path:
        return self.dir / f"{row.name}.png"

    def has(self, row: Row) -> bool:
        return self.prompts.get(row.name) == row.prompt and self.path(row).is_file()

    def missing_batches(self, rows: list[Row]) -> list[list[Row]]:
        """The fixed batches of ``rows`` with an image not cached yet."""
        size = self.sampling.batch_size
        batches = [rows[i:i + size] for i in range(0, len(rows), size)]
        return [batch for batch in batches if not all(map(self.has, batch))]

    def add(self, rows: list[Row], images: np.ndarray) -> None:
        """Write the images of ``rows``, then record them in the manifest."""
        for row, image in zip(rows, images, strict=True):
            write_png(image, self.path(row))
        self.prompts.update({row.name: row.prompt for row in rows})
        manifest = {"model": str(self.model.resolve()), "sampling": dataclasses.asdict(self.sampling),
                    "images": dict(sorted(self.prompts.items()))}
        with atomic_file(self.dir / "manifest.json") as f:
            f.write(json.dumps(manifest, indent=1))

    def load(self, rows: list[Row]) -> np.ndarray:
        """The cached images of ``rows``, uint8 (N, H, W, 3)."""
        return np.stack([np.asarray(Image.open(self.path(row)).convert("RGB")) for row in rows])


def sample_rows(pipe: Pipeline, rows: list[Row], sampling: Sampling) -> np.ndarray:
    """The images of ``rows``, padded with copies of the last row to a full batch (one compiled shape)."""
    padded = rows + [rows[-1]] * (sampling.batch_size - len(rows))
    height, width = (sampling.resolution,) * 2 if sampling.resolution else pipe.default_size()
    f = pipe.vae_scale_factor
    shape = (1, pipe.unet.config["in_channels"], height // f, width // f)
    # as Pipeline.sample_latents draws x_T from a seed, here one seed per row
    latents = jnp.concatenate([jax.random.normal(jax.random.split(jax.random.key(row.seed))[0], shape)
                                     for row in padded])
    images = pipe.sample([row.prompt for row in padded], num_steps=sampling.num_steps,
                         guidance_scale=sampling.guidance, eta=0.0, height=height, width=width, latents=latents)
    return images[:len(rows)]
