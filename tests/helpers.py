"""Helpers the test modules share (imported by them, not a test): parity against PyTorch, error measures,
subprocess runs of the ``dpojax`` command, measurements of a trained model, and tiny random scorer models written
as their originals publish them."""

from __future__ import annotations

import dataclasses
import os
import socket
import string
import subprocess
import sys
from collections.abc import Iterable
from io import BytesIO
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from PIL import Image

from dpojax import parallel
from dpojax import schedule as sched
from dpojax.components import Components, policy_unet_params
from dpojax.diffusers_folder import PipelineFolder
from dpojax.tiny import SCHEDULER
from dpojax.train.dpo_step import denoiser_mse, host_batch, micro_batch_inputs, winners_first
from dpojax.weights import io, naming

REPO = Path(__file__).resolve().parents[1]
D3PO_CONFIG = REPO / "configs" / "tiny_d3po_brightness.yaml"  # the D3PO demo: brighter images win


# --- parity with the PyTorch originals ----------------------------------------------------------------------

def perturb_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Add seeded noise to every parameter so that no weight is at its init value (zeros, ones) and a
    parameter that is loaded into the wrong place, or ignored, changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            scale = p.std().item() if p.numel() > 1 and p.std().item() > 0 else 0.1
            p.add_(0.5 * scale * torch.randn(p.shape, generator=gen))
    return module


