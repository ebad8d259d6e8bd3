"""The grain pair loader: layout, preprocessing, sharding, resumable state, caption dropout, time_ids."""

import hashlib
import io
import itertools

import numpy as np
import pytest
from helpers import preference_score
from PIL import Image

from dpojax.config import ConfigError, DataConfig, load_config
from dpojax.data.pickapic import prepare_pickapic
from dpojax.data.pipeline import make_pair_loader, open_pairs
from dpojax.data.synth import write_synthetic_pickapic
from dpojax.data.transforms import resize_shorter_side

IMAGE_SIZE = 32  # shorter side of the synthetic images (they are 32x32, 32x40 or 40x32)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    write_synthetic_pickapic(src, 40, seed=3, image_size=IMAGE_SIZE, tie_fraction=0.2)
    out = tmp_path_factory.mktemp("tfds")
    report = prepare_pickapic(src, out, splits=("train",))
    assert report.counts["train"]["kept"] == 32
    return str(out)


LOADER_ARGS = ("batch_size", "seed", "num_epochs")  # the rest are the config's data keys


def _config(data_dir, **overrides) -> dict:
    settings = {"data_dir": data_dir, "batch_size": 4, "resolution": 16, "seed": 7, "caption_dropout": 0.0}
    return {**settings, **overrides}


def _loader(settings: dict, **loader_kwargs):
    data = DataConfig(**{k: v for k, v in settings.items() if k not in LOADER_ARGS})
    return make_pair_loader(data, **{k: v for k, v in settings.items() if k in LOADER_ARGS}, **loader_kwargs)


def _batches(config, count=None, **loader_kwargs) -> list[dict]:
    return list(itertools.islice(_loader(config, **loader_kwargs), count))


def _decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
    return np.round((pixels + 1.0) * 127.5).astype(np.uint8)


def test_batches_hold_winner_then_loser_in_the_documented_layout(data_dir):
    batches = _batches(_config(data_dir, num_epochs=1))
    assert len(batches) == 8
    for batch in batches:
        assert batch["pixels"].shape == (4, 2, 16, 16, 3) and batch["pixels"].dtype == np.float32
        assert batch["time_ids"].shape == (4, 2, 6)
        assert batch["captions"].shape == (4,) and all(isinstance(c, str) and c for c in batch["captions"])
        assert batch["pixels"].min() >= -1.0 and batch["pixels"].max() <= 1.0
        scores = preference_score(_to_uint8(batch["pixels"]))
        assert np.all(scores[:, 0] > scores[:, 1] + 0.15)  # the synthetic rule survives decode and resize


def test_centre_crop_at_native_size_is_exact_and_resize_follows_torchvision(data_dir):
    source = open_pairs(data_dir)
    pixels = np.concatenate([b["pixels"] for b in _batches(
        _config(data_dir, resolution=IMAGE_SIZE, shuffle=False, num_epochs=1, flip="none"))])
    for i in range(len(source)):
        image = _decode(source[i]["jpg_w"])  # no resize needed: centre crop of the long side only
        top, left = (image.shape[0] - IMAGE_SIZE) // 2, (image.shape[1] - IMAGE_SIZE) // 2
        expected = image[top:top + IMAGE_SIZE, left:left + IMAGE_SIZE] / 127.5 - 1.0
        np.testing.assert_allclose(pixels[i, 0], expected, atol=1e-6)
    cases = [(40, 32, 16, (20, 16)), (32, 40, 16, (16, 20)), (85, 64, 32, (42, 32)), (64, 64, 32, (32, 32))]
    for width, height, size, expected in cases:
        assert resize_shorter_side(Image.new("RGB", (width, height)), size).size == expected


def test_two_processes_read_disjoint_parts_that_cover_the_split(data_dir):
    def digests(index):
        batches = _batches(_config(data_dir, num_epochs=1, flip="none"), process=(index, 2))
        return {hashlib.sha1(pair[0].tobytes()).hexdigest() for b in batches for pair in b["pixels"]}

    first, second = digests(0), digests(1)
    assert len(first) == len(second) == 16
    assert not first & second


def test_restoring_the_iterator_state_replays_the_same_batches(data_dir):
    config = _config(data_dir, random_crop=True, caption_dropout=0.5, time_ids="original")
    iterator = iter(_loader(config))
    for _ in range(3):
        next(iterator)
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(10)]  # crosses an epoch boundary (8 batches per epoch)
    resumed = iter(_loader(config))
    resumed.set_state(state)
    for want, got in zip(expected, [next(resumed) for _ in range(10)], strict=True):
        for key in ("pixels", "time_ids", "captions"):
            np.testing.assert_array_equal(got[key], want[key])


