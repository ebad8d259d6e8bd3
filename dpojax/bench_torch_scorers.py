"""The PyTorch originals of the model-based scorers, for `dpojax bench --scorers` and the scorers' parity tests.

Each is built from the files its JAX scorer read and runs the original's own steps on the same uint8 images and
prompts, in batches as the JAX scorer batches them, under ``torch.inference_mode``:

- ``pickscore``, ``clip_score``, ``clip_cosine``: transformers' ``CLIPModel`` with its ``CLIPTokenizer`` (padding,
  truncation) and ``CLIPImageProcessorPil``, the cosine of the projected embeddings scaled as PickScore's model
  card (``logit_scale.exp()``) or torchmetrics' CLIPScore (``100 * max(cos, 0)``) do;
- ``aesthetic``: ``CLIPVisionModelWithProjection``, unit-norm image embeddings, the LAION predictor's
  ``nn.Sequential`` head (DDPO's aesthetic scorer);
- ``hps``: open_clip's ``CLIP`` built from the open_clip model config (ViT-H-14's by default) with the checkpoint's
  ``state_dict``, open_clip's tokenizer and HPSv2's letterbox transform (torchvision), the diagonal of
  ``image_features @ text_features.T`` (``hpsv2.score``);
- ``imagereward``: image-reward's BLIP ViT and BERT, its ``MLP``, ``_transform`` and BLIP's ``BertTokenizer``,
  put together from ``ImageReward.pt`` and ``med_config.json`` as ``ImageReward.load`` would, without its
  downloads; ``ImageReward.score_gard`` scores a batch (``score`` itself takes one image per call).

torch and transformers are test extras; open_clip (open-clip-torch), image-reward and torchvision are imported only
by the scorers that need them. Only ``dpojax.bench`` and the tests import this module.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from dpojax.scorers.imagereward import MEAN, STD, model_files, vision_sizes
from dpojax.weights.folder import component_folder

CLIP_SCALES = ("pickscore", "clip_score", "clip_cosine")
# What each scorer's original needs beyond torch and transformers, for the bench's "skipped" line.
NEEDS = {"hps": "HPSv2's original needs open-clip-torch and torchvision",
         "imagereward": "ImageReward's original needs image-reward (and its timm, fairscale) and torchvision"}


@dataclasses.dataclass
class TorchScorer:
    """An original scorer in three steps: ``preprocess`` uint8 images (N, H, W, 3) -> the model's pixels,
    ``tokenize`` prompts -> the model's text inputs, ``forward(pixels, text)`` -> (N,) scores; calling it runs
    them on ``batch_size``-image batches and returns float32 (N,). ``setting`` says what runs, for the report."""

    name: str
    model: torch.nn.Module
    preprocess: Callable[[np.ndarray], torch.Tensor]
    tokenize: Callable[[Sequence[str]], dict[str, torch.Tensor]]
    forward: Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]
    setting: str
    batch_size: int = 16
    device: str = "cpu"

    def __call__(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        out = []
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                rows = slice(start, start + self.batch_size)
                pixels = self.preprocess(images[rows]).to(self.device)
                text = {k: v.to(self.device) for k, v in self.tokenize(list(prompts[rows])).items()}
                out.append(self.forward(pixels, text).float().cpu().numpy())
        return np.concatenate(out).astype(np.float32)

    def describe(self) -> str:
        return (f"{self.setting}; torch {torch.__version__} on {self.device}, float32, "
                f"{torch.get_num_threads()} threads, batches of {self.batch_size}")


def _pil(images: np.ndarray) -> list[Image.Image]:
    return [Image.fromarray(np.asarray(image)) for image in images]


# --- CLIP: PickScore, CLIP score, the aesthetic predictor ------------------------------------------------------

def clip_image_processor(folder: Path, image_size: int) -> CLIPImageProcessorPil:
    """The folder's processor; without a ``preprocessor_config.json``, CLIP's defaults at the tower's size (what
    the JAX scorers then use)."""
    if (folder / "preprocessor_config.json").is_file():
        return CLIPImageProcessorPil.from_pretrained(folder)
    return CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                 crop_size={"height": image_size, "width": image_size})


def _processor_pixels(processor: CLIPImageProcessorPil) -> Callable[[np.ndarray], torch.Tensor]:
    return lambda images: torch.from_numpy(processor(images=_pil(images), return_tensors="np")["pixel_values"])


def clip_original(model: str | Path, processor: str | Path | None = None, *, scale: str, batch_size: int = 16,
                  device: str = "cpu") -> TorchScorer:
    """PickScore (``scale="pickscore"``) or CLIP score (``clip_score``, ``clip_cosine``) of a CLIPModel folder,
    its tokenizer and processor in ``processor`` (default: the model folder)."""
    if scale not in CLIP_SCALES:
        raise ValueError(f"unknown CLIP scale {scale!r} (choose one of {', '.join(CLIP_SCALES)})")
    clip = transformers.CLIPModel.from_pretrained(component_folder(model)).eval().to(device)
    folder = component_folder(model if processor is None else processor)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder)
    image_processor = clip_image_processor(folder, clip.config.vision_config.image_size)

    def tokenize(prompts):
        text = tokenizer(list(prompts), padding=True, truncation=True, max_length=tokenizer.model_max_length,
                         return_tensors="pt")
        return {"input_ids": text.input_ids, "attention_mask": text.attention_mask}

    def forward(pixels, text):
        out = clip(pixel_values=pixels, **text)  # text_embeds and image_embeds come unit-norm
        cos = (out.text_embeds * out.image_embeds).sum(-1)
        if scale == "pickscore":
            return clip.logit_scale.exp() * cos
        return 100 * cos.clamp(min=0) if scale == "clip_score" else cos

    return TorchScorer(scale, clip, _processor_pixels(image_processor), tokenize, forward,
                       "transformers CLIPModel, CLIPTokenizer, CLIPImageProcessorPil", batch_size, device)


class AestheticMLP(torch.nn.Module):
    """improved-aesthetic-predictor's ``MLP`` at inference: its ``layers`` Sequential (dropouts inactive)."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(input_size, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128),
            torch.nn.Dropout(0.2), torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1))

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.layers(embeds)