def numpy_state_dict(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def load_from_torch(cls: type, config: dict, torch_module: torch.nn.Module, **kwargs) -> nnx.Module:
    """``cls.from_config(config, **kwargs)`` built abstractly (not initialised), then given torch weights."""
    model = io.abstract_module(cls, config, **kwargs)
    naming.load_state_dict(model, numpy_state_dict(torch_module))
    return model


def grads_as_torch(grads: nnx.State) -> dict[str, np.ndarray]:
    """NNX gradient state in PyTorch keys and layouts (the same rule as the weights)."""
    out = {}
    for path, var in nnx.to_flat_state(grads):
        value = np.asarray(var.get_value())
        perm = naming.to_torch_perm(path, value.ndim)
        out[naming.torch_key(path)] = value.transpose(perm) if perm else value
    return out


def rel_err(actual, expected) -> float:
    """Relative L2 error ||actual - expected|| / ||expected||, in float64."""
    expected = np.asarray(expected, dtype=np.float64)
    return float(np.linalg.norm(np.asarray(actual, dtype=np.float64) - expected)
                 / max(np.linalg.norm(expected), 1e-12))


def policy_and_nearby_reference(distance: float):
    """A perturbed tiny SDXL torch UNet as the policy and a copy moved by ``distance`` (relative to each weight's
    spread) as the reference, with their JAX (graph, params) splits: (policy, reference, policy split,
    reference split)."""
    from diffusers import UNet2DConditionModel as TorchUNet

    from dpojax.components import split_params
    from dpojax.models import UNet2DConditionModel
    from dpojax.tiny import UNET_SDXL

    torch.manual_seed(0)
    policy = perturb_(TorchUNet(**UNET_SDXL), seed=1).eval()
    reference = TorchUNet(**UNET_SDXL).eval()
    reference.load_state_dict(policy.state_dict())
    with torch.no_grad():
        gen = torch.Generator().manual_seed(2)
        for p in reference.parameters():
            p.add_(distance * p.std().nan_to_num(0.1) * torch.randn(p.shape, generator=gen))
    return (policy, reference, split_params(load_from_torch(UNet2DConditionModel, UNET_SDXL, policy)),
            split_params(load_from_torch(UNet2DConditionModel, UNET_SDXL, reference)))


def unet_only_components(policy_graph, reference_graph) -> Components:
    """SDXL-shaped Components with the UNets and schedule only: the objectives need nothing else."""
    fields = {f.name: None for f in dataclasses.fields(Components)}
    folder = PipelineFolder(path=Path("."), class_name="StableDiffusionXLPipeline",
                            scheduler=sched.NoiseSchedule.from_config(SCHEDULER), tokenizer=None, tokenizer_2=None,
                            force_zeros_for_empty_prompt=True)
    return Components(**{**fields, "folder": folder, "unet": policy_graph, "reference": reference_graph,
                         "compute_dtype": jnp.float32})


def patterned_images(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 (n, height, width, 3): smooth patterns plus noise, so resizing matters and JPEG sizes differ."""
    y, x = np.mgrid[:height, :width]
    rng = np.random.RandomState(seed)
    out = []
    for i in range(n):
        base = np.stack([127 + 100 * np.sin(x / (3 + i) + c) * np.cos(y / (5 + c)) for c in range(3)], -1)
        out.append(np.clip(base + rng.randn(height, width, 3) * 15 * i, 0, 255))
    return np.stack(out).astype(np.uint8)


# --- Pick-a-Pic shards and prepared datasets ---------------------------------------------------------------

def decode_image(data: bytes) -> np.ndarray:
    """An encoded image's RGB pixels."""
    return np.asarray(Image.open(BytesIO(data)).convert("RGB"))


def preference_score(images: np.ndarray) -> np.ndarray:
    """The preference of the synthetic pairs (``dpojax.data.synth``): mean brightness in [0, 1] of uint8 RGB
    images shaped (..., H, W, 3)."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim < 3 or images.shape[-1] != 3:
        raise ValueError(f"preference_score wants uint8 (..., H, W, 3) images, got {images.dtype} "
                         f"{images.shape}")
    return images.mean(axis=(-3, -2, -1)) / 255.0


def shard_rows(src: Path, split: str = "train") -> list[dict]:
    """Every row of a Pick-a-Pic-schema split's parquet shards."""
    import pyarrow.parquet as pq

    from dpojax.data.schema import split_files

    return [row for path in split_files(src, split) for row in pq.read_table(path).to_pylist()]


def prepared_examples(report, split: str = "train") -> list[dict]:
    """Every example of a ``dpojax data prepare`` dataset (its report) split."""
    import tensorflow_datasets as tfds

    source = tfds.data_source(report.dataset_name, split=split, data_dir=str(report.data_dir.parents[2]))
    return [source[i] for i in range(len(source))]


# --- the dpojax command in a subprocess ---------------------------------------------------------------------

def pairs_workdir(root: Path, tiny: Path, rows: int, *, eval_rows: int, image_size: int = 32,
                  splits=None) -> Path:
    """``root`` holding the tiny pipeline (``root/tiny-sdxl``) and prepared synthetic pairs (``root/pairs``)."""
    from dpojax.data.pickapic import prepare_pickapic
    from dpojax.data.synth import write_synthetic_pickapic

    (root / "tiny-sdxl").symlink_to(tiny)
    write_synthetic_pickapic(root / "synth", rows, seed=0, image_size=image_size, eval_rows=eval_rows)
    prepare_pickapic(root / "synth", root / "pairs", **({} if splits is None else {"splits": splits}))
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_env(workdir: Path, devices: int = 1) -> dict[str, str]:
    """The environment of a ``dpojax`` subprocess: ``devices`` fake CPU devices and every program kept in the
    session's compilation cache (conftest's ``compilation_cache``; ``workdir``'s own without it), so each program
    compiles once in the session; the tests folder is importable (scorers given by import path)."""
    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR", str(workdir / "jax_cache"))
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu",
            "JAX_COMPILATION_CACHE_DIR": cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
            "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}


def dpojax_command(*args, fault: str | None = None) -> list[str]:
    """``dpojax ARGS``, with ``fault`` injected in its process (``tests/fault_injection.py``)."""
    if fault is not None:
        return [sys.executable, str(REPO / "tests" / "fault_injection.py"), fault, *map(str, args)]
    return [sys.executable, "-m", "dpojax.cli", *map(str, args)]


def run_dpojax(workdir: Path, *args, devices: int = 1, timeout: float = 600,
               fault: str | None = None) -> subprocess.CompletedProcess:
    """Run ``dpojax ARGS`` in ``workdir`` to its end, capturing its output (``fault``: see ``dpojax_command``)."""
    return subprocess.run(dpojax_command(*args, fault=fault), env=cli_env(workdir, devices), cwd=workdir,
                          capture_output=True, text=True, timeout=timeout)


def torch_unet_flops(unet: torch.nn.Module, latent: int) -> int:
    """PyTorch's FLOP counter on one forward of diffusers' ``unet`` for one image of ``latent`` x ``latent``
    latents and 77 tokens. The unet gets the plain attention processor (batched matrix products): the counter
    does not see inside CPU's fused scaled-dot-product attention kernel."""
    from diffusers.models.attention_processor import AttnProcessor
    from torch.utils.flop_counter import FlopCounterMode

    unet.set_attn_processor(AttnProcessor())
    config = unet.config
    added = {}
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        added = {"added_cond_kwargs": {"text_embeds": torch.randn(1, pooled), "time_ids": torch.randn(1, 6)}}
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        unet.eval()(torch.randn(1, config.in_channels, latent, latent), torch.tensor([10]),
                    torch.randn(1, 77, config.cross_attention_dim), **added)
    return counter.get_total_flops()


# --- measurements -------------------------------------------------------------------------------------------

def paired_change(after, before) -> tuple[float, float]:
    """Mean of the per-image differences ``after - before`` (same prompts and noise) and its standard error."""
    change = np.ravel(np.asarray(after) - np.asarray(before))
    return float(change.mean()), float(change.std(ddof=1) / len(change) ** 0.5)


def implicit_accuracy(components: Components, params, frozen: dict, batches: Iterable[dict], *, beta: float,
                      mesh, seed: int = 0, draws: int = 10) -> dict[str, float]:
    """Held-out implicit reward accuracy (the Diffusion-DPO paper's §5.5): for each pair the DPO logit
    u = (β/2)·[(m_ref^w − m_θ^w) − (m_ref^l − m_θ^l)] averaged over ``draws`` (noise, timestep) draws counts as
    correct when > 0. Returns the accuracy, mean logit, pairs and exact ties over loader ``batches``."""

    @jax.jit
    def pair_logits(params, frozen, batch, key):
        latents, noise, timesteps, cond = micro_batch_inputs(components, frozen, batch, key, 2)
        noisy = sched.add_noise(components.schedule, latents, noise, timesteps)
        target = sched.training_target(components.schedule, latents, noise, timesteps)
        policy = policy_unet_params(components, params, frozen)
        model = winners_first(denoiser_mse(components.unet, policy, components, noisy, timesteps, target, cond))
        ref = winners_first(denoiser_mse(components.reference, frozen["reference"], components, noisy,
                                         timesteps, target, cond))
        half = model.shape[0] // 2
        return 0.5 * beta * ((ref[:half] - model[:half]) - (ref[half:] - model[half:]))

    key = jax.random.key(seed)
    logits = []
    for i, batch in enumerate(batches):
        batch = parallel.global_batch(host_batch(components, batch), mesh)
        u = sum(pair_logits(params, frozen, batch, jax.random.fold_in(key, i * draws + d))
                for d in range(draws)) / draws
        logits.append(np.asarray(jax.device_get(u)))
    u = np.concatenate(logits)
    return {"implicit_acc": float(np.mean(u > 0)), "mean_logit": float(np.mean(u)), "pairs": int(u.size),
            "ties": int(np.sum(u == 0))}


# --- tiny random scorer models on disk, as each original publishes its files ----------------------------------

# Tiny transformers CLIPModels: text width != image width != projection, both activations, both pooling rules,
# short and 77 tokens.
CLIP_CASES = {
    "quick_gelu": dict(
        text=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=77, hidden_act="quick_gelu"),
        vision=dict(hidden_size=40, intermediate_size=44, num_hidden_layers=2, num_attention_heads=4,
                    image_size=30, patch_size=10, hidden_act="quick_gelu"),
        projection_dim=24, pad="<|endoftext|>", legacy_eos=False, image_shape=(48, 40)),
    "gelu": dict(
        text=dict(hidden_size=24, intermediate_size=30, num_hidden_layers=3, num_attention_heads=2,
                  max_position_embeddings=20, hidden_act="gelu"),
        vision=dict(hidden_size=32, intermediate_size=36, num_hidden_layers=3, num_attention_heads=2,
                    image_size=28, patch_size=7, hidden_act="gelu"),
        projection_dim=16, pad="!", legacy_eos=True, image_shape=(64, 96)),
}
# A tiny CLIP image tower (the aesthetic predictor's CLIP ViT-L/14 in miniature).
TINY_CLIP_VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
                        image_size=30, patch_size=10, projection_dim=24, hidden_act="quick_gelu")