def test_caption_dropout_blanks_about_p_of_the_pairs(data_dir):
    config = _config(data_dir, resolution=8, caption_dropout=0.2, num_epochs=20, flip="none")
    captions = np.concatenate([b["captions"] for b in _batches(config)])
    assert captions.size == 640
    assert abs(np.mean(captions == "") - 0.2) < 0.05  # 3 sigma of a binomial(640, 0.2) rate is 0.047
    assert not np.any(np.concatenate([b["captions"] for b in _batches(_config(data_dir), 4)]) == "")


def test_time_ids_constant_or_the_real_original_size_and_crop(data_dir):
    constant = np.concatenate([b["time_ids"] for b in _batches(_config(data_dir, num_epochs=1))])
    assert np.all(constant == np.array([16, 16, 0, 0, 16, 16], np.float32))

    source = open_pairs(data_dir)
    original = np.concatenate([b["time_ids"] for b in _batches(
        _config(data_dir, num_epochs=1, shuffle=False, time_ids="original"))])
    for i in range(len(source)):
        for side, key in enumerate(("jpg_w", "jpg_l")):
            height, width = _decode(source[i][key]).shape[:2]
            resized_h, resized_w = 16 * height // min(height, width), 16 * width // min(height, width)
            expected = [height, width, round((resized_h - 16) / 2), round((resized_w - 16) / 2), 16, 16]
            np.testing.assert_array_equal(original[i, side], expected)
    assert np.any(original[:, :, 2:4] > 0)

    randomly_cropped = np.concatenate([b["time_ids"] for b in _batches(
        _config(data_dir, num_epochs=1, random_crop=True, time_ids="original"))])
    spare = randomly_cropped[:, :, :2] * 16 // randomly_cropped[:, :, :2].min(axis=-1, keepdims=True) - 16
    assert np.all((randomly_cropped[:, :, 2:4] >= 0) & (randomly_cropped[:, :, 2:4] <= spare))
    assert len(np.unique(randomly_cropped[:, :, 3][spare[:, :, 1] > 0])) > 1


@pytest.mark.parametrize("mode", ["per_image", "joint"])
def test_flips_are_drawn_per_image_or_once_per_pair(data_dir, mode):
    plain = np.concatenate([b["pixels"] for b in _batches(_config(data_dir, num_epochs=1, shuffle=False,
                                                                  flip="none"))])
    flipped = np.concatenate([b["pixels"] for b in _batches(_config(data_dir, num_epochs=1, shuffle=False,
                                                                    flip=mode))])
    was_flipped = np.all(flipped == plain[:, :, :, ::-1], axis=(2, 3, 4))
    assert np.all(was_flipped | np.all(flipped == plain, axis=(2, 3, 4)))
    assert 0 < was_flipped.mean() < 1
    same_within_pair = np.all(was_flipped[:, 0] == was_flipped[:, 1])
    assert same_within_pair if mode == "joint" else not same_within_pair


@pytest.mark.slow
def test_worker_processes_give_the_same_batches_and_resume(data_dir):
    config = _config(data_dir, random_crop=True, caption_dropout=0.5)
    in_process = _batches(config, 4)
    iterator = iter(_loader({**config, "worker_count": 1}))
    with_worker = [next(iterator) for _ in range(3)]
    state = iterator.get_state()
    with_worker.append(next(iterator))
    del iterator  # stop the worker before the next one starts
    for want, got in zip(in_process, with_worker, strict=True):
        np.testing.assert_array_equal(got["pixels"], want["pixels"])
    resumed = iter(_loader({**config, "worker_count": 1}))
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed)["pixels"], in_process[3]["pixels"])
    del resumed


def test_bad_settings_are_one_line_errors(tmp_path, data_dir):
    with pytest.raises(ConfigError, match=r"data.flip must be one of 'per_image', 'joint', 'none', got 'sideways'"):
        load_config(None, ["data.flip=sideways"])
    with pytest.raises(ConfigError, match=r"data.time_ids must be one of .*, got 'real'"):
        load_config(None, ["data.time_ids=real"])
    with pytest.raises(FileNotFoundError, match=r"no prepared dataset pickapic_v2/default in"):
        _loader(_config(str(tmp_path)))
    with pytest.raises(ValueError, match=r"has 32 pairs: too few for 1 process\(es\) x batch_size 64"):
        _loader(_config(data_dir, batch_size=64))
