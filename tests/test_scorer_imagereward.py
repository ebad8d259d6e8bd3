"""The ImageReward scorer against the original: image-reward 1.5's own ``ImageReward.score`` (its torchvision
preprocessing, BLIP's tokenizer, ViT and cross-attention BERT, its MLP) on tiny random BLIPs, saved as the
published ``ImageReward.pt`` and ``med_config.json``."""

import json

import numpy as np
import pytest
import torch
from helpers import BLIP_VOCAB_SIZE as VOCAB_SIZE
from helpers import IMAGE_REWARD_CASES as CASES
from helpers import patterned_images, rel_err, write_image_reward
from PIL import Image
from safetensors.numpy import save_file

from dpojax import parallel
from dpojax.bench_torch_scorers import imagereward_original
from dpojax.scorers.base import score_images
from dpojax.scorers.imagereward import ImageRewardScorer, load_image_reward, load_tokenizer, tokenize, vision_sizes
from dpojax.scorers.registry import make_scorer
from dpojax.weights import naming

# Of different lengths (the padding mask matters), one past 35 tokens, one naming a BLIP special token.
PROMPTS = ["a cat", "the dog and the cat on a wet road", "", "a red car on a wet road at night, " * 5,
           "Dog! [ENC] zebra"]


def _original_scores(model, images, prompts) -> np.ndarray:
    with torch.no_grad():
        return np.asarray([model.score(p, Image.fromarray(image)) for image, p in zip(images, prompts, strict=True)])


@pytest.fixture(scope="module")
def image_rewards(tmp_path_factory) -> dict:
    """case -> (the original, its model folder, its tokenizer folder)."""
    return {case: write_image_reward(tmp_path_factory.mktemp(case), case) for case in CASES}


@pytest.mark.parametrize("case", CASES)
def test_scores_match_the_original(image_rewards, case):
    """uint8 images of two sizes (one where torchvision's crop offset is not floor division's) and prompts ->
    ImageReward.score, vs our scorer from the saved files (batches of 3 for 5 images)."""
    original, folder, tokenizer_folder = image_rewards[case]
    model = load_image_reward(folder)
    published = {k for k in original.state_dict() if not k.startswith(("blip.vision_proj", "blip.text_proj"))}
    assert set(naming.to_state_dict(model)) == published - {"blip.text_encoder.embeddings.position_ids"}
    scorer = ImageRewardScorer(model, load_tokenizer(tokenizer_folder), batch_size=3)
    ids, mask = tokenize(scorer.tokenizer, PROMPTS)
    assert mask[3].all() and mask.sum(1).min() == 2 and (ids == VOCAB_SIZE - 1).any()  # truncated, padded, [ENC]
    for seed, shape in enumerate(CASES[case]["image_shapes"]):
        images = patterned_images(len(PROMPTS), *shape, seed=seed)
        images[0] = np.random.RandomState(seed).randint(0, 256, images[0].shape)  # a shifted crop changes it
        expected = _original_scores(original, images, PROMPTS)
        scores = scorer(images, PROMPTS)
        print(f"{case} {shape}: ImageReward relative error {rel_err(scores, expected):.2e}")
        assert scores.shape == (len(PROMPTS),) and scores.dtype == np.float32
        assert rel_err(scores, expected) <= 1e-4
        assert np.ptp(expected) > 100 * np.abs(scores - expected).max()  # the differences between images resolved


def test_make_scorer_builds_it_and_shards_over_the_mesh(image_rewards, tmp_path):
    """make_scorer's imagereward scores as the original (and as the bench's original, loaded from the files and
    scoring batches), and over all 8 devices (rows split, batch rounded up to 8) the same; a .safetensors of the
    same keys loads the same weights; the tokenizer may sit in the model folder."""
    original, folder, tokenizer_folder = image_rewards["two_heads"]
    images = patterned_images(5, 36, 30, seed=5)
    options = dict(imagereward_model=str(folder), imagereward_tokenizer=str(tokenizer_folder))
    scorer = make_scorer("imagereward", **options, batch_size=4)
    assert isinstance(scorer.fn, ImageRewardScorer) and scorer.fn.batch_size == 4
    alone = score_images(scorer, images, PROMPTS)
    assert alone.dtype == np.float32 and alone.shape == (5,) and np.isfinite(alone).all()
    one_by_one = _original_scores(original, images, PROMPTS)
    np.testing.assert_allclose(alone, one_by_one, rtol=1e-4, atol=1e-5)
    batched = imagereward_original(folder, tokenizer_folder, batch_size=2)(images, PROMPTS)
    assert rel_err(batched, one_by_one) <= 1e-5
    mesh = parallel.make_mesh(data=2, fsdp=-1)
    sharded = make_scorer("imagereward", **options, batch_size=3, mesh=mesh)
    assert sharded.fn.batch_size == 8
    np.testing.assert_allclose(score_images(sharded, images, PROMPTS), alone, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="scorer 'imagereward' needs imagereward_model="):
        make_scorer("imagereward")

    both = tmp_path / "both"
    both.mkdir()
    save_file({k: v.numpy() for k, v in original.state_dict().items()}, both / "ImageReward.safetensors")
    for name in ("med_config.json", "vocab.txt"):
        (both / name).write_bytes(((folder if name.endswith(".json") else tokenizer_folder) / name).read_bytes())
    expected = naming.to_state_dict(load_image_reward(folder))
    for key, value in naming.to_state_dict(load_image_reward(both)).items():
        np.testing.assert_array_equal(value, expected[key], err_msg=key)
    assert make_scorer("imagereward", imagereward_model=str(both)).fn.tokenizer.vocab == scorer.fn.tokenizer.vocab


