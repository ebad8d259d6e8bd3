"""Latent and text-embedding cache: `dpojax data encode` runs the frozen encoders once, training reads the result.

Why: the VAE encoder and the text encoders are frozen, so encoding them again every epoch is wasted work; with
the cache the training step runs only the two UNets. The VAE posterior is stored as its mean and log-variance
(not a sample), so every epoch still draws a fresh latent as uncached training does. Caption dropout stays a
per-pair random choice at training time: the cache also holds the encoded empty prompt to swap in.

What the cache fixes: one centre (or the prepared random) crop and no flips; training refuses flip/crop settings
it cannot honour. Layout: ``CACHE/cache.json`` (what was encoded, from which model and data),
``CACHE/empty.msgpack`` (the empty prompt's encodings) and ``CACHE/pairs.array_record`` (one msgpack record of
NumPy arrays per pair: ``latent_mean``/``latent_logvar`` (2, C, h, w) winner first, ``hidden`` (77, D), and for
SDXL ``pooled`` (P,) and ``time_ids`` (2, 6)).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from flax import nnx
from flax.serialization import msgpack_restore, msgpack_serialize

from dpojax import parallel
from dpojax.config import Config, ConfigError
from dpojax.data.sharding import process_sampler
from dpojax.pipeline import encode_text
from dpojax.weights.atomic import atomic_folder

CACHE_FORMAT = "dpojax-latent-cache"
CACHE_VERSION = 1
RECORDS = "pairs.array_record"
STORE_DTYPES = ("float32", "float16", "bfloat16")


@nnx.jit
def _encode_pairs(vae, text_encoder, text_encoder_2, pixels, input_ids, input_ids_2):
    """(B, 2, H, W, 3) pixels and token ids -> posterior moments (B, 2, C, h, w) and text conditioning."""
    flat = pixels.reshape((-1,) + pixels.shape[2:]).transpose(0, 3, 1, 2)
    posterior = vae.encode(flat)
    moments = [m.astype(jnp.float32).reshape(pixels.shape[:2] + m.shape[1:])
               for m in (posterior.mean, posterior.logvar)]
    cond = encode_text(text_encoder, text_encoder_2, input_ids, input_ids_2)
    return moments, jax.tree.map(lambda x: x.astype(jnp.float32), cond)


def encode_cache(config: Config, out: str | Path, *, store_dtype: str = "float32") -> Path:
    """Encode every pair of ``data.split`` (model and data settings from ``config``) into a cache at ``out``."""
    from dpojax.components import DTYPES, load_components
    from dpojax.data.pipeline import make_pair_loader

    if store_dtype not in STORE_DTYPES:
        raise ValueError(f"--dtype {store_dtype!r} is not one of {', '.join(STORE_DTYPES)}")
    if jax.process_count() != 1:
        raise ValueError("dpojax data encode runs in a single process (it may use all of its devices)")
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists; the cache is never overwritten (pick a new folder)")
    data, model = config.data, config.model
    if data.data_dir is None or model.pretrained is None:
        raise ConfigError("config: data.data_dir and model.pretrained must both be set to encode a cache")
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    components, _, frozen = load_components(config, mesh, unets=False)
    folder, is_sdxl = components.folder, components.is_sdxl
    modules = tuple(None if graph is None else nnx.merge(graph, frozen[name]) for name, graph in (
        ("vae", components.vae), ("text_encoder", components.text_encoder),
        ("text_encoder_2", components.text_encoder_2)))
    devices = parallel.batch_devices(mesh)
    batch = devices * config.dpo.pairs_per_device
    in_order = dataclasses.replace(data, shuffle=False, flip="none", caption_dropout=0.0)  # every pair once, as is
    loader = make_pair_loader(in_order, batch_size=batch, seed=config.train.seed, num_epochs=1,
                              drop_remainder=False)
    sharding = parallel.batch_sharding(mesh)
    compute = jnp.dtype(DTYPES[model.dtype])

    def encode(pixels: np.ndarray, captions) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
        rows = len(captions)
        pad = -rows % devices  # the last batch is padded to split over the devices, then cut back
        ids = {k: np.pad(v, ((0, pad), (0, 0))) for k, v in folder.token_ids(list(captions)).items()}
        pixels = np.pad(pixels, ((0, pad),) + ((0, 0),) * (pixels.ndim - 1)).astype(compute)
        put = lambda x: None if x is None else jax.device_put(x, sharding)  # noqa: E731
        moments, cond = _encode_pairs(*modules, put(pixels), put(ids["input_ids"]), put(ids.get("input_ids_2")))
        text = {"hidden": cond.hidden_states, "pooled": cond.text_embeds}
        return ([np.asarray(m)[:rows] for m in moments],
                {k: np.asarray(v)[:rows] for k, v in text.items() if v is not None})

    store = lambda x: np.asarray(x, dtype=jnp.dtype(store_dtype))  # noqa: E731
    count = 0
    with atomic_folder(out) as tmp:
        writer = ArrayRecordWriter(str(tmp / RECORDS), "group_size:1")
        try:
            for element in loader:
                (mean, logvar), text = encode(element["pixels"], element["captions"])
                for i in range(len(mean)):
                    record = {"latent_mean": store(mean[i]), "latent_logvar": store(logvar[i]),
                              **{k: store(v[i]) for k, v in text.items()}}
                    if is_sdxl:
                        record["time_ids"] = np.asarray(element["time_ids"][i], np.float32)
                    writer.write(msgpack_serialize(record))
                    count += 1
        finally:
            writer.close()
        if count == 0:
            raise ValueError(f"split '{data.split}' of {data.dataset} in {data.data_dir} has no pairs to encode")
        _, empty = encode(np.zeros((1, 2, data.resolution, data.resolution, 3), np.float32), [""])
        (tmp / "empty.msgpack").write_bytes(msgpack_serialize({k: store(v[0]) for k, v in empty.items()}))
        meta = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "pairs": count, "model": str(folder.path),
                "vae": model.vae, "is_sdxl": is_sdxl, "data_dir": str(data.data_dir), "dataset": data.dataset,
                "split": data.split, "resolution": data.resolution, "random_crop": data.random_crop,
                "time_ids": data.time_ids, "dtype": store_dtype}
        (tmp / "cache.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"encoded {count} pairs into {out}")
    return out


def read_cache_meta(cache_dir: str | Path) -> dict:
    """The cache's description; a one-line error when ``cache_dir`` is not a complete dpojax cache."""
    path = Path(cache_dir) / "cache.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise FileNotFoundError(f"data.cache_dir={str(cache_dir)!r} is not a dpojax cache "
                                f"(run `dpojax data encode`): {err}") from None
    if meta.get("format") != CACHE_FORMAT or meta.get("version") != CACHE_VERSION:
        raise ValueError(f"{path}: not a version-{CACHE_VERSION} {CACHE_FORMAT} (got {meta.get('format')!r} "
                         f"version {meta.get('version')!r})")
    return meta


