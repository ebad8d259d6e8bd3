"""Round folders and label files: exact round trips, D3PO's numbering and averaging, one-line errors that
overwrite nothing."""

import json
import os

import ml_dtypes
import numpy as np
import pytest
from PIL import Image

from dpojax.feedback import labels
from dpojax.feedback.labels import read_labels
from dpojax.feedback.rounds import Round, read_round, round_info, write_round

PROMPTS = ["a cat", "a dog", "ein Fuchs \u00e9t\u00e9"]


def _round(k=3, seed=0):
    rng = np.random.RandomState(seed)
    images = rng.randint(0, 256, (len(PROMPTS), k, 12, 20, 3)).astype(np.uint8)
    arrays = {"latents": rng.randn(3, k, 4, 2, 3, 3).astype(ml_dtypes.bfloat16),
              "next_latents": rng.randn(3, k, 4, 2, 3, 3).astype(np.float16),
              "timesteps": np.tile(np.arange(4, dtype=np.int32), (3, 1))}
    return Round(list(PROMPTS), images, arrays, {"num_steps": 4, "eta": 1.0, "model": "tiny"})


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_round_trip_and_d3po_numbering(tmp_path):
    original = _round()
    path = write_round(tmp_path / "r1", original)
    loaded = read_round(path)
    assert loaded.prompts == PROMPTS and loaded.meta == original.meta
    np.testing.assert_array_equal(loaded.images, original.images)
    assert set(loaded.arrays) == set(original.arrays)
    for name, array in original.arrays.items():
        assert loaded.arrays[name].dtype == array.dtype
        np.testing.assert_array_equal(loaded.arrays[name], array)
    # image j of prompt p is file k*p + j
    np.testing.assert_array_equal(np.asarray(Image.open(path / "images" / "00007.png")), original.images[2, 1])
    assert sorted(os.listdir(path)) == ["images", "labels", "round.json", "trajectories.safetensors"]
    manifest = json.loads((path / "round.json").read_text(encoding="utf-8"))
    assert manifest["format"] == "dpojax-d3po-round" and manifest["images_per_prompt"] == 3
    assert read_round(path, arrays=False).arrays == {}


def test_an_existing_round_is_never_replaced(tmp_path):
    path = write_round(tmp_path / "r1", _round())
    labels.write_entries(round_info(path), "alice", [[1, 0, -1], None, None])
    before = _snapshot(path)
    with pytest.raises(FileExistsError, match="r1 already exists; write the new round to a new folder"):
        write_round(path, _round(seed=1))
    assert _snapshot(path) == before


@pytest.mark.parametrize("change,message", [
    (dict(meta={"bad": object()}), "meta is not JSON-serialisable"),
    (dict(arrays={"latents": np.zeros((2, 3))}), r"array 'latents' has shape \(2, 3\); its first axis must be"),
    (dict(images=np.zeros((3, 1, 4, 4, 3), np.uint8)), "images_per_prompt=1, D3PO compares at least 2"),
    (dict(images=np.zeros((3, 2, 4, 4, 3), np.float32)), r"images must be uint8 \(3, k, H, W, 3\)"),
])
def test_bad_rounds_write_nothing(tmp_path, change, message):
    fields = {**_round().__dict__, **change}
    with pytest.raises(ValueError, match=message):
        write_round(tmp_path / "r1", Round(**fields))
    assert os.listdir(tmp_path) == []


def test_incomplete_rounds_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="round folder .*nowhere does not exist"):
        read_round(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty is not a D3PO round folder \(no round.json\)"):
        read_round(tmp_path / "empty")
    path = write_round(tmp_path / "r1", _round())
    (path / "images" / "00004.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"images is missing 1 of 9 images: 00004.png$"):
        read_round(path)
    path = write_round(tmp_path / "r2", _round())
    (path / "trajectories.safetensors").unlink()
    assert read_round(path, arrays=False).images.shape == (3, 3, 12, 20, 3)
    with pytest.raises(FileNotFoundError, match="r2 has no trajectories.safetensors"):
        read_round(path)
    path = write_round(tmp_path / "r3", _round())
    manifest = json.loads((path / "round.json").read_text())
    (path / "round.json").write_text(json.dumps({**manifest, "prompts": PROMPTS[:2]}))
    with pytest.raises(ValueError, match=r"array '\w+' has shape \(3, .*first axis must be the 2 prompts"):
        read_round(path)
    (path / "round.json").write_text(json.dumps({**manifest, "version": 9}))
    with pytest.raises(ValueError, match="round format version 9 is not supported"):
        read_round(path)


def test_labels_average_over_the_annotators_of_each_prompt(tmp_path):
    info = round_info(write_round(tmp_path / "r1", _round()))
    labels.write_entries(info, "alice", [[1, 0, -1], [0, 0, 0], None])
    labels.write_entries(info, "bob", [[1, 1, 1], None, None])
    labels.write_entries(info, "carol", [[-1, 0, 0.5], [1, -1, 0], None])
    (info.labels_dir / ".dave.json.123.tmp").write_text("[half a fi")  # an unfinished write is not an annotator
    result = read_labels(info.path)
    assert result.annotators == ["alice", "bob", "carol"]
    np.testing.assert_array_equal(result.labeled, [True, True, False])
    np.testing.assert_allclose(result.scores, [[1 / 3, 1 / 3, 0.5 / 3], [0.5, -0.5, 0], [0, 0, 0]])
    assert result.scores.dtype == np.float32 and result.scores.shape == (3, 3)


def test_no_labels_yet(tmp_path):
    path = write_round(tmp_path / "r1", _round())
    result = read_labels(path)
    assert result.annotators == [] and not result.labeled.any() and not result.scores.any()


@pytest.mark.parametrize("content,message", [
    ([[1, 0, 0], [0, 0, 0]], r"alice.json has 2 entries, the round has 3 prompts"),
    ([[1, 0, 0], [0, 0], None], r"alice.json: prompt 1 has 2 scores, the round has 3 images per prompt"),
    ([[1, 0, 0], None, [0, "x", 1]], r"alice.json: prompt 2 holds a value that is not a finite number"),
    ({"a cat": [1, 0, 0]}, r"alice.json has a JSON dict, the round has 3 prompts"),
])
def test_bad_label_files_are_named_and_left_alone(tmp_path, content, message):
    info = round_info(write_round(tmp_path / "r1", _round()))
    (info.labels_dir / "alice.json").write_text(json.dumps(content))
    before = _snapshot(info.path)
    with pytest.raises(ValueError, match=message):
        read_labels(info.path)
    assert _snapshot(info.path) == before
    (info.labels_dir / "alice.json").write_text("[[1, 0")
    with pytest.raises(ValueError, match="alice.json is not valid JSON"):
        read_labels(info.path)


def test_writes_replace_the_file_whole(tmp_path):
    info = round_info(write_round(tmp_path / "r1", _round()))
    path = labels.write_entries(info, "alice", [None, [1, -1, 0], None])
    assert json.loads(path.read_text()) == [None, [1, -1, 0], None]
    assert os.listdir(info.labels_dir) == ["alice.json"]  # no temp file left behind
    assert labels.load_entries(info, "bob") == [None, None, None]
    with pytest.raises(ValueError, match=r"annotator name '\.\./x' is not allowed"):
        labels.write_entries(info, "../x", [None] * 3)
