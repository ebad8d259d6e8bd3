"""Reward proxies and user scorers behind ``make_scorer``/``score_images``, checked against direct computations."""

import io
import itertools

import numpy as np
import pytest
from PIL import Image

from dpojax.losses import pareto_preference
from dpojax.scorers.base import score_images
from dpojax.scorers.registry import make_scorer


def _images():
    """Flat grey, a smooth gradient, strong noise, white: increasing JPEG size except white, varied brightness."""
    rng = np.random.RandomState(0)
    flat = np.full((32, 48, 3), 90, np.uint8)
    gradient = np.broadcast_to(np.linspace(0, 255, 48, dtype=np.uint8)[None, :, None], (32, 48, 3))
    noise = rng.randint(0, 256, (32, 48, 3)).astype(np.uint8)
    white = np.full((32, 48, 3), 255, np.uint8)
    return np.stack([flat, gradient, noise, white])


def _jpeg_bytes(image, quality):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=quality)
    return len(buffer.getvalue())


def test_jpeg_scorers_are_quality_95_kilobytes():
    images = _images()
    sizes = np.asarray([_jpeg_bytes(im, 95) / 1000 for im in images], np.float32)
    incompressibility = score_images(make_scorer("jpeg_incompressibility"), images, ["p"] * 4)
    compressibility = score_images(make_scorer("jpeg_compressibility"), images, ["p"] * 4)
    np.testing.assert_array_equal(incompressibility, sizes)
    np.testing.assert_array_equal(compressibility, -sizes)
    assert incompressibility[2] > 3 * incompressibility[0]  # noise costs far more bytes than a flat image
    assert not np.allclose(sizes, [_jpeg_bytes(im, 75) / 1000 for im in images])  # the quality matters


def test_brightness_is_the_mean_of_the_unit_image():
    images = _images()
    expected = [np.mean(im.astype(np.float64) / 255.0) for im in images]
    scores = score_images(make_scorer("brightness"), images, ["p"] * 4)
    np.testing.assert_allclose(scores, expected, rtol=1e-6)
    assert scores[3] == 1.0


def test_joined_specs_make_a_vector_reward_compared_by_pareto_dominance():
    images = _images()
    scores = score_images(make_scorer("brightness, jpeg_compressibility"), images, ["p"] * 4)
    assert scores.shape == (4, 2)
    np.testing.assert_array_equal(scores[:, 0], score_images(make_scorer("brightness"), images, ["p"] * 4))
    pairs = list(itertools.permutations(range(4), 2))
    a, b = (np.asarray([scores[i] for i, _ in pairs]), np.asarray([scores[j] for _, j in pairs]))
    h = np.asarray(pareto_preference(a, b))
    for (i, j), (h_a, h_b) in zip(pairs, h, strict=True):
        a_wins = np.all(scores[i] >= scores[j]) and np.any(scores[i] > scores[j])
        b_wins = np.all(scores[j] >= scores[i]) and np.any(scores[j] > scores[i])
        assert (h_a, h_b) == ((1, -1) if a_wins else (-1, 1) if b_wins else (0, 0))
    assert {tuple(x) for x in h} >= {(1, -1), (-1, 1), (0, 0)}  # this set has wins, losses and trade-offs


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_scorers.py").write_text(
        "import numpy as np\n"
        "def red(images, prompts):\n"
        "    return images[..., 0].mean(axis=(1, 2))\n"
        "def prompt_length(images, prompts):\n"
        "    return [len(p) for p in prompts]\n"
        "class Threshold:\n"
        "    def __init__(self, level):\n"
        "        self.level = level\n"
        "    def __call__(self, images, prompts):\n"
        "        return (images.mean(axis=(1, 2, 3)) > self.level).astype(float)\n"
        "def broken(images, prompts):\n"
        "    raise RuntimeError('model server\\nunreachable')\n"
        "def nan(images, prompts):\n"
        "    return np.array([1.0, np.nan, 2.0, 3.0])\n"
        "def short(images, prompts):\n"
        "    return np.zeros(len(images) - 1)\n"
        "def words(images, prompts):\n"
        "    return ['a'] * len(images)\n"
        "NOT_CALLABLE = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_scorers"


def test_user_scorers_by_import_path(user_module):
    images = _images()
    prompts = ["a", "bb", "ccc", "dddd"]
    red = score_images(make_scorer(f"{user_module}:red"), images, prompts)
    np.testing.assert_allclose(red, images[..., 0].mean(axis=(1, 2)), rtol=1e-6)
    np.testing.assert_array_equal(score_images(make_scorer(f"{user_module}:prompt_length"), images, prompts),
                                  [1, 2, 3, 4])
    threshold = make_scorer(f"{user_module}:Threshold", level=100)  # options make it a factory
    np.testing.assert_array_equal(score_images(threshold, images, prompts), [0, 1, 1, 1])
    both = score_images(make_scorer(f"brightness,{user_module}:Threshold", level=200), images, prompts)
    np.testing.assert_array_equal(both[:, 1], [0, 0, 0, 1])


@pytest.mark.parametrize("spec,options,message", [
    ("sharpness", {}, "unknown scorer 'sharpness': use one of brightness, jpeg_compressibility"),
    ("no_such_module_xyz:f", {}, "scorer 'no_such_module_xyz:f': cannot import module 'no_such_module_xyz'"),
    ("{mod}:missing", {}, "scorer '{mod}:missing': module '{mod}' has no attribute 'missing'"),
    ("{mod}:NOT_CALLABLE", {}, "scorer '{mod}:NOT_CALLABLE' is not callable"),
    ("brightness", {"level": 3}, "scorer 'brightness' takes no option 'level' \\(options: none\\)"),
    ("{mod}:Threshold", {"height": 3}, "scorer '{mod}:Threshold': building it with options \\['height'\\] failed"),
    ("brightness,,jpeg_compressibility", {}, "has an empty part"),
])
def test_bad_scorer_specs_are_named(user_module, spec, options, message):
    with pytest.raises(ValueError, match=message.format(mod=user_module)):
        make_scorer(spec.format(mod=user_module), **options)


@pytest.mark.parametrize("name,message", [
    ("broken", r"scorer '{mod}:broken' failed on 4 images: RuntimeError: model server unreachable$"),
    ("nan", r"scorer '{mod}:nan' returned NaN or infinite scores for images \[1\]"),
    ("short", r"scorer '{mod}:short' returned shape \(3,\) for 4 images \(expected \(4,\) or \(4, d\)\)"),
    ("words", r"scorer '{mod}:words' returned list, not numbers"),
])
def test_misbehaving_scorers_raise_one_line_errors(user_module, name, message):
    scorer = make_scorer(f"{user_module}:{name}")
    with pytest.raises(ValueError, match=message.format(mod=user_module)) as info:
        score_images(scorer, _images(), ["p"] * 4)
    assert "\n" not in str(info.value)


def test_bad_images_are_named():
    scorer = make_scorer("brightness")
    with pytest.raises(ValueError, match=r"images must be uint8 \(N, H, W, 3\), got float32 \(4, 32, 48, 3\)"):
        score_images(scorer, _images().astype(np.float32), ["p"] * 4)
    with pytest.raises(ValueError, match="4 images but 3 prompts"):
        score_images(scorer, _images(), ["p"] * 3)
