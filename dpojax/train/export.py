"""Write a policy UNet, live or from any checkpoint, as a diffusers folder.

``unet``: a ``UNet2DConditionModel`` folder (config.json + safetensors). ``pipeline``: the base pipeline
folder (``model.pretrained``) with its ``unet`` replaced, loadable with ``DiffusionPipeline.from_pretrained``.
Both are written atomically: the target appears whole or not at all.
"""

from __future__ import annotations

from pathlib import Path

import jax
from flax import nnx

from dpojax.config import Config
from dpojax.train.checkpoint import Checkpointer
from dpojax.train.state import DTYPES, split_params
from dpojax.weights.io import abstract_module, save_pipeline, save_pretrained

EXPORT_KINDS = ("pipeline", "unet")


def write_unet(unet: nnx.Module, out: str | Path, kind: str, base: str | Path | None) -> Path:
    """Write ``unet`` as a UNet folder or as ``base`` with the UNet replaced."""
    if kind not in EXPORT_KINDS:
        raise ValueError(f"export kind {kind!r} is not one of {', '.join(EXPORT_KINDS)}")
    if kind == "unet":
        return save_pretrained(unet, out)
    if base is None:
        raise ValueError("a pipeline export needs the base pipeline folder (model.pretrained)")
    return save_pipeline(base, out, {"unet": unet})


def find_checkpoint(path: str | Path) -> tuple[Path, int]:
    """(orbax manager folder, step) for a run folder, its ``checkpoints`` folder or one step's folder."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if path.name.isdigit() and (path / "meta").exists():
        return path.parent, int(path.name)
    steps = sorted(int(p.name) for p in path.iterdir() if p.name.isdigit()) if path.is_dir() else []
    if not steps:
        raise FileNotFoundError(f"export: no checkpoint in {path} (expected a run folder, its checkpoints "
                                f"folder or a checkpoints/<step> folder)")
    return path, steps[-1]


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, kind: str = "pipeline",
                      base: str | Path | None = None) -> Path:
    """Export the policy UNet of a checkpoint (the latest one for a run folder); returns ``out``."""
    from dpojax.models.unet import UNet2DConditionModel

    directory, step = find_checkpoint(checkpoint)
    checkpointer = Checkpointer(directory, keep=1_000_000, async_save=False)
    try:
        meta = checkpointer.restore_meta(step)
        config = Config.from_dict(meta["config"])
        dtype = DTYPES[config.model.param_dtype]
        abstract = abstract_module(UNet2DConditionModel, meta["unet_config"], param_dtype=dtype)
        graph, abstract_params = split_params(abstract)
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                              abstract_params)
        params, _ = checkpointer.restore_params(step, target)
    finally:
        checkpointer.close()
    return write_unet(nnx.merge(graph, params), out, kind, base or config.model.pretrained)
