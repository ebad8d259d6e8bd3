"""The PyTorch originals of the HPSv2 and ImageReward scorers, importable in the tests (parity and bench) only.

They live in ``.venv/oracles`` (``launch/venv.sh`` installs ``tests/oracles.txt`` there without dependencies), not in
the test venv: image-reward pins timm 0.6 against open-clip-torch's timm 1.x, and the only torchvision wheel for
torch 2.13 is a CUDA build whose compiled ops cannot load next to CPU torch. Installed in the venv, that torchvision
would break every ``import torchvision`` that transformers and diffusers attempt.

The scorers use torchvision only for PIL transforms, which need none of its compiled ops; torchvision registers
fake kernels for those ops at import, which fails when they are absent, so those registrations are skipped here.
ImageReward's package ``__init__``s import its training code (datasets, accelerate) and OpenAI's clip, so its
modules are imported with those skipped. Its ``med.py`` was written for transformers 4:
- it calls ``init_weights`` where transformers 5 wants ``post_init`` first;
- it calls ``invert_attention_mask`` and ``get_head_mask``, which transformers 5 removed (restored as they were);
- it imports three helpers from ``modeling_utils``: transformers 5 moved two to ``pytorch_utils`` and removed
  ``find_pruneable_heads_and_indices``, which only head pruning (never scoring) calls.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

ORACLES = Path(__file__).resolve().parents[1] / ".venv" / "oracles"


def _on_path() -> None:
    if not ORACLES.is_dir():
        pytest.fail(f"{ORACLES} is missing: run `source launch/venv.sh` (it installs tests/oracles.txt there)")
    if str(ORACLES) not in sys.path:
        sys.path.append(str(ORACLES))


def torchvision() -> ModuleType:
    _on_path()
    if "torchvision" not in sys.modules:
        register_fake = torch.library.register_fake

        def skip_torchvision_ops(op, *args, **kwargs):
            if isinstance(op, str) and op.startswith("torchvision::"):
                return lambda fn: fn
            return register_fake(op, *args, **kwargs)

        torch.library.register_fake = skip_torchvision_ops
        try:
            import torchvision as module
        finally:
            torch.library.register_fake = register_fake
        return module
    return sys.modules["torchvision"]


def open_clip() -> ModuleType:
    torchvision()
    import open_clip as module

    return module


def _package_without_init(name: str, folder: Path) -> None:
    """Register ``name`` as a package at ``folder`` without running its ``__init__`` (submodules import as usual)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_loader(name, loader=None, is_package=True)
        module = importlib.util.module_from_spec(spec)
        module.__path__ = [str(folder)]
        sys.modules[name] = module


def invert_attention_mask(self, mask: torch.Tensor) -> torch.Tensor:
    """transformers 4's ``ModuleUtilsMixin.invert_attention_mask`` (gone in 5): 1 = attend -> additive 0, 0 -> min."""
    mask = (mask[:, None, :, :] if mask.dim() == 3 else mask[:, None, None, :]).to(self.dtype)
    return (1.0 - mask) * torch.finfo(self.dtype).min


def no_head_mask(self, head_mask, num_layers: int) -> list[None]:
    """transformers 4's ``get_head_mask`` for the only case scoring uses: no head mask, one None per layer."""
    if head_mask is not None:
        raise NotImplementedError("head masks are not part of ImageReward's score")
    return [None] * num_layers


def image_reward() -> tuple[ModuleType, ModuleType, ModuleType]:
    """ImageReward's ``ImageReward.py`` (``ImageReward``, ``MLP``, ``_transform``), ``models/BLIP/vit.py`` and
    ``models/BLIP/med.py``."""
    torchvision()
    import transformers.modeling_utils
    import transformers.pytorch_utils

    def no_head_pruning(*args, **kwargs):
        raise NotImplementedError("head pruning is not part of ImageReward's score")

    for name in ("apply_chunking_to_forward", "find_pruneable_heads_and_indices", "prune_linear_layer"):
        if not hasattr(transformers.modeling_utils, name):
            setattr(transformers.modeling_utils, name, getattr(transformers.pytorch_utils, name, no_head_pruning))
    _package_without_init("ImageReward", ORACLES / "ImageReward")
    _package_without_init("ImageReward.models", ORACLES / "ImageReward" / "models")
    import ImageReward.ImageReward as reward
    import ImageReward.models.BLIP.med as med
    import ImageReward.models.BLIP.vit as vit

    # transformers 5's init_weights needs what post_init sets up; the tests overwrite every weight anyway.
    init_weights = transformers.modeling_utils.PreTrainedModel.init_weights

    def post_init_first(self):
        if "all_tied_weights_keys" in self.__dict__:  # post_init has run: it calls init_weights itself
            return init_weights(self)
        return self.post_init()

    med.BertPreTrainedModel.init_weights = post_init_first
    for name, method in (("invert_attention_mask", invert_attention_mask), ("get_head_mask", no_head_mask)):
        if not hasattr(med.BertPreTrainedModel, name):
            setattr(med.BertPreTrainedModel, name, method)
    return reward, vit, med
