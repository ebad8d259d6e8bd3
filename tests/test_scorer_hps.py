"""The HPSv2 scorer against the original: open_clip's CLIP (PyTorch), its tokenizer and HPSv2's image transform
(torchvision), on tiny random open_clip models saved as HPSv2 publishes its checkpoints."""

import json

import numpy as np
import pytest
import torch
import torch_oracles
import transformers
from flax import nnx
from helpers import HPS_CASES as CASES
from helpers import patterned_images, rel_err, write_hps_checkpoint, write_hps_processor
from PIL import Image
from safetensors.numpy import save_file

from dpojax import parallel
from dpojax.bench_torch_scorers import hps_original, hps_transform
from dpojax.diffusers_folder import tokenize
from dpojax.models.clip import CLIPModel
from dpojax.scorers import hps
from dpojax.scorers.base import score_images
from dpojax.scorers.clip_scorers import clip_scores
from dpojax.scorers.registry import make_scorer
from dpojax.weights import io, naming

# Digits, punctuation and case; longer than the context (so truncated); HTML entities and curly quotes, which
# open_clip's cleanup rewrites.
PROMPTS = ["a cat", "A photo of 2 dogs, playing!", "", "a red car on a wet road at night, " * 8,
           "Tom &amp; Jerry’s “house”"]


@pytest.fixture(scope="module")
def open_clip():
    return torch_oracles.open_clip()


@pytest.fixture(scope="module")
def processor(open_clip, tmp_path_factory):
    return write_hps_processor(tmp_path_factory.mktemp("hps") / "processor")


@pytest.fixture(scope="module")
def checkpoints(open_clip, tmp_path_factory):
    """Per case: (the perturbed open_clip CLIP, its HPS-style checkpoint, its model config JSON)."""
    root = tmp_path_factory.mktemp("hps")
    return {case: write_hps_checkpoint(root, case, seed) for seed, case in enumerate(CASES)}


def _hps_scores(checkpoint, config, images, prompts):
    """HPSv2's ``score`` as ``dpojax bench`` runs it from the checkpoint and model config: its tokenizer and
    transform, unit-norm features, the diagonal of their products: (scores, the pixel values NHWC)."""
    original = hps_original(checkpoint, config)
    pixels = original.preprocess(images)
    with torch.no_grad():
        scores = original.forward(pixels, original.tokenize(prompts))
    return scores.numpy(), pixels.numpy().transpose(0, 2, 3, 1)


def test_tokens_equal_open_clip(open_clip, processor):
    """transformers' CLIPTokenizer from the CLIP-H files gives open_clip's ids up to the end token, truncation
    included (the start token, 75 of the prompt's, the end token), once open_clip's cleanup is applied; after
    it, end tokens where open_clip pads with 0 (the "!" the folder names as its pad token stays a word)."""
    tokenizer = hps.hps_tokenizer(processor)
    expected = open_clip.get_tokenizer("ViT-H-14")(PROMPTS).numpy()
    assert len(open_clip.tokenizer.SimpleTokenizer().encode(PROMPTS[3])) > 75
    ids = tokenize(tokenizer, [hps.clean_prompt(p) for p in PROMPTS])
    end = np.argmax(expected == 49407, axis=1)
    after = np.arange(expected.shape[1]) > end[:, None]
    np.testing.assert_array_equal(np.where(after, 0, ids), expected)
    assert (ids[after] == 49407).all() and end[3] == 76
    assert not np.array_equal(tokenize(tokenizer, PROMPTS[4:])[0, :end[4] + 1], expected[4, :end[4] + 1])


