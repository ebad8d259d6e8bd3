"""The whole CLIP model and the PickScore / CLIP-score scorers against transformers 5 (PyTorch CLIPModel, its
CLIPTokenizer and CLIPImageProcessorPil), on tiny random configs saved with ``save_pretrained``."""

import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from helpers import CLIP_CASES as CASES
from helpers import patterned_images, rel_err, write_clip_folder
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from dpojax import parallel
from dpojax.bench_torch_scorers import clip_original
from dpojax.diffusers_folder import tokenize
from dpojax.models.clip import load_clip
from dpojax.scorers import clip_scorers
from dpojax.scorers.base import score_images
from dpojax.scorers.clip_scorers import clip_scores, load_clip_scorer, load_tokenizer
from dpojax.scorers.registry import make_scorer
from dpojax.weights import naming

PROMPTS = ["a cat", "the dog and the cat", "", "a red car on a wet road at night, " * 4, "Dog!"]


def _torch_logits(model_folder, processor_folder, images, prompts):
    """PickScore's model card, as ``dpojax bench`` runs it: the processor's ids (padding=True, truncation,
    max_length) with their mask, and pixel values: (the logit of each image against its own prompt, the model's
    output, the pixel values NCHW)."""
    original = clip_original(model_folder, processor_folder, scale="pickscore")
    pixels, text = original.preprocess(images), original.tokenize(prompts)
    with torch.no_grad():
        out = original.model(pixel_values=pixels, **text)
    return out.logits_per_image.diagonal().numpy(), out, pixels.numpy()


@pytest.mark.parametrize("case", CASES)
def test_clip_model_matches_transformers(tmp_path, case):
    """Same ids and pixels: logits and unit embeddings equal; parameter paths are the CLIPModel keys."""
    reference, _ = write_clip_folder(tmp_path, case)
    model = load_clip(tmp_path / "model")
    assert set(naming.to_state_dict(model)) == set(reference.state_dict())
    size = CASES[case]["vision"]["image_size"]
    pixels = np.random.RandomState(0).randn(3, size, size, 3).astype(np.float32)
    ids = np.random.RandomState(1).randint(0, 520, (3, CASES[case]["text"]["max_position_embeddings"]))
    ids[:, 0], ids[:, 9], ids[:, 10:] = 524, 525, 525  # BOS, a prompt, EOS and EOS padding
    with torch.no_grad():
        expected = reference(input_ids=torch.from_numpy(ids),
                             pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)))
    out = nnx.jit(lambda m, i, p: m(i, p))(model, ids, pixels)  # one compilation, not one per operation
    for name in ("logits_per_image", "logits_per_text", "text_embeds", "image_embeds"):
        assert rel_err(getattr(out, name), getattr(expected, name)) <= 1e-4, name


@pytest.mark.parametrize("case", CASES)
def test_pickscore_matches_transformers_pipeline(tmp_path, case):
    """Prompts (one longer than the context, so truncated) and uint8 images -> PickScore's torch computation, vs
    our score of the processor's pixels, and vs our scorer from the two folders (batches of 3 for 5 images); the
    bench's batched original gives the same."""
    _, processor = write_clip_folder(tmp_path, case)
    images = patterned_images(5, *CASES[case]["image_shape"])
    expected, _, pixels = _torch_logits(tmp_path / "model", processor, images, PROMPTS)
    assert rel_err(clip_original(tmp_path / "model", processor, scale="pickscore", batch_size=2)(images, PROMPTS),
                   expected) <= 1e-5
    ids = tokenize(load_tokenizer(processor), PROMPTS)
    same_pixels = nnx.jit(clip_scores, static_argnums=3)(load_clip(tmp_path / "model"), ids,
                                                         pixels.transpose(0, 2, 3, 1), "pickscore")
    scores = load_clip_scorer(tmp_path / "model", processor, scale="pickscore", batch_size=3)(images, PROMPTS)
    print(f"{case}: PickScore relative error {rel_err(same_pixels, expected):.2e} (processor's pixels), "
          f"{rel_err(scores, expected):.2e} (from uint8)")
    assert rel_err(same_pixels, expected) <= 1e-4
    assert scores.shape == (5,) and scores.dtype == np.float32
    assert rel_err(scores, expected) <= 1e-4
    assert np.ptp(expected) > 100 * np.abs(scores - expected).max()  # the differences between images are resolved