def check_cache_matches(config: Config, meta: dict) -> None:
    """Training from a cache must ask for what it holds: the same resolution, crop, time ids and no flips."""
    data = config.data
    wanted = {"data.resolution": (data.resolution, meta["resolution"]),
              "data.random_crop": (data.random_crop, meta["random_crop"]),
              "data.time_ids": (data.time_ids, meta["time_ids"]),
              "data.flip": (data.flip, "none")}
    for key, (value, cached) in wanted.items():
        if value != cached:
            raise ConfigError(f"config: {key}={value!r} but the cache in {data.cache_dir} holds {cached!r} "
                              f"(set {key}={cached} or encode a new cache)")


class _CachedPair(grain.transforms.RandomMap):
    """A stored record -> float32 arrays; with probability ``caption_dropout`` the text becomes the empty prompt
    (seeded per record by grain, as the uncached pipeline does)."""

    def __init__(self, empty: dict[str, np.ndarray], caption_dropout: float):
        self.empty, self.caption_dropout = empty, caption_dropout

    def random_map(self, element: bytes, rng: np.random.Generator) -> dict[str, np.ndarray]:
        record = {k: np.asarray(v, np.float32) for k, v in msgpack_restore(element).items()}
        if rng.random() < self.caption_dropout:
            record.update(self.empty)
        return record


def make_cached_loader(config: Config, batch_size: int, *,
                       process: tuple[int, int] | None = None) -> grain.DataLoader:
    """Batches of cached pairs for training, split over JAX processes like the pair loader
    (``dpojax.data.sharding``), seeded, resumable."""
    cache_dir = Path(config.data.cache_dir)
    meta = read_cache_meta(cache_dir)
    check_cache_matches(config, meta)
    source = grain.sources.ArrayRecordDataSource([str(cache_dir / RECORDS)])
    try:
        sampler = process_sampler(len(source), batch_size, shuffle=config.data.shuffle, num_epochs=None,
                                  seed=config.train.seed, process=process)
    except ValueError as err:
        raise ValueError(f"the cache in {cache_dir} has {len(source)} pairs: {err}") from None
    empty = {k: np.asarray(v, np.float32) for k, v in msgpack_restore((cache_dir / "empty.msgpack").read_bytes())
             .items()}
    return grain.DataLoader(
        data_source=source, sampler=sampler, shard_options=grain.sharding.NoSharding(),
        operations=[_CachedPair(empty, config.data.caption_dropout),
                    grain.transforms.Batch(batch_size, drop_remainder=True)])
