"""A human-feedback round on disk: the images people label and the trajectories D3PO trains on.

::

    ROUND/round.json                 {"format": "dpojax-d3po-round", "version": 1, "prompts": [...],
                                      "images_per_prompt": k, "meta": {...}}
    ROUND/images/00000.png ...       image j of prompt p is number k*p + j (D3PO's numbering)
    ROUND/trajectories.safetensors   arrays whose first axis is the prompt (latents, timesteps, ...)
    ROUND/labels/<annotator>.json    written later by the labeling page (see ``dpojax.feedback.labels``)

safetensors instead of D3PO's pickle: it cannot run code when loaded, needs no torch, and keeps bf16/fp16.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from dpojax.weights.atomic import atomic_folder

FORMAT, VERSION = "dpojax-d3po-round", 1
MANIFEST, TRAJECTORIES, IMAGES, LABELS = "round.json", "trajectories.safetensors", "images", "labels"


@dataclass
class Round:
    """prompts (P); images (P, k, H, W, 3) uint8; arrays with first axis P; meta: any JSON (sampling settings)."""

    prompts: list[str]
    images: np.ndarray
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RoundInfo:
    """What a round folder holds, without reading its images or arrays (the labeling page needs only this)."""

    path: Path
    prompts: list[str]
    images_per_prompt: int
    meta: dict[str, Any]

    def image_name(self, prompt: int, j: int) -> str:
        return f"{self.images_per_prompt * prompt + j:05d}.png"

    def image_path(self, prompt: int, j: int) -> Path:
        return self.path / IMAGES / self.image_name(prompt, j)

    @property
    def labels_dir(self) -> Path:
        return self.path / LABELS


def write_round(path: str | Path, round_: Round) -> Path:
    """Write ``round_`` as a new folder, all or nothing; an existing folder is refused, never replaced."""
    path = Path(path)
    images = np.asarray(round_.images)
    num_prompts = len(round_.prompts)
    if not all(isinstance(p, str) for p in round_.prompts) or num_prompts == 0:
        raise ValueError("round: prompts must be a non-empty list of strings")
    if images.dtype != np.uint8 or images.ndim != 5 or images.shape[0] != num_prompts or images.shape[-1] != 3:
        raise ValueError(f"round: images must be uint8 ({num_prompts}, k, H, W, 3) for {num_prompts} prompts, "
                         f"got {images.dtype} {images.shape}")
    if images.shape[1] < 2:
        raise ValueError(f"round: images_per_prompt={images.shape[1]}, D3PO compares at least 2 images per prompt")
    for name, array in round_.arrays.items():
        if np.ndim(array) == 0 or np.shape(array)[0] != num_prompts:
            raise ValueError(f"round: array {name!r} has shape {np.shape(array)}; its first axis must be the "
                             f"{num_prompts} prompts")
    manifest = {"format": FORMAT, "version": VERSION, "prompts": list(round_.prompts),
                "images_per_prompt": int(images.shape[1]), "meta": round_.meta}
    try:
        manifest_text = json.dumps(manifest, indent=1, ensure_ascii=False) + "\n"
    except (TypeError, ValueError) as err:
        raise ValueError(f"round: meta is not JSON-serialisable: {err}") from None
    if path.exists():
        raise FileExistsError(f"round folder {path} already exists; write the new round to a new folder")
    with atomic_folder(path) as tmp:
        (tmp / IMAGES).mkdir()
        (tmp / LABELS).mkdir()
        info = RoundInfo(tmp, manifest["prompts"], manifest["images_per_prompt"], round_.meta)
        for p in range(num_prompts):
            for j in range(images.shape[1]):
                Image.fromarray(images[p, j]).save(info.image_path(p, j), compress_level=3)
        save_file({k: np.ascontiguousarray(v) for k, v in round_.arrays.items()}, str(tmp / TRAJECTORIES))
        (tmp / MANIFEST).write_text(manifest_text, encoding="utf-8")  # last: its presence marks a whole round
    return path


def round_info(path: str | Path) -> RoundInfo:
    """Read and check ``round.json`` and that every image file is there; one-line errors otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"round folder {path} does not exist" if not path.exists()
                                else f"round path {path} is not a folder")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{path} is not a D3PO round folder (no {MANIFEST}); make one with "
                                f"`dpojax d3po sample CONFIG`")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{manifest_path} is not valid JSON: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{manifest_path} is not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise ValueError(f"{manifest_path}: round format version {manifest.get('version')!r} is not supported "
                         f"(this dpojax reads version {VERSION})")
    prompts, k = manifest.get("prompts"), manifest.get("images_per_prompt")
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{manifest_path}: 'prompts' must be a non-empty list of strings")
    if not isinstance(k, int) or isinstance(k, bool) or k < 2:
        raise ValueError(f"{manifest_path}: 'images_per_prompt' must be an integer >= 2, got {k!r}")
    info = RoundInfo(path, prompts, k, manifest.get("meta") or {})
    missing = [info.image_name(p, j) for p in range(len(prompts)) for j in range(k)
               if not info.image_path(p, j).is_file()]
    if missing:
        raise FileNotFoundError(f"{path / IMAGES} is missing {len(missing)} of {len(prompts) * k} images: "
                                f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return info


def read_round(path: str | Path, *, arrays: bool = True) -> Round:
    """Load a round: prompts, images (P, k, H, W, 3) and, if ``arrays``, the trajectory arrays."""
    info = round_info(path)
    num_prompts, k = len(info.prompts), info.images_per_prompt
    images, shape = [], None
    for p in range(num_prompts):
        for j in range(k):
            with Image.open(info.image_path(p, j)) as image:
                pixels = np.asarray(image.convert("RGB"))
            if shape is not None and pixels.shape != shape:
                raise ValueError(f"{info.image_path(p, j)} is {pixels.shape[1]}x{pixels.shape[0]}, the round's "
                                 f"other images are {shape[1]}x{shape[0]}")
            shape = pixels.shape
            images.append(pixels)
    loaded = _read_arrays(info) if arrays else {}
    return Round(info.prompts, np.stack(images).reshape(num_prompts, k, *shape), loaded, info.meta)


def _read_arrays(info: RoundInfo) -> dict[str, np.ndarray]:
    file = info.path / TRAJECTORIES
    if not file.is_file():
        raise FileNotFoundError(f"{info.path} has no {TRAJECTORIES} (the sampled trajectories D3PO trains on)")
    try:
        loaded = load_file(str(file))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{file} cannot be read: {err}") from None
    for name, array in loaded.items():
        if array.ndim == 0 or array.shape[0] != len(info.prompts):
            raise ValueError(f"{file}: array {name!r} has shape {array.shape}, its first axis must be the "
                             f"{len(info.prompts)} prompts of {MANIFEST}")
    return loaded