def test_clip_score_conventions_match_numpy(tmp_path):
    """Raw cosine and torchmetrics' 100 * max(cos, 0), from torch's projected embeddings in NumPy; the tokenizer
    and processor in the model folder itself (the usual CLIP layout). The bench's originals of both agree."""
    root = tmp_path / "clip"
    _, processor = write_clip_folder(root, "quick_gelu", seed=3)
    for path in processor.iterdir():
        path.rename(root / "model" / path.name)
    images = patterned_images(5, 33, 57, seed=2)
    _, out, _ = _torch_logits(root / "model", root / "model", images, PROMPTS)
    text, image = out.text_embeds.numpy().astype(np.float64), out.image_embeds.numpy().astype(np.float64)
    cos = np.sum(text * image, axis=-1) / np.linalg.norm(text, axis=-1) / np.linalg.norm(image, axis=-1)
    assert (cos > 0).any() and (cos < 0).any()  # the clamp matters
    for scale, expected in (("clip_cosine", cos), ("clip_score", 100 * np.maximum(cos, 0))):
        assert rel_err(clip_original(root / "model", scale=scale, batch_size=3)(images, PROMPTS), expected) <= 1e-5
    raw = load_clip_scorer(root / "model", scale="clip_cosine", batch_size=2)(images, PROMPTS)
    clamped = load_clip_scorer(root / "model", scale="clip_score", batch_size=2)(images, PROMPTS)
    print(f"CLIP cosine relative error {rel_err(raw, cos):.2e}, CLIP score "
          f"{rel_err(clamped, 100 * np.maximum(cos, 0)):.2e}")
    assert rel_err(raw, cos) <= 1e-4
    assert rel_err(clamped, 100 * np.maximum(cos, 0)) <= 1e-4


def test_make_scorer_builds_them_and_shards_over_the_mesh(tmp_path):
    """make_scorer builds the scorers from their options, alone and as a vector reward, and over all 8 devices
    (rows split, batch rounded up to 8) gives the same scores."""
    write_clip_folder(tmp_path, "gelu", seed=4)
    images, model, processor = patterned_images(5, 40, 40), str(tmp_path / "model"), str(tmp_path / "processor")
    scorer = make_scorer("pickscore", pickscore_model=model, pickscore_processor=processor, batch_size=3)
    alone = score_images(scorer, images, PROMPTS)
    assert isinstance(scorer.fn, clip_scorers.CLIPScorer) and scorer.fn.batch_size == 3
    both = make_scorer("pickscore,clip_score", pickscore_model=model, pickscore_processor=processor,
                       clip_model=model, clip_processor=processor)
    assert score_images(both, images, PROMPTS).shape == (5, 2)
    mesh = parallel.make_mesh(data=2, fsdp=-1)
    sharded = make_scorer("pickscore", pickscore_model=model, pickscore_processor=processor, batch_size=3, mesh=mesh)
    assert sharded.fn.batch_size == 8
    np.testing.assert_allclose(score_images(sharded, images, PROMPTS), alone, rtol=1e-5)
    with pytest.raises(ValueError, match="scorer 'pickscore' needs pickscore_model="):
        make_scorer("pickscore")


def test_wrong_folders_are_one_line_errors(tmp_path):
    torch.manual_seed(0)
    vision = transformers.CLIPVisionConfig(**CASES["gelu"]["vision"])
    transformers.CLIPVisionModelWithProjection(vision).save_pretrained(tmp_path / "vision")
    with pytest.raises(ValueError, match=r"vision/config.json: not a CLIPModel config: no text_config") as err:
        load_clip(tmp_path / "vision")
    assert "\n" not in str(err.value)

    write_clip_folder(tmp_path / "clip", "gelu")
    (tmp_path / "clip" / "model" / "model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    with pytest.raises(FileNotFoundError, match=r"clip/model has no model.safetensors") as err:
        load_clip(tmp_path / "clip" / "model")
    assert "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="model folder .*nothing does not exist"):
        load_clip(tmp_path / "nothing")

    write_clip_folder(tmp_path / "ok", "quick_gelu")
    with pytest.raises(FileNotFoundError, match=r"ok/model has no CLIP tokenizer"):
        load_clip_scorer(tmp_path / "ok" / "model", scale="pickscore")
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 30, "width": 30}).save_pretrained(
        tmp_path / "ok" / "processor")
    with pytest.raises(ValueError, match=r"preprocessor_config.json: shortest_edge=32 is not supported"):
        load_clip_scorer(tmp_path / "ok" / "model", tmp_path / "ok" / "processor", scale="pickscore")
