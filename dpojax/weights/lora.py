"""LoRA adapters out to diffusers: the PEFT-format file ``pipe.load_lora_weights(folder)`` reads.

The file is ``<folder>/pytorch_lora_weights.safetensors``, as diffusers' ``save_lora_weights`` writes it for a
UNet-only LoRA: keys ``unet.<module>.lora_A.weight`` (r, in) and ``unet.<module>.lora_B.weight`` (out, r) (the
generic naming rule applied to ``LoRALinear``'s parameters), and the adapter config as JSON in the safetensors
metadata under "lora_adapter_metadata" (``unet.r``, ``unet.lora_alpha``, ``unet.target_modules``). Without that
config diffusers assumes alpha = r; with it any alpha loads exactly.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from safetensors.numpy import save_file

from dpojax.distributed import barrier
from dpojax.models.lora import LoRASpec
from dpojax.weights import naming
from dpojax.weights.atomic import atomic_folder

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
PREFIX = "unet"  # the pipeline component the adapters belong to


def lora_state_dict(adapters: Mapping, prefix: str = PREFIX) -> dict[str, np.ndarray]:
    """PEFT keys and PyTorch layouts of an adapter tree; sharded arrays are gathered (every process calls it)."""
    host = multihost_utils.process_allgather(adapters, tiled=True)
    out = {}
    for path, value in nnx.traversals.flatten_mapping(host).items():
        value = np.asarray(value)
        perm = naming.to_torch_perm(path, value.ndim)
        value = value.transpose(perm) if perm else value
        out[f"{prefix}.{naming.torch_key(path)}"] = np.require(value, requirements="C")
    return out


def adapter_metadata(spec: LoRASpec, prefix: str = PREFIX) -> dict:
    """The ``peft.LoraConfig`` arguments diffusers builds the adapters from, keyed by component."""
    return {f"{prefix}.r": spec.rank, f"{prefix}.lora_alpha": spec.alpha,
            f"{prefix}.target_modules": list(spec.targets)}


def save_lora(adapters: Mapping, folder: str | Path, spec: LoRASpec) -> Path:
    """Write the adapters as a diffusers LoRA folder, atomically (process 0 writes)."""
    state_dict = lora_state_dict(adapters)
    if jax.process_index() == 0:
        metadata = {"format": "pt", METADATA_KEY: json.dumps(adapter_metadata(spec), indent=2, sort_keys=True)}
        with atomic_folder(folder) as tmp:
            save_file(state_dict, str(tmp / LORA_WEIGHTS_NAME), metadata=metadata)
    barrier("dpojax: saved lora")
    return Path(folder)
