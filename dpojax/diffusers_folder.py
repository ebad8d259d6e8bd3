"""What a diffusers pipeline folder says: its pipeline class and architecture, noise schedule, tokenizers and
tokenization, and whether the empty negative prompt is all zeros.

The one reader of ``model_index.json``, ``scheduler/scheduler_config.json`` and the tokenizer folders; the
trainer, the sampler, the JAX pipeline and the latent cache all take these facts from here, so they agree.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from transformers import CLIPTokenizer

from dpojax.schedule import NoiseSchedule
from dpojax.weights.folder import component_folder, read_config

# Pipeline class -> the model.arch names it may be.
PIPELINE_ARCHS = {"StableDiffusionPipeline": ("sd15", "sd2"), "StableDiffusionXLPipeline": ("sdxl",)}


@dataclasses.dataclass(frozen=True, eq=False)
class PipelineFolder:
    """The facts of one pipeline folder that are not model weights."""

    path: Path
    class_name: str
    scheduler: NoiseSchedule | None  # None when scheduler/scheduler_config.json is missing (see ``schedule``)
    # None in a folder of architecture configs alone (``dpojax plan``): nothing is tokenized there.
    tokenizer: CLIPTokenizer | None
    tokenizer_2: CLIPTokenizer | None  # SDXL only
    # diffusers' SDXL default: the negative of an empty prompt is all-zero embeddings, not the encoded "".
    force_zeros_for_empty_prompt: bool

    @property
    def is_sdxl(self) -> bool:
        return self.class_name == "StableDiffusionXLPipeline"

    @property
    def schedule(self) -> NoiseSchedule:
        """The noise schedule of ``scheduler/scheduler_config.json``; a missing file is an error when a
        schedule is needed, so that a folder's other problems are named first."""
        if self.scheduler is None:
            raise FileNotFoundError(f"{self.path} has no scheduler/scheduler_config.json")
        return self.scheduler

    def component_config(self, name: str) -> dict:
        """``<name>/config.json`` (a one-line error when the component or its config is missing)."""
        return read_config(component_folder(self.path, name))

    def token_ids(self, prompts: Sequence[str]) -> dict[str, np.ndarray]:
        """The ids the text encoders take: ``input_ids`` and, for SDXL, ``input_ids_2``."""
        if self.tokenizer is None:
            raise FileNotFoundError(f"{self.path} has no tokenizer folder (it holds architecture configs only)")
        ids = {"input_ids": tokenize(self.tokenizer, prompts)}
        if self.is_sdxl:
            ids["input_ids_2"] = tokenize(self.tokenizer_2, prompts)
        return ids


def tokenize(tokenizer: CLIPTokenizer, prompts: Sequence[str]) -> np.ndarray:
    """CLIP token ids, padded to the tokenizer's length (77) and truncated, int32."""
    ids = tokenizer([str(p) for p in prompts], padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="np").input_ids
    return np.asarray(ids, np.int32)


def read_pipeline_folder(folder: str | Path | None, arch: str = "auto") -> PipelineFolder:
    """Read ``folder`` (``model.pretrained``), checking ``arch`` (``model.arch``) against its pipeline class."""
    if folder is None:
        raise FileNotFoundError("config: model.pretrained must name a local diffusers pipeline folder, got null")
    folder = Path(folder)
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise FileNotFoundError(f"{folder} has no model_index.json (not a diffusers pipeline folder)")
    try:
        index = json.loads(index_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{index_path} is not valid JSON: {err}") from None
    class_name = index.get("_class_name")
    if class_name not in PIPELINE_ARCHS:
        raise ValueError(f"{index_path}: _class_name={class_name!r} is not supported "
                         f"(choose one of {', '.join(PIPELINE_ARCHS)})")
    if arch != "auto" and arch not in PIPELINE_ARCHS[class_name]:
        raise ValueError(f"config: model.arch={arch!r} does not match {folder} ({class_name})")
    is_sdxl = class_name == "StableDiffusionXLPipeline"
    return PipelineFolder(
        path=folder, class_name=class_name, scheduler=_schedule(folder / "scheduler" / "scheduler_config.json"),
        tokenizer=_tokenizer(folder / "tokenizer"),
        tokenizer_2=_tokenizer(folder / "tokenizer_2") if is_sdxl else None,
        force_zeros_for_empty_prompt=is_sdxl and index.get("force_zeros_for_empty_prompt", True))


def _schedule(path: Path) -> NoiseSchedule | None:
    if not path.is_file():
        return None
    try:
        return NoiseSchedule.from_config(json.loads(path.read_text()))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None


def _tokenizer(path: Path) -> CLIPTokenizer | None:
    return CLIPTokenizer.from_pretrained(path) if path.is_dir() else None