# Tiny open_clip CLIPs: vision heads from head_width; text width != image width != embed_dim; 77 tokens (HPS's
# tokenizer).
HPS_CASES = {
    "gelu": dict(config=dict(embed_dim=24,
                             vision_cfg=dict(image_size=30, layers=2, width=40, head_width=10, patch_size=10),
                             text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=4, layers=2)),
                 # 48x40 -> 30x25, padded 2 left and 3 right; 25x60 -> 12.5 rows, which HPSv2 rounds to even
                 image_shapes=[(48, 40), (25, 60)]),
    "quick_gelu": dict(config=dict(embed_dim=16, quick_gelu=True,
                                   vision_cfg=dict(image_size=28, layers=3, width=32, head_width=16, patch_size=7,
                                                   mlp_ratio=2.0),
                                   text_cfg=dict(context_length=77, vocab_size=49408, width=24, heads=2, layers=3)),
                       image_shapes=[(20, 13), (64, 64)]),  # upscaled, then a square only downscaled
}
# Tiny ImageRewards: ViT widths are multiples of BLIP's 64-wide heads; text width != image width.
IMAGE_REWARD_CASES = {
    "one_head": dict(vision=dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=1),
                     text=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
                               max_position_embeddings=40),
                     # 40x49 resizes to 32x39: torchvision's centre crop starts at column 4, floor division's at 3
                     image_shapes=[(40, 49), (20, 26)]),
    "two_heads": dict(vision=dict(img_size=28, patch_size=7, embed_dim=128, depth=3, num_heads=2, mlp_ratio=2.0),
                      text=dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=3, intermediate_size=56,
                                max_position_embeddings=35),
                      image_shapes=[(64, 45), (50, 50)]),  # 64x45 -> 39x28: the crop rules differ by a row
}
BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.ascii_lowercase,
              *(f"##{c}" for c in string.ascii_lowercase), "the", "cat", "dog", "red", "car", "on", "wet", "road",
              "at", "night", "and", ",", "!"]
