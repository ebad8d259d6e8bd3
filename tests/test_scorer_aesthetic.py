"""CLIP image tower and the LAION aesthetic scorer against transformers 5 (PyTorch) and NumPy, tiny random sizes."""

import sys

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from helpers import TINY_CLIP_VISION as VISION
from helpers import aesthetic_head_state, patterned_images, perturb_, rel_err, tiny_clip_vision
from safetensors.numpy import load_file, save_file
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from dpojax.bench_torch_scorers import aesthetic_original
from dpojax.models.clip_vision import CLIPVisionModelWithProjection, clip_preprocess, load_clip_vision
from dpojax.scorers.aesthetic import AestheticScorer, load_head
from dpojax.scorers.base import score_images
from dpojax.scorers.registry import make_scorer
from dpojax.weights import io, naming

TEXT = dict(vocab_size=99, hidden_size=16, intermediate_size=20, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=16)


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_vision_tower_matches_transformers(tmp_path, act):
    reference = tiny_clip_vision(hidden_act=act)
    reference.save_pretrained(tmp_path)
    model = load_clip_vision(tmp_path)
    pixels = np.random.RandomState(0).randn(3, 30, 30, 3).astype(np.float32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(pixels.transpose(0, 3, 1, 2)))
        pooled = reference.vision_model(torch.from_numpy(pixels.transpose(0, 3, 1, 2))).pooler_output
    out = model(pixels)
    assert rel_err(out.last_hidden_state, expected.last_hidden_state) <= 1e-4
    assert rel_err(out.pooler_output, pooled) <= 1e-4
    assert rel_err(out.image_embeds, expected.image_embeds) <= 1e-4
    # the parameter paths are transformers' keys, and the module runs under jit from its split state
    assert set(naming.to_state_dict(model)) == set(reference.state_dict())
    jitted = jax.jit(lambda x: model(x).image_embeds)(pixels)
    np.testing.assert_allclose(jitted, out.image_embeds, rtol=1e-5, atol=1e-6)
    # the generic from_pretrained/save_pretrained route too: the export loads in transformers unchanged
    CLIPVisionModelWithProjection.from_pretrained(tmp_path).save_pretrained(tmp_path / "export")
    exported = transformers.CLIPVisionModelWithProjection.from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        again = exported(torch.from_numpy(pixels.transpose(0, 3, 1, 2))).image_embeds
    np.testing.assert_array_equal(again.numpy(), expected.image_embeds.numpy())


def test_image_tower_of_a_whole_clip_model_and_a_4x_file(tmp_path):
    """A CLIPModel folder (text tower skipped, projection_dim from the top level) and a 4.x file with the old
    position_ids buffer load the same image tower."""
    torch.manual_seed(0)
    config = transformers.CLIPConfig(text_config=TEXT, vision_config={**VISION, "projection_dim": 7},
                                     projection_dim=24)
    whole = perturb_(transformers.CLIPModel(config).eval(), seed=2)
    whole.save_pretrained(tmp_path / "clip")
    pixels = np.random.RandomState(1).randn(2, 30, 30, 3).astype(np.float32)
    with torch.no_grad():
        expected = whole.get_image_features(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)))
    expected = getattr(expected, "pooler_output", expected)  # transformers 5 returns an output object
    model = load_clip_vision(tmp_path / "clip")
    assert rel_err(model(pixels).image_embeds, expected) <= 1e-4

    state = load_file(str(tmp_path / "clip" / "model.safetensors"))
    vision_only = {k: v for k, v in state.items() if k.startswith(("vision_model.", "visual_projection."))}
    vision_only["vision_model.embeddings.position_ids"] = np.arange(10)[None]
    (tmp_path / "v4").mkdir()
    save_file(vision_only, str(tmp_path / "v4" / "model.safetensors"))
    (tmp_path / "v4" / "config.json").write_text((tmp_path / "clip" / "config.json").read_text())
    assert rel_err(load_clip_vision(tmp_path / "v4")(pixels).image_embeds, expected) <= 1e-4


def test_missing_vision_weights_are_named(tmp_path):
    tiny_clip_vision().save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["visual_projection.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing \(1\): visual_projection.weight"):
        load_clip_vision(tmp_path)


def test_bad_vision_config_and_input_size_are_named():
    with pytest.raises(ValueError, match="image_size=30 is not divisible by patch_size=7"):
        CLIPVisionModelWithProjection.from_config({**VISION, "patch_size": 7})
    model = io.abstract_module(CLIPVisionModelWithProjection, VISION)  # shapes only: the check comes first
    with pytest.raises(ValueError, match=r"must be \(batch, 30, 30, channels\).*got shape \(1, 32, 32, 3\)"):
        model(np.zeros((1, 32, 32, 3), np.float32))