def _torch_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu")


def aesthetic_original(clip_model: str | Path, head: str | Path, *, batch_size: int = 16,
                       device: str = "cpu") -> TorchScorer:
    """The LAION aesthetic predictor: the CLIP folder's image tower and the head's .pth or .safetensors."""
    clip = transformers.CLIPVisionModelWithProjection.from_pretrained(component_folder(clip_model)).eval()
    state = _torch_state_dict(Path(head))
    mlp = AestheticMLP(state["layers.0.weight"].shape[1])
    mlp.load_state_dict(state)
    model = torch.nn.ModuleDict({"clip": clip, "mlp": mlp}).eval().to(device)
    processor = clip_image_processor(component_folder(clip_model), clip.config.image_size)

    def forward(pixels, text):
        embeds = clip(pixel_values=pixels).image_embeds
        return mlp(embeds / torch.linalg.vector_norm(embeds, dim=-1, keepdim=True))[:, 0]

    return TorchScorer("aesthetic", model, _processor_pixels(processor), lambda prompts: {}, forward,
                       "transformers CLIPVisionModelWithProjection, CLIPImageProcessorPil, the LAION MLP head",
                       batch_size, device)


# --- HPSv2 ------------------------------------------------------------------------------------------------------

def hps_transform(size: int) -> Callable[[Image.Image], torch.Tensor]:
    """HPSv2's ``preprocess_val`` (``image_transform(..., resize_longest_max=True)``: ToTensor, ResizeMaxSize,
    its normalisation), built from torchvision as its transform.py does."""
    import open_clip
    import torchvision

    functional, transforms = torchvision.transforms.functional, torchvision.transforms

    def resize_max_size(image):
        height, width = image.shape[1:]
        scale = size / float(max(height, width))
        if scale != 1.0:
            new_size = tuple(round(side * scale) for side in (height, width))
            image = functional.resize(image, new_size, transforms.InterpolationMode.BICUBIC)
            pad_h, pad_w = size - new_size[0], size - new_size[1]
            image = functional.pad(image, padding=[pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2],
                                   fill=0)
        return image

    normalize = transforms.Normalize(open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
    return transforms.Compose([lambda image: image.convert("RGB"), transforms.ToTensor(), resize_max_size, normalize])


def hps_original(checkpoint: str | Path, model_config: str | Path | None = None, *, batch_size: int = 16,
                 device: str = "cpu") -> TorchScorer:
    """HPSv2: open_clip's CLIP of ``model_config`` (default ViT-H-14's) with the checkpoint, as ``hpsv2.score``
    builds and runs it."""
    import open_clip

    config = (open_clip.get_model_config("ViT-H-14") if model_config is None
              else json.loads(Path(model_config).read_text()))
    model = open_clip.model.CLIP(**config)
    state = _torch_state_dict(Path(checkpoint))
    model.load_state_dict(state.get("state_dict", state))  # HPSv2's checkpoint['state_dict']
    model = model.eval().to(device)
    image_size = model.visual.image_size
    transform = hps_transform(image_size[0] if isinstance(image_size, (tuple, list)) else image_size)
    tokenizer = open_clip.get_tokenizer("ViT-H-14", context_length=config["text_cfg"]["context_length"])

    def forward(pixels, text):
        image_features = model.encode_image(pixels, normalize=True)
        text_features = model.encode_text(text["text"], normalize=True)
        return torch.diagonal(image_features @ text_features.T)

    return TorchScorer("hps", model, lambda images: torch.stack([transform(image) for image in _pil(images)]),
                       lambda prompts: {"text": tokenizer(list(prompts))}, forward,
                       "open_clip CLIP, its tokenizer, HPSv2's transform (torchvision)", batch_size, device)


# --- ImageReward ------------------------------------------------------------------------------------------------

def image_reward_modules() -> tuple[Any, Any, Any]:
    """image-reward's ``ImageReward.py`` (``ImageReward``, ``MLP``, ``_transform``), ``models/BLIP/vit.py`` and
    ``models/BLIP/med.py``."""
    import ImageReward.ImageReward as reward
    import ImageReward.models.BLIP.med as med
    import ImageReward.models.BLIP.vit as vit

    return reward, vit, med


def blip_tokenizer(folder: str | Path) -> transformers.BertTokenizer:
    """BLIP's ``init_tokenizer`` over a local bert-base-uncased folder instead of its download (less the
    ``enc_token_id`` it sets, which scoring never reads)."""
    tokenizer = transformers.BertTokenizer.from_pretrained(folder)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def build_image_reward(vision: dict[str, Any], med_config: dict[str, Any], tokenizer: transformers.BertTokenizer,
                       proj_dim: int = 256, device: str = "cpu") -> torch.nn.Module:
    """An ``ImageReward`` with random weights, put together as its ``__init__`` does (``BLIP_Pretrain``'s ViT of
    ``vision``, i.e. ``VisionTransformer`` arguments, its BERT of ``med_config`` with the ViT's width as
    ``encoder_width``, the contrastive projections to ``proj_dim``, its ``MLP`` and ``_transform``) but without
    the downloads its ``__init__`` makes."""
    reward, vit, med = image_reward_modules()
    width = vision["embed_dim"]
    config = med.BertConfig(**med_config)
    config.encoder_width = width
    blip = torch.nn.Module()
    blip.visual_encoder = vit.VisionTransformer(**vision)
    blip.text_encoder = med.BertModel(config=config, add_pooling_layer=False)
    blip.vision_proj = torch.nn.Linear(width, proj_dim)
    blip.text_proj = torch.nn.Linear(config.hidden_size, proj_dim)
    blip.tokenizer = tokenizer
    model = object.__new__(reward.ImageReward)  # its __init__ would download bert-base-uncased
    torch.nn.Module.__init__(model)
    model.device, model.blip = device, blip
    model.preprocess, model.mlp = reward._transform(vision["img_size"]), reward.MLP(config.hidden_size)
    model.mean, model.std = MEAN, STD  # ImageReward.__init__'s constants
    return model


def imagereward_original(model: str | Path, tokenizer: str | Path | None = None, *, batch_size: int = 16,
                         device: str = "cpu") -> TorchScorer:
    """ImageReward from a folder with ``ImageReward.pt`` (or ``.safetensors``) and ``med_config.json``, and a
    bert-base-uncased tokenizer folder (default: the model folder); the ViT's sizes from the checkpoint."""
    path, config_path = model_files(model)
    state = _torch_state_dict(path)
    sizes = vision_sizes({k: tuple(v.shape) for k, v in state.items()}, path)
    vision = dict(img_size=sizes["image_size"], patch_size=sizes["patch_size"], embed_dim=sizes["width"],
                  depth=sizes["depth"], num_heads=sizes["heads"], mlp_ratio=sizes["mlp_dim"] / sizes["width"])
    folder = tokenizer if tokenizer is not None else path.parent
    reward = build_image_reward(vision, json.loads(config_path.read_text()), blip_tokenizer(folder),
                                state["blip.vision_proj.weight"].shape[0], device)
    missing, _ = reward.load_state_dict(state, strict=False)  # as ImageReward.load (the position-id buffer)
    if missing:
        raise ValueError(f"{path}: {len(missing)} weights of ImageReward missing, the first {missing[0]!r}")
    reward = reward.eval().to(device)

    def tokenize(prompts):
        text = reward.blip.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=35,
                                     return_tensors="pt")
        return {"input_ids": text.input_ids, "attention_mask": text.attention_mask}

    return TorchScorer("imagereward", reward,
                       lambda images: torch.stack([reward.preprocess(image) for image in _pil(images)]), tokenize,
                       lambda pixels, text: reward.score_gard(text["input_ids"], text["attention_mask"], pixels)[:, 0],
                       "image-reward's BLIP + MLP, its _transform and BertTokenizer, score_gard on batches",
                       batch_size, device)