BLIP_VOCAB_SIZE = len(BERT_VOCAB) + 2  # BLIP's [DEC] and [ENC] come after bert's vocabulary


def write_clip_folder(root: Path, case: str, seed: int = 1):
    """A perturbed transformers CLIPModel of ``CLIP_CASES[case]`` in ``root/model``, its tokenizer and image
    processor in ``root/processor`` (PickScore's Hub layout): (torch model, processor folder)."""
    import transformers
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from dpojax.weights.tiny_tokenizer import write_tiny_clip_tokenizer

    spec = CLIP_CASES[case]
    size = spec["vision"]["image_size"]
    ids = write_tiny_clip_tokenizer(root / "processor", vocab_size=600, pad_token=spec["pad"],
                                    model_max_length=spec["text"]["max_position_embeddings"])
    if spec["legacy_eos"]:  # old configs pool at the highest id, which the tokenizer's EOS is
        ids["eos_token_id"] = 2
    CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(
        root / "processor")
    torch.manual_seed(0)
    config = transformers.CLIPConfig(text_config={**spec["text"], "vocab_size": 600, **ids},
                                     vision_config=spec["vision"], projection_dim=spec["projection_dim"])
    reference = perturb_(transformers.CLIPModel(config).eval(), seed=seed)
    reference.save_pretrained(root / "model")
    return reference, root / "processor"


