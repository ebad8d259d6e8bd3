"""AutoencoderKL equals diffusers' PyTorch AutoencoderKL (posterior and decoded pixels) on tiny configs."""

import jax
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchVAE
from flax import nnx
from helpers import load_from_torch, perturb_, rel_err

from dpojax.models import AutoencoderKL

TINY = {
    "block_out_channels": [32, 64], "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2, "norm_num_groups": 32, "latent_channels": 4,
    "sample_size": 32, "scaling_factor": 0.13025,
}
CONFIGS = {
    "default": TINY,
    "no_quant_no_mid_attention": {
        **TINY, "use_quant_conv": False, "use_post_quant_conv": False, "mid_block_add_attention": False,
        "layers_per_block": 2, "shift_factor": 0.1,
    },
}


@pytest.mark.parametrize("name", CONFIGS)
def test_encode_and_decode_match_diffusers(name):
    config = CONFIGS[name]
    torch.manual_seed(0)
    module = perturb_(TorchVAE(**config), seed=0).eval()
    model = load_from_torch(AutoencoderKL, config, module)
    rng = np.random.default_rng(1)
    pixels = rng.uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32)
    latents = rng.standard_normal((2, 4, 16, 16), dtype=np.float32)
    with torch.no_grad():
        posterior = module.encode(torch.from_numpy(pixels)).latent_dist
        decoded = module.decode(torch.from_numpy(latents)).sample.numpy()

    graphdef, state = nnx.split(model)
    def run(state, x, z):
        vae = nnx.merge(graphdef, state)
        return vae.encode(x), vae.decode(z)

    ours, ours_decoded = jax.jit(run)(state, pixels, latents)
    for field in ("mean", "logvar", "std"):
        assert rel_err(getattr(ours, field), getattr(posterior, field).numpy()) <= 1e-4, field
    assert ours_decoded.shape == decoded.shape
    assert rel_err(ours_decoded, decoded) <= 1e-4

    assert model.scaling_factor == config["scaling_factor"]
    assert model.shift_factor == config.get("shift_factor")
    noise = np.asarray((ours.sample(jax.random.key(0)) - ours.mean) / ours.std)  # 2048 draws of N(0, 1)
    assert abs(noise.mean()) < 0.1 and abs(noise.std() - 1) < 0.1
    np.testing.assert_array_equal(ours.mode(), ours.mean)


def test_unsupported_block_type_is_refused_by_name():
    with pytest.raises(ValueError, match=r"vae config: up_block_types\[1\]='AttnUpDecoderBlock2D'"):
        AutoencoderKL.from_config({**TINY, "up_block_types": ["UpDecoderBlock2D", "AttnUpDecoderBlock2D"]})