# --- the bench's entry ------------------------------------------------------------------------------------------

def use_threads(threads: int) -> None:
    torch.set_num_threads(threads)


def torch_device(jax_backend: str) -> str:
    """cuda where JAX runs on a GPU and this torch build has CUDA (both sides on the accelerator), else cpu."""
    return "cuda" if jax_backend == "gpu" and torch.cuda.is_available() else "cpu"


def original(name: str, options: dict[str, Any], *, batch_size: int, device: str = "cpu") -> TorchScorer | None:
    """The original of built-in scorer ``name`` from the scorer ``options`` its JAX scorer was built with (None
    for a scorer without a PyTorch original: the NumPy ones and user scorers)."""
    kw = dict(batch_size=batch_size, device=device)
    if name == "pickscore":
        return clip_original(options["pickscore_model"], options.get("pickscore_processor"), scale=name, **kw)
    if name in ("clip_score", "clip_cosine"):
        return clip_original(options["clip_model"], options.get("clip_processor"), scale=name, **kw)
    if name == "aesthetic":
        return aesthetic_original(options["clip_model"], options["head"], **kw)
    if name == "hps":
        return hps_original(options["hps_checkpoint"], options.get("hps_model_config"), **kw)
    if name == "imagereward":
        return imagereward_original(options["imagereward_model"], options.get("imagereward_tokenizer"), **kw)
    return None
