"""`dpojax data encode`: the cache holds exactly what the uncached step computes, and training reads it."""

import json

import jax
import numpy as np
import pytest
from flax.serialization import msgpack_restore
from helpers import pairs_workdir

from dpojax import cli, parallel
from dpojax.components import load_components
from dpojax.config import ConfigError, DataConfig, load_config
from dpojax.data.cache import make_cached_loader
from dpojax.data.pipeline import make_pair_loader, open_pairs
from dpojax.train.dpo_step import host_batch, micro_batch_inputs

CONFIG = "configs/tiny_sdxl_dpo.yaml"
PAIRS = 4


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_sdxl):
    return pairs_workdir(tmp_path_factory.mktemp("cache"), tiny_sdxl, 24, eval_rows=8, image_size=40,
                         splits=("train",))


def settings(workdir, **extra) -> list[str]:
    values = {"model.pretrained": workdir / "tiny-sdxl", "data.data_dir": workdir / "pairs", "data.flip": "none",
              "data.random_crop": False, "dpo.pairs_per_device": 1, "mesh.data": 1, "mesh.fsdp": -1,
              **extra}
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture(scope="module")
def cache(workdir):
    out = workdir / "cache"
    assert cli.main(["data", "encode", CONFIG, *settings(workdir), "--out", str(out)]) == 0
    return out


def test_cache_layout_and_refuses_to_overwrite(workdir, cache, capsys):
    meta = json.loads((cache / "cache.json").read_text())
    assert meta["pairs"] == len(open_pairs(workdir / "pairs")) and meta["is_sdxl"] and meta["dtype"] == "float32"
    before = (cache / "pairs.array_record").read_bytes()
    assert cli.main(["data", "encode", CONFIG, *settings(workdir), "--out", str(cache)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (cache / "pairs.array_record").read_bytes() == before


def test_cached_step_inputs_equal_uncached(workdir, cache):
    """Same pairs, same key: the latents drawn from the stored posterior and the stored text encodings equal
    what the step computes from pixels and captions with the frozen encoders."""
    config = load_config(CONFIG, settings(workdir, **{"data.cache_dir": cache, "data.caption_dropout": 0.0,
                                                       "data.shuffle": False}))
    mesh = parallel.make_mesh(1, -1, 1)
    components, _, frozen = load_components(config, mesh)
    raw = next(iter(make_pair_loader(DataConfig(
        data_dir=str(workdir / "pairs"), resolution=config.data.resolution, shuffle=False, flip="none",
        caption_dropout=0.0), batch_size=PAIRS, seed=0)))
    cached = next(iter(make_cached_loader(config, PAIRS)))
    key = jax.random.key(3)
    from_pixels = micro_batch_inputs(components, frozen, host_batch(components, raw), key, 2)
    from_cache = micro_batch_inputs(components, frozen, host_batch(components, cached), key, 2)
    for name, a, b in zip(("latents", "noise", "timesteps", "cond"), from_pixels, from_cache, strict=True):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-5, err_msg=name)


def test_caption_dropout_swaps_in_the_empty_prompt(workdir, cache):
    empty = msgpack_restore((cache / "empty.msgpack").read_bytes())
    for dropout, expect_empty in ((1.0, True), (0.0, False)):
        config = load_config(CONFIG, settings(workdir, **{"data.cache_dir": cache,
                                                           "data.caption_dropout": dropout}))
        batch = next(iter(make_cached_loader(config, PAIRS)))
        for key in ("hidden", "pooled"):
            assert all(np.array_equal(row, empty[key]) for row in batch[key]) == expect_empty, key


def test_train_from_cache_and_mismatched_settings(workdir, cache, capsys):
    run = workdir / "run"
    args = ["train", CONFIG, *settings(workdir, **{"data.cache_dir": cache, "dpo.steps": 2,
                                                   "train.output_dir": run, "train.sample_every": 0,
                                                   "train.export": "none", "dpo.pairs_per_device": 2,
                                                   "logging.tensorboard": False})]
    assert cli.main(args) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and records[0]["loss"] == pytest.approx(np.log(2), abs=1e-3)
    with pytest.raises(ConfigError, match="data.resolution=48 but the cache"):
        make_cached_loader(load_config(CONFIG, settings(workdir, **{"data.cache_dir": cache,
                                                                    "data.resolution": 48})), PAIRS)
    assert cli.main(["train", CONFIG, *settings(workdir, **{"data.cache_dir": workdir / "nope"})]) == 2
    assert "is not a dpojax cache" in capsys.readouterr().err