def tiny_clip_vision(seed: int = 1, **overrides):
    """A perturbed transformers CLIPVisionModelWithProjection of ``TINY_CLIP_VISION`` (with ``overrides``)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(**{**TINY_CLIP_VISION, **overrides})
    return perturb_(transformers.CLIPVisionModelWithProjection(config).eval(), seed=seed)


def aesthetic_head_state(seed: int = 0, dim: int = 24) -> dict[str, np.ndarray]:
    """Random weights of the LAION aesthetic head (``layers.{0,2,4,6,7}``) for ``dim``-d embeddings."""
    rng = np.random.RandomState(seed)
    dims = (dim, 1024, 128, 64, 16, 1)
    state = {}
    for index, (i, o) in zip((0, 2, 4, 6, 7), zip(dims, dims[1:], strict=False), strict=True):
        state[f"layers.{index}.weight"] = (rng.randn(o, i) / np.sqrt(i)).astype(np.float32)
        state[f"layers.{index}.bias"] = rng.randn(o).astype(np.float32)
    return state


def write_clip_h_tokenizer(folder: Path, bpe_path: Path) -> Path:
    """CLIP's BPE tokenizer (the files of laion/CLIP-ViT-H-14-laion2B-s32B-b79K) from open_clip's merges: the
    vocabulary is the byte characters, then each with the word end ``</w>``, then one token per merge, then the
    two special tokens. The pad token is ``!`` (id 0), what open_clip pads with."""
    import gzip
    import json

    from dpojax.weights.tiny_tokenizer import BOS, EOS, byte_level_chars

    with gzip.open(bpe_path, "rt", encoding="utf-8") as file:
        lines = file.read().split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]  # CLIP's vocabulary keeps the first 48894 merges
    chars = byte_level_chars()  # in byte order; CLIP's lists the printable bytes, then the shifted rest
    chars = [c for c in chars if ord(c) < 256] + [c for c in chars if ord(c) >= 256]
    tokens = [*chars, *(c + "</w>" for c in chars), *(m.replace(" ", "") for m in merges), BOS, EOS]
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": "!"}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, **specials}))
    return folder


def write_hps_processor(folder: Path) -> Path:
    """The CLIP-H tokenizer folder HPS reads, from the BPE merges that ship with open_clip (the oracles)."""
    import torch_oracles

    torch_oracles.open_clip()
    return write_clip_h_tokenizer(folder, torch_oracles.ORACLES / "open_clip" / "bpe_simple_vocab_16e6.txt.gz")


def write_hps_checkpoint(root: Path, case: str, seed: int):
    """A perturbed open_clip CLIP of ``HPS_CASES[case]`` saved as HPSv2 publishes it (``{"state_dict": ...}``),
    with its open_clip model config JSON: (the torch model, checkpoint, config)."""
    import json

    import torch_oracles

    spec = HPS_CASES[case]["config"]
    torch.manual_seed(seed)
    model = perturb_(torch_oracles.open_clip().model.CLIP(**spec), seed=seed + 1).eval()
    torch.save({"state_dict": model.state_dict()}, root / f"{case}.pt")
    (root / f"{case}.json").write_text(json.dumps(spec))
    return model, root / f"{case}.pt", root / f"{case}.json"


def write_image_reward(root: Path, case: str, seed: int = 1):
    """A perturbed original ImageReward of ``IMAGE_REWARD_CASES[case]`` (``dpojax.bench_torch_scorers`` puts it
    together, as its loaders would download BERT and configs), saved as ``root/model/ImageReward.pt`` and
    ``med_config.json``, with a BERT vocabulary in ``root/tokenizer``: (the torch ImageReward, model folder,
    tokenizer folder)."""
    import json

    import torch_oracles

    from dpojax.bench_torch_scorers import blip_tokenizer, build_image_reward

    torch_oracles.image_reward()
    spec = IMAGE_REWARD_CASES[case]
    (root / "tokenizer").mkdir(parents=True)
    (root / "tokenizer" / "vocab.txt").write_text("\n".join(BERT_VOCAB) + "\n")
    # As published: encoder_width is BLIP-base's even though the checkpoint's ViT differs (BLIP_Pretrain overrides).
    config = dict(architectures=["BertModel"], attention_probs_dropout_prob=0.1, hidden_act="gelu",
                  hidden_dropout_prob=0.1, initializer_range=0.02, layer_norm_eps=1e-12, model_type="bert",
                  pad_token_id=0, type_vocab_size=2, vocab_size=BLIP_VOCAB_SIZE, encoder_width=768,
                  add_cross_attention=True, **spec["text"])
    torch.manual_seed(0)
    model = build_image_reward(spec["vision"], config, blip_tokenizer(root / "tokenizer"), proj_dim=16)
    with torch.no_grad():  # MLP's init shrinks its input ~100-fold; a trained head, like this, does not
        for layer in model.mlp.modules():
            if isinstance(layer, torch.nn.Linear):
                layer.weight.normal_(0.0, layer.in_features ** -0.5)
    perturb_(model, seed=seed).eval()
    (root / "model").mkdir()
    torch.save(model.state_dict(), root / "model" / "ImageReward.pt")
    (root / "model" / "med_config.json").write_text(json.dumps(config, indent=2))
    return model, root / "model", root / "tokenizer"
