"""Device mesh, logical-axis rules and the shardings they give parameters and batches.

Model code names the axes of large kernels logically ("embed", "conv_out", ...; see ``dpojax.models.layers``);
this module alone decides which mesh axis each name goes to, so data parallel, FSDP and tensor parallel are a
change of rules or mesh shape, never of model code.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

logger = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis name -> mesh axis (or tuple of mesh axes, or None = replicated).
DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    "embed": "fsdp",
    "conv_out": "fsdp",
    "mlp": "tensor",
    "vocab": None,
    "conv_in": None,
}

# Flax has renamed the variable-metadata key holding logical axis names across releases (newest first).
_LOGICAL_AXES_KEYS = ("out_sharding", "sharding_names", "sharding")


def mesh_sizes(data: int, fsdp: int, tensor: int, device_count: int) -> dict[str, int]:
    """The axis sizes of a mesh over ``device_count`` devices; one size may be -1 to fill the rest."""
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    bad = {name: size for name, size in sizes.items() if size == 0 or size < -1}
    if bad:
        raise ValueError(f"make_mesh: axis sizes must be positive or -1 (fill), got {bad}")
    fill = [name for name, size in sizes.items() if size == -1]
    if len(fill) > 1:
        raise ValueError(f"make_mesh: only one axis may be -1 (fill), got {fill}")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if fill:
        if device_count % fixed:
            raise ValueError(f"make_mesh: {device_count} devices cannot be split into {sizes}")
        sizes[fill[0]] = device_count // fixed
    if math.prod(sizes.values()) != device_count:
        raise ValueError(f"make_mesh: mesh {sizes} needs {math.prod(sizes.values())} devices, "
                         f"{device_count} available")
    return sizes


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, *, devices: Sequence | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh over ``devices`` (default: all); one size may be -1 to fill the rest.

    Axes are ``AxisType.Auto`` so jit propagates shardings (``jax.make_mesh`` would default to Explicit).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_sizes(data, fsdp, tensor, len(devices))
    shape = tuple(sizes[name] for name in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def batch_devices(mesh: Mesh) -> int:
    """Devices along the batch axes (``BATCH_AXES``: data x fsdp) of a built mesh: batch sizes per device are
    multiplied by it."""
    return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def logical_axes(variable: nnx.Variable) -> tuple[str | None, ...] | None:
    """The logical axis names a variable was annotated with, or None (the one place that knows the key)."""
    metadata = variable.get_metadata()
    for key in _LOGICAL_AXES_KEYS:
        names = metadata.get(key)
        if names:
            return tuple(names)
    return None


def resolve_rules(rules: Mapping[str, str | tuple[str, ...] | None] | None = None) -> dict:
    """The default rules updated with ``rules``."""
    return {**DEFAULT_RULES, **(rules or {})}


def partition_spec(shape: Sequence[int], names: Sequence[str | None] | None, mesh: Mesh,
                   rules: Mapping[str, str | tuple[str, ...] | None], what: str = "array") -> PartitionSpec:
    """Map logical names to a PartitionSpec; a dimension the mesh axes do not divide stays replicated."""
    if names is None:
        return PartitionSpec()
    if len(names) != len(shape):
        raise ValueError(f"{what}: {len(names)} logical axis names {tuple(names)} for shape {tuple(shape)}")
    used: set[str] = set()
    spec = []
    for dim, name in zip(shape, names, strict=True):
        axes = _mesh_axes(name, mesh, rules, what)
        size = math.prod(mesh.shape[a] for a in axes)
        if not axes or used & set(axes) or dim % size:
            if axes:
                logger.debug("%s: replicating dim %s of size %d (logical %r -> mesh %s of size %d)",
                             what, len(spec), dim, name, axes, size)
            spec.append(None)
            continue
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def _mesh_axes(name: str | None, mesh: Mesh, rules: Mapping, what: str) -> tuple[str, ...]:
    if name is None:
        return ()
    if name not in rules:
        raise ValueError(f"{what}: no mesh rule for logical axis {name!r} (rules: {sorted(rules)})")
    target = rules[name]
    axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
    unknown = [a for a in axes if a not in mesh.shape]
    if unknown:
        raise ValueError(f"rule {name!r} -> {target!r}: mesh has no axis {unknown[0]!r} "
                         f"(axes: {tuple(mesh.shape)})")
    return axes


def state_shardings(state: nnx.State, mesh: Mesh, rules: Mapping | None = None) -> nnx.State:
    """A NamedSharding for every variable of ``state`` (real or abstract), in the same tree structure."""
    rules = resolve_rules(rules)

    def sharding(path, variable):
        shape = np.shape(variable.get_value())
        spec = partition_spec(shape, logical_axes(variable), mesh, rules, what=".".join(map(str, path)))
        return variable.replace(NamedSharding(mesh, spec))

    return nnx.map_state(sharding, state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding for data arrays: the leading (batch) dimension over ("data", "fsdp"), the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows of every array placed as one global batch sharded over the batch mesh axes."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def local_rows(x: jax.Array, mesh: Mesh) -> np.ndarray:
    """This process's rows of a batch-sharded global array, on the host (``global_batch`` reversed)."""
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.global_array_to_host_local_array(x, mesh, PartitionSpec(BATCH_AXES)))