@pytest.mark.parametrize("shape", [(48, 40), (25, 60), (16, 20), (30, 30), (64, 64), (97, 61), (7, 100)])
def test_preprocess_matches_hps_transform(open_clip, shape):
    """Downscaled, upscaled, already 30x30 (left alone), Python's rounding of 12.5 to 12, odd padding."""
    images = patterned_images(2, *shape, seed=1)
    transform = hps_transform(30)
    expected = np.stack([transform(Image.fromarray(image)).numpy().transpose(1, 2, 0) for image in images])
    ours = np.asarray(hps.hps_preprocess(images, 30))
    assert ours.shape == expected.shape and ours.dtype == np.float32
    assert np.abs(ours - expected).max() <= 1e-5


@pytest.mark.parametrize("case", CASES)
def test_hps_matches_open_clip(open_clip, processor, checkpoints, case):
    """The scorer from the checkpoint, the model config and the tokenizer folder (batches of 3 for 5 images) vs
    HPSv2's computation, from uint8 images of two sizes; and the converted model on HPSv2's own pixels."""
    _, checkpoint, config = checkpoints[case]
    scorer = hps.hps(str(checkpoint), str(processor), str(config), batch_size=3)
    ids = tokenize(scorer.tokenizer, [hps.clean_prompt(p) for p in PROMPTS])
    converted = hps.load_hps_model(checkpoint, config)
    for shape in CASES[case]["image_shapes"]:
        images = patterned_images(len(PROMPTS), *shape)
        expected, pixels = _hps_scores(checkpoint, config, images, PROMPTS)
        assert rel_err(hps_original(checkpoint, config, batch_size=2)(images, PROMPTS), expected) <= 1e-5
        same_pixels = nnx.jit(clip_scores, static_argnums=3)(converted, ids, pixels, "clip_cosine")
        scores = scorer(images, PROMPTS)
        print(f"{case} {shape}: HPS relative error {rel_err(same_pixels, expected):.2e} (HPSv2's pixels), "
              f"{rel_err(scores, expected):.2e} (from uint8)")
        assert scores.shape == (len(PROMPTS),) and scores.dtype == np.float32
        assert rel_err(same_pixels, expected) <= 1e-4
        assert rel_err(scores, expected) <= 1e-4
        assert np.ptp(expected) > 100 * np.abs(scores - expected).max()  # the differences between images resolved


def test_make_scorer_builds_it_and_shards_over_the_mesh(processor, checkpoints, tmp_path):
    """make_scorer from its options; over all 8 devices the same scores; a .safetensors checkpoint of the same
    keys gives the same weights."""
    _, checkpoint, config = checkpoints["gelu"]
    images = patterned_images(5, 40, 36, seed=3)
    options = dict(hps_checkpoint=str(checkpoint), hps_processor=str(processor), hps_model_config=str(config))
    scorer = make_scorer("hps", **options, batch_size=3)
    alone = score_images(scorer, images, PROMPTS)
    assert isinstance(scorer.fn, hps.HPSScorer) and alone.shape == (5,) and alone.dtype == np.float32
    assert np.isfinite(alone).all()
    sharded = make_scorer("hps", **options, batch_size=3, mesh=parallel.make_mesh(data=2, fsdp=-1))
    assert sharded.fn.batch_size == 8
    np.testing.assert_allclose(score_images(sharded, images, PROMPTS), alone, rtol=1e-5, atol=1e-6)

    save_file(hps.read_checkpoint(checkpoint), tmp_path / "hps.safetensors")
    expected = naming.to_state_dict(hps.load_hps_model(checkpoint, config))
    found = naming.to_state_dict(hps.load_hps_model(tmp_path / "hps.safetensors", config))
    assert found.keys() == expected.keys() and all(np.array_equal(found[k], expected[k]) for k in expected)
    with pytest.raises(ValueError, match="scorer 'hps' needs hps_checkpoint="):
        make_scorer("hps", hps_processor=str(processor))