@pytest.mark.parametrize("height,width", [(512, 512), (300, 250), (64, 96), (37, 500), (224, 224)])
def test_preprocessing_matches_clip_image_processor(height, width):
    """Down- and up-scaling, both orientations, at CLIP's 224: equal to transformers' PIL processor bit for bit."""
    image = patterned_images(2, height, width, seed=height)[1]
    expected = CLIPImageProcessorPil()(images=[image], return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    ours = np.asarray(clip_preprocess(image[None]))[0]
    assert ours.shape == expected.shape == (224, 224, 3)
    assert np.array_equal(ours, expected)


def _numpy_head(state, embeds):
    """The head the way improved-aesthetic-predictor computes it: x @ W.T + b through the five Linear layers."""
    x = embeds.astype(np.float64)
    for index in (0, 2, 4, 6, 7):
        x = x @ state[f"layers.{index}.weight"].T.astype(np.float64) + state[f"layers.{index}.bias"]
    return x[:, 0]


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_head_matches_numpy(tmp_path, suffix):
    state = aesthetic_head_state(dim=768)
    path = tmp_path / f"head{suffix}"
    if suffix == ".pth":
        torch.save({k: torch.from_numpy(v) for k, v in state.items()}, path)
    else:
        save_file(state, str(path))
    embeds = np.random.RandomState(3).randn(5, 768).astype(np.float32)
    np.testing.assert_allclose(load_head(path)(embeds), _numpy_head(state, embeds), rtol=1e-5, atol=1e-5)


def test_aesthetic_scorer_matches_transformers_pipeline(tmp_path):
    """uint8 images -> transformers' processor and CLIP tower (as ``dpojax bench`` loads them from the folder) ->
    unit-norm embeds -> NumPy head, vs our scorer (built through make_scorer from the two local files, batches of
    3 for 5 images so one batch is padded); the bench's original, its torch head read from the .safetensors or a
    .pth, gives the same."""
    tiny_clip_vision(seed=4).save_pretrained(tmp_path / "clip")
    state = aesthetic_head_state(seed=5)
    save_file(state, str(tmp_path / "head.safetensors"))
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, tmp_path / "head.pth")
    images = patterned_images(5, 48, 40)
    original = aesthetic_original(tmp_path / "clip", tmp_path / "head.safetensors", batch_size=2)
    with torch.no_grad():
        embeds = original.model["clip"](original.preprocess(images)).image_embeds.numpy()
    expected = _numpy_head(state, embeds / np.linalg.norm(embeds, axis=-1, keepdims=True))
    assert rel_err(original(images, ["a cat"] * 5), expected) <= 1e-5
    assert rel_err(aesthetic_original(tmp_path / "clip", tmp_path / "head.pth")(images, [""] * 5), expected) <= 1e-5

    scorer = make_scorer("aesthetic", clip_model=str(tmp_path / "clip"), head=str(tmp_path / "head.safetensors"),
                         batch_size=3)
    scores = score_images(scorer, images, ["a cat"] * 5)
    assert scores.shape == (5,) and scores.dtype == np.float32
    assert rel_err(scores, expected) <= 1e-3
    assert np.ptp(expected) > 10 * np.abs(scores - expected).max()  # the differences between images are resolved


def test_head_errors_are_one_line(tmp_path, monkeypatch):
    clip = io.abstract_module(CLIPVisionModelWithProjection, VISION)
    save_file(aesthetic_head_state(dim=768), str(tmp_path / "head.safetensors"))
    with pytest.raises(ValueError, match="aesthetic head takes 768-d embeddings, the CLIP model gives 24-d"):
        AestheticScorer(clip, load_head(tmp_path / "head.safetensors"))

    bad = aesthetic_head_state()
    bad["layers.4.weight"] = bad["layers.4.weight"][:, :5]
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=r"aesthetic head .*bad.safetensors: weights do not match.*layers.4.weight"):
        load_head(tmp_path / "bad.safetensors")

    state = aesthetic_head_state()
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, tmp_path / "head.pth")
    save_file(state, str(tmp_path / "same.safetensors"))
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed: the .pth still loads
    from_pth = nnx.state(load_head(tmp_path / "head.pth"))
    from_safetensors = nnx.state(load_head(tmp_path / "same.safetensors"))
    jax.tree.map(np.testing.assert_array_equal, from_pth, from_safetensors)
    (tmp_path / "cut.pth").write_bytes((tmp_path / "head.pth").read_bytes()[:-200])
    with pytest.raises(ValueError, match=r"aesthetic head weights .*cut.pth is not a readable torch.save file"):
        load_head(tmp_path / "cut.pth")
    with pytest.raises(FileNotFoundError, match="nothing.safetensors does not exist"):
        load_head(tmp_path / "nothing.safetensors")
    with pytest.raises(ValueError, match="scorer 'aesthetic' needs clip_model="):
        make_scorer("aesthetic")