# --- per-device gradients --------------------------------------------------------------------------------------

def per_device_gradients(platform: str, mesh: Mesh, replicated_shardings) -> bool:
    """Whether :func:`data_parallel` should run its function per device on ``mesh``: a program for the CPU
    (``platform``), more than one batch device, and parameters and frozen weights (their
    ``replicated_shardings``) all replicated.

    Under jit's automatic partitioning the gradient of each parameter is a partial sum per device, reduced by
    one combined all-reduce whose operands XLA:CPU takes one at a time, each a rendezvous of every device's
    thread (docs/performance.md). On GPU and TPU the combined all-reduces overlap with the backward pass, and
    sharded weights (FSDP, tensor parallel) need their own reductions, so those keep automatic partitioning.
    """
    return (platform == "cpu" and batch_devices(mesh) > 1
            and all(s.is_fully_replicated for s in jax.tree.leaves(replicated_shardings)))


def _mean_as_one_buffer(tree, axes: tuple[str, ...]):
    """The mean over the mesh ``axes`` of a tree of arrays (inside ``shard_map``): one all-reduce of one flat
    fp32 buffer, cut back into the tree's shapes and dtypes."""
    leaves, treedef = jax.tree.flatten(tree)
    if not leaves:
        return tree
    total = jax.lax.psum(jnp.concatenate([x.astype(jnp.float32).reshape(-1) for x in leaves]), axes)
    pieces = jnp.split(total, np.cumsum([x.size for x in leaves])[:-1])
    # Divided after the split: XLA's cost analysis charges each piece's fusion for work done before its slice.
    devices = jax.lax.psum(1, axes)
    shaped = [(piece / devices).reshape(x.shape).astype(x.dtype) for piece, x in zip(pieces, leaves, strict=True)]
    return jax.tree.unflatten(treedef, shaped)


def data_parallel(fn: Callable, mesh: Mesh | None, replicated: tuple, rows: tuple):
    """``fn(*replicated, *rows) -> (grads, means, per_row)`` on a batch whose ``rows`` arrays share a leading
    axis sharded over the batch mesh axes.

    With a ``mesh``, ``fn`` runs on each device's rows inside ``shard_map``: ``grads`` and ``means`` come back
    averaged over the batch devices, the gradients as one flat all-reduce, and ``per_row`` outputs (leading
    axis: the rows) joined. That equals ``fn`` on the whole batch when every gradient and mean is a mean over
    rows, which the preference losses are. Without a mesh ``fn`` runs on the global arrays.
    """
    if mesh is None:
        return fn(*replicated, *rows)

    def per_device(replicated, rows):
        grads, means, per_row = fn(*replicated, *rows)
        return _mean_as_one_buffer(grads, BATCH_AXES), jax.lax.pmean(means, BATCH_AXES), per_row

    # Unchecked: with replication checking on, shard_map would all-reduce the gradient of each replicated input
    # itself, leaf by leaf, which is what this function exists to avoid.
    batch = PartitionSpec(BATCH_AXES)
    return jax.shard_map(per_device, mesh=mesh, in_specs=(PartitionSpec(), batch),
                         out_specs=(PartitionSpec(), PartitionSpec(), batch), check_vma=False)(replicated, rows)