def _one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_wrong_files_are_one_line_errors(tmp_path):
    _, model, tokenizer = write_image_reward(tmp_path / "ok", "one_head", seed=2)
    with pytest.raises(FileNotFoundError, match=r"tokenizer has no ImageReward.safetensors or ImageReward.pt") as err:
        load_image_reward(tmp_path / "ok" / "tokenizer")
    _one_line(err)
    with pytest.raises(FileNotFoundError, match=r"ImageReward model folder .*nothing does not exist"):
        load_image_reward(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match=r"model has no BERT tokenizer"):
        load_tokenizer(model)

    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "ImageReward.pt").write_bytes((model / "ImageReward.pt").read_bytes())
    with pytest.raises(FileNotFoundError, match=r"lone has no med_config.json") as err:
        load_image_reward(lone)
    _one_line(err)

    def variant(name, state=None, config=None, data=None):
        folder = tmp_path / name
        folder.mkdir()
        if data is not None:
            (folder / "ImageReward.pt").write_bytes(data)
        else:
            torch.save(state if state is not None else torch.load(model / "ImageReward.pt"), folder / "ImageReward.pt")
        original = json.loads((model / "med_config.json").read_text())
        (folder / "med_config.json").write_text(json.dumps({**original, **(config or {})}))
        return folder

    state = torch.load(model / "ImageReward.pt")
    head = {k[len("mlp."):]: v for k, v in state.items() if k.startswith("mlp.")}  # the LAION head's layout
    with pytest.raises(ValueError, match=r"head/ImageReward.pt is not an ImageReward checkpoint: it has no "
                                         r"'blip.visual_encoder.pos_embed' \(keys: layers.0.bias") as err:
        load_image_reward(variant("head", head))
    _one_line(err)
    without = {k: v for k, v in state.items() if k != "blip.text_encoder.encoder.layer.1.output.LayerNorm.bias"}
    with pytest.raises(ValueError, match=r"without/ImageReward.pt is not an ImageReward checkpoint for "
                                         r"med_config.json: 1 tensors missing, the first "
                                         r"'blip.text_encoder.encoder.layer.1.output.LayerNorm.bias'") as err:
        load_image_reward(variant("without", without))
    _one_line(err)
    data = (model / "ImageReward.pt").read_bytes()
    with pytest.raises(ValueError, match=r"truncated/ImageReward.pt .*(not a readable|cannot be read)") as err:
        load_image_reward(variant("truncated", data=data[: len(data) // 2]))
    _one_line(err)
    with pytest.raises(ValueError, match=r"wide/med_config.json does not match .*wide/ImageReward.pt: "
                                         r"blip\.text_encoder\.\S+ has shape \([\d, ]*32,?\), the config implies "
                                         r"\([\d, ]*48,?\)") as err:
        load_image_reward(variant("wide", config={"hidden_size": 48}))
    _one_line(err)
    with pytest.raises(ValueError, match=r"deep/med_config.json does not match .*: num_hidden_layers=3, the "
                                         r"checkpoint has 2 text encoder layers"):
        load_image_reward(variant("deep", config={"num_hidden_layers": 3}))
    with pytest.raises(ValueError, match=r"heads/med_config.json: hidden_size=32 is not divisible by "
                                         r"num_attention_heads=5"):
        load_image_reward(variant("heads", config={"num_attention_heads": 5}))


def test_vit_sizes_come_from_the_checkpoint_shapes():
    """BLIP's ViT-L (ImageReward's) and ViT-B shapes -> create_vit's sizes, 64-wide heads."""
    def shapes(width, depth, patch, image):
        blocks = {f"blip.visual_encoder.blocks.{i}.norm1.weight": (width,) for i in range(depth)}
        return {"blip.visual_encoder.pos_embed": (1, (image // patch) ** 2 + 1, width),
                "blip.visual_encoder.patch_embed.proj.weight": (width, 3, patch, patch),
                "blip.visual_encoder.blocks.0.mlp.fc1.weight": (4 * width, width), **blocks}

    assert vision_sizes(shapes(1024, 24, 16, 224), "x") == dict(image_size=224, patch_size=16, width=1024, depth=24,
                                                                heads=16, mlp_dim=4096)
    assert vision_sizes(shapes(768, 12, 16, 384), "x")["heads"] == 12
    with pytest.raises(ValueError, match="x: the ViT is 96 wide, not a multiple of BLIP's 64-wide heads"):
        vision_sizes(shapes(96, 2, 8, 32), "x")
