"""Write a policy UNet, live or from any checkpoint, as a diffusers folder.

``unet``: a ``UNet2DConditionModel`` folder (config.json + safetensors). ``pipeline``: the base pipeline
folder (``model.pretrained``) with its ``unet`` replaced, loadable with ``DiffusionPipeline.from_pretrained``.
``lora`` (LoRA runs only): the adapters alone in diffusers' LoRA format, for ``pipe.load_lora_weights(folder)``
on the base pipeline; a LoRA run's ``unet`` and ``pipeline`` exports hold the full UNet with the adapters
merged into the base weights. All are written atomically: the target appears whole or not at all.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

from dpojax.components import DTYPES, abstract_lora_policy, lora_spec, split_params
from dpojax.config import Config
from dpojax.models.lora import merge_adapters, split_adapters, with_adapters
from dpojax.train.checkpoint import Checkpointer
from dpojax.weights.io import abstract_module, save_pipeline, save_pretrained
from dpojax.weights.lora import save_lora

UNET_KINDS = ("pipeline", "unet")
EXPORT_KINDS = (*UNET_KINDS, "lora")


def write_unet(unet: nnx.Module, out: str | Path, kind: str, base: str | Path | None) -> Path:
    """Write ``unet`` as a UNet folder or as ``base`` with the UNet replaced."""
    if kind not in UNET_KINDS:
        raise ValueError(f"export kind {kind!r} is not one of {', '.join(UNET_KINDS)}")
    if kind == "unet":
        return save_pretrained(unet, out)
    if base is None:
        raise ValueError("a pipeline export needs the base pipeline folder (model.pretrained)")
    return save_pipeline(base, out, {"unet": unet})


def merged_unet(base: str | Path, adapters: Mapping, scale: float, *, dtype=jnp.float32) -> nnx.Module:
    """The UNet of the pipeline folder ``base`` in ``dtype`` with the adapters merged in (W + scale · B A).

    The base weights are placed like the adapters: over their mesh when they are sharded (a training run's
    final export), else on their one device.
    """
    from dpojax.models.unet import UNet2DConditionModel

    sharding = jax.tree.leaves(adapters)[0].sharding
    mesh = sharding.mesh if isinstance(sharding, NamedSharding) else None
    unet = UNet2DConditionModel.from_pretrained(base, "unet", dtype=dtype, mesh=mesh)
    graph, params = nnx.split(unet, nnx.Param)
    try:
        adapted = with_adapters(nnx.to_pure_dict(params), adapters)
        merged = jax.jit(merge_adapters, static_argnums=1)(adapted, scale)
    except ValueError as err:
        raise ValueError(f"{Path(base) / 'unet'}: {err}") from None
    return nnx.merge(graph, merged)


def write_policy(graph: nnx.GraphDef, params, out: str | Path, kind: str, config: Config,
                 base: str | Path | None = None) -> Path:
    """Write the policy as the trainer holds it: ``graph`` (``components.unet``) and the trainable ``params``,
    the whole UNet or, in a LoRA run, the adapters (merged kinds read the base UNet from ``base`` or
    ``model.pretrained``)."""
    if kind not in EXPORT_KINDS:
        raise ValueError(f"export kind {kind!r} is not one of {', '.join(EXPORT_KINDS)}")
    spec = lora_spec(config.model)
    base = base or config.model.pretrained
    if kind == "lora":
        if spec is None:
            raise ValueError("export kind 'lora' needs a LoRA run (model.lora_rank > 0); this one trained the "
                             "full UNet")
        return save_lora(params, out, spec)
    if spec is None:
        unet = nnx.merge(graph, params)
    elif base is None:
        raise ValueError("a merged LoRA export needs the base pipeline folder (model.pretrained or --base)")
    else:
        unet = merged_unet(base, params, spec.scale, dtype=DTYPES[config.model.param_dtype])
    return write_unet(unet, out, kind, base)


def find_checkpoint(path: str | Path, which: str = "latest") -> tuple[Path, int]:
    """(orbax manager folder, step) for a run folder or its ``checkpoints`` folder and ``which`` ("latest",
    "best": the best evaluation's, or a step number), or for one step's folder."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if path.name.isdigit() and (path / "meta").exists():
        return path.parent, int(path.name)
    steps = sorted(int(p.name) for p in path.iterdir() if p.name.isdigit()) if path.is_dir() else []
    if not steps:
        raise FileNotFoundError(f"export: no checkpoint in {path} (expected a run folder, its checkpoints "
                                f"folder or a checkpoints/<step> folder)")
    if which == "latest":
        return path, steps[-1]
    if which == "best":
        checkpointer = Checkpointer(path, keep=len(steps), async_save=False)
        try:
            return path, checkpointer.best_step()
        finally:
            checkpointer.close()
    if not which.isdigit() or int(which) not in steps:
        raise FileNotFoundError(f"export: {path} has no checkpoint {which!r} (steps: "
                                f"{', '.join(map(str, steps))}; or latest, best)")
    return path, int(which)


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, kind: str = "pipeline",
                      base: str | Path | None = None, which: str = "latest") -> Path:
    """Export the policy of a checkpoint (of a run folder: ``which`` one, see ``find_checkpoint``) as ``kind``;
    returns ``out``."""
    from dpojax.models.unet import UNet2DConditionModel

    directory, step = find_checkpoint(checkpoint, which)
    checkpointer = Checkpointer(directory, keep=1_000_000, async_save=False)
    try:
        meta = checkpointer.restore_meta(step)
        config = Config.from_dict(meta["config"])
        spec = lora_spec(config.model)
        if spec is None:
            abstract = abstract_module(UNet2DConditionModel, meta["unet_config"],
                                       param_dtype=DTYPES[config.model.param_dtype])
            graph, abstract_params = split_params(abstract)
        else:  # the checkpoint holds the adapters alone
            graph, abstract_state = abstract_lora_policy(meta["unet_config"], spec, config.model)
            abstract_params = split_adapters(nnx.to_pure_dict(abstract_state))[1]
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                              abstract_params)
        params, _ = checkpointer.restore_params(step, target)
    finally:
        checkpointer.close()
    return write_policy(graph, params, out, kind, config, base)