def test_default_is_open_clips_vit_h_14():
    """The built-in config is open_clip's ViT-H-14.json, and a checkpoint of its shapes converts to the CLIPModel
    it sizes (shapes only: no weights are made)."""
    found = json.loads((torch_oracles.ORACLES / "open_clip" / "model_configs" / "ViT-H-14.json").read_text())
    assert found == hps.VIT_H_14
    config, _ = hps.read_model_config(None)
    state_dict = {key: np.broadcast_to(np.float32(0), shape) for key, shape in hps.open_clip_shapes(config).items()}
    hps.check_checkpoint(state_dict, config, "ViT-H-14", "ViT-H-14.json")
    model = io.abstract_module(CLIPModel, hps.clip_config(config))
    naming.check_state_dict(model, {k: v.shape for k, v in hps.to_clip_state_dict(state_dict).items()}, "ViT-H-14")
    assert model.vision_model.encoder.layers[0].self_attn.heads == 16 and len(model.text_model.encoder.layers) == 24


def _one_line_error(kind, pattern, fn, *args):
    with pytest.raises(kind, match=pattern) as err:
        fn(*args)
    assert "\n" not in str(err.value)


def test_bad_files_are_one_line_errors(checkpoints, tmp_path):
    """Checkpoints of the wrong kind, missing, truncated or corrupt, and model configs that do not fit."""
    model, checkpoint, config = checkpoints["gelu"]
    _, _, other_config = checkpoints["quick_gelu"]
    clip = transformers.CLIPModel(transformers.CLIPConfig(
        text_config=dict(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=20, bos_token_id=0, eos_token_id=1),
        vision_config=dict(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                           image_size=8, patch_size=4), projection_dim=4))
    torch.save({"state_dict": clip.state_dict()}, tmp_path / "transformers.pt")
    _one_line_error(ValueError, r"transformers.pt is not an open_clip CLIP state dict .*'text_model\.",
                    hps.load_hps_model, tmp_path / "transformers.pt", config)
    torch.save({"epoch": 3, "weights": {"head.weight": torch.zeros(2, 2)}}, tmp_path / "other.pt")
    _one_line_error(ValueError, r"other.pt holds no tensors", hps.load_hps_model, tmp_path / "other.pt", config)
    _one_line_error(FileNotFoundError, r"HPS checkpoint .*missing.pt does not exist", hps.load_hps_model,
                    tmp_path / "missing.pt", config)
    data = checkpoint.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    _one_line_error(ValueError, r"truncated.pt", hps.load_hps_model, tmp_path / "truncated.pt", config)
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    _one_line_error(ValueError, r"HPS checkpoint .*corrupt.safetensors cannot be read", hps.load_hps_model,
                    tmp_path / "corrupt.safetensors", config)

    _one_line_error(ValueError, r"gelu.pt does not match .*quick_gelu.json: visual.class_embedding has shape "
                                r"\(40,\), the config gives \(32,\)", hps.load_hps_model, checkpoint, other_config)
    _one_line_error(ValueError, r"does not match open_clip's ViT-H-14 config: visual.class_embedding",
                    hps.load_hps_model, checkpoint, None)
    spec = CASES["gelu"]["config"]
    fewer = {**spec, "text_cfg": {**spec["text_cfg"], "layers": 1}}
    (tmp_path / "fewer.json").write_text(json.dumps(fewer))
    _one_line_error(ValueError, r"fewer.json: it has 'transformer.resblocks.1.ln_1.weight', which that model lacks",
                    hps.load_hps_model, checkpoint, tmp_path / "fewer.json")
    timm = {**spec, "vision_cfg": {**spec["vision_cfg"], "timm_model_name": "vit_base_patch16_224"}}
    (tmp_path / "timm.json").write_text(json.dumps(timm))
    _one_line_error(ValueError, r"timm.json: vision_cfg: 'timm_model_name' is not supported", hps.load_hps_model,
                    checkpoint, tmp_path / "timm.json")
    (tmp_path / "broken.json").write_text("{")
    _one_line_error(ValueError, r"broken.json is not valid JSON", hps.load_hps_model, checkpoint,
                    tmp_path / "broken.json")
