"""NNX models equal to the diffusers/transformers PyTorch originals (proven by the parity tests)."""

from dpojax.models.clip_text import CLIPTextModel, CLIPTextModelWithProjection
from dpojax.models.clip_vision import CLIPVisionModelWithProjection
from dpojax.models.unet import UNet2DConditionModel
from dpojax.models.vae import AutoencoderKL, DiagonalGaussian

__all__ = ["AutoencoderKL", "CLIPTextModel", "CLIPTextModelWithProjection", "CLIPVisionModelWithProjection",
           "DiagonalGaussian", "UNet2DConditionModel"]
