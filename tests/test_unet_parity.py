"""UNet2DConditionModel equals diffusers' PyTorch UNet (outputs and gradients) on tiny configs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from flax import nnx
from helpers import grads_as_torch, load_from_torch, perturb_, rel_err

from dpojax.models import UNet2DConditionModel

# A tiny SDXL-shaped UNet that diffusers accepts (1.36 M parameters).
SDXL = {
    "sample_size": 32, "block_out_channels": [32, 64], "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2], "attention_head_dim": [2, 4], "use_linear_projection": True,
    "cross_attention_dim": 64, "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 80, "norm_num_groups": 32,
}
TEXT_EMBED_DIM = 80 - 6 * 8  # pooled text width: projection input minus six 8-wide time_id embeddings
SD15 = {
    "sample_size": 32, "block_out_channels": [32, 64], "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "attention_head_dim": 8, "cross_attention_dim": 32, "norm_num_groups": 32,
}
CONFIGS = {
    "sd15": SD15,
    "sdxl": SDXL,
    "sdxl_conv_proj_no_mid": {**SDXL, "use_linear_projection": False, "mid_block_type": None},
    "sd2_upcast": {**SD15, "attention_head_dim": [2, 4], "use_linear_projection": True,
                   "upcast_attention": True, "cross_attention_dim": 48},
    # Three levels, per-block layers/heads/depths, explicit up-path depths per layer, and 10x10 latents so
    # the skips have odd sizes (5 -> 3) and the upsamplers must resize to them.
    "three_levels": {
        "block_out_channels": [32, 64, 64], "layers_per_block": [1, 2, 1],
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "attention_head_dim": [1, 2, 4], "transformer_layers_per_block": [1, 2, 1],
        "reverse_transformer_layers_per_block": [[1, 1], [1, 2, 1], [2, 1]],
        "cross_attention_dim": 32, "norm_num_groups": 16, "mid_block_scale_factor": 1.5, "freq_shift": 1,
        "flip_sin_to_cos": False,
    },
}
BATCH = 2


def make_inputs(config: dict, seed: int, size: int = 16, timestep=(10, 900)) -> dict:
    rng = np.random.default_rng(seed)
    inputs = {
        "sample": rng.standard_normal((BATCH, 4, size, size), dtype=np.float32),
        "timestep": np.asarray(timestep),
        "encoder_hidden_states": rng.standard_normal((BATCH, 7, config["cross_attention_dim"]),
                                                     dtype=np.float32),
    }
    if config.get("addition_embed_type") == "text_time":
        inputs["added_cond_kwargs"] = {
            "text_embeds": rng.standard_normal((BATCH, TEXT_EMBED_DIM), dtype=np.float32),
            "time_ids": rng.uniform(0, 1024, (BATCH, 6)).astype(np.float32),
        }
    return inputs


def torch_inputs(inputs: dict) -> dict:
    return jax.tree.map(torch.from_numpy, inputs)


def torch_unet(config: dict, seed: int) -> TorchUNet:
    torch.manual_seed(seed)
    return perturb_(TorchUNet(**config), seed).eval()


def jax_unet(config: dict, module: TorchUNet, **kw) -> UNet2DConditionModel:
    return load_from_torch(UNet2DConditionModel, config, module, **kw)


def jit_forward(model: nnx.Module):
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda state, inputs: nnx.merge(graphdef, state)(**inputs))
    return lambda inputs: np.asarray(fn(state, inputs))


@pytest.mark.parametrize("name", [n for n in CONFIGS if n != "sdxl"])  # sdxl: see the gradient test
def test_forward_matches_diffusers(name):
    config = CONFIGS[name]
    size, timestep = {"three_levels": (10, (10, 900)), "sd15": (16, 500)}.get(name, (16, (10, 900)))
    inputs = make_inputs(config, seed=1, size=size, timestep=timestep)
    module = torch_unet(config, seed=0)
    with torch.no_grad():
        expected = module(**torch_inputs(inputs)).sample.numpy()
    actual = jit_forward(jax_unet(config, module))(inputs)
    assert actual.shape == expected.shape
    assert rel_err(actual, expected) <= 1e-4


@pytest.fixture(scope="module")
def sdxl():
    """The SDXL-shaped torch UNet, inputs, a fixed cotangent, and torch's output and gradients."""
    module = torch_unet(SDXL, seed=2)
    inputs = make_inputs(SDXL, seed=3)
    weight = np.random.default_rng(4).standard_normal((BATCH, 4, 16, 16), dtype=np.float32)
    module.zero_grad()
    out = module(**torch_inputs(inputs)).sample
    (out * torch.from_numpy(weight)).sum().backward()
    grads = {k: p.grad.numpy() for k, p in module.named_parameters()}
    return module, inputs, weight, out.detach().numpy(), grads


def value_and_grads(model: nnx.Module, inputs: dict, weight: np.ndarray):
    graphdef, state = nnx.split(model)

    def loss(state):
        out = nnx.merge(graphdef, state)(**inputs)
        return jnp.sum(out * weight), out

    traced = jax.jit(jax.value_and_grad(loss, has_aux=True)).trace(state)
    (_, out), grads = traced.lower().compile()(state)
    return np.asarray(out), grads_as_torch(grads), str(traced.jaxpr)


def assert_grads_match(actual: dict, expected: dict, rtol: float) -> None:
    """Per-parameter relative error <= rtol, except for gradients that are zero in exact arithmetic.

    With one channel per GroupNorm group (32 groups, 32 channels) a per-channel bias before the norm cancels
    exactly: those gradients are rounding noise on both sides, so they are checked to be (near) zero instead.
    """
    assert actual.keys() == expected.keys()
    norms = {k: float(np.linalg.norm(g)) for k, g in expected.items()}
    zero_floor = 1e-5 * float(np.median(list(norms.values())))
    zeros = {k for k, n in norms.items() if n < zero_floor}
    assert len(zeros) < len(norms) // 10
    for key in zeros:
        assert np.linalg.norm(actual[key]) < zero_floor, key
    errors = {k: rel_err(actual[k], expected[k]) for k in expected.keys() - zeros}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= rtol, (worst, errors[worst])


@pytest.fixture(scope="module")
def sdxl_model(sdxl):
    return jax_unet(SDXL, sdxl[0])


@pytest.fixture(scope="module")
def sdxl_jax(sdxl, sdxl_model):
    _, inputs, weight, _, _ = sdxl
    return value_and_grads(sdxl_model, inputs, weight)


def test_sdxl_output_and_gradients_match_torch(sdxl, sdxl_jax):
    _, _, _, expected_out, expected_grads = sdxl
    out, grads, _ = sdxl_jax
    assert rel_err(out, expected_out) <= 1e-4
    assert_grads_match(grads, expected_grads, rtol=1e-3)


@pytest.mark.parametrize("remat, marker", [(True, "optimization_barrier"),  # the sequenced recomputation
                                           ("block", "optimization_barrier"),  # the same, per UNet block
                                           (jax.checkpoint_policies.dots_saveable, "remat")])
def test_remat_gives_same_output_and_gradients(sdxl, sdxl_jax, remat, marker):
    module, inputs, weight, _, _ = sdxl
    out, grads, jaxpr = sdxl_jax
    unet = jax_unet(SDXL, module, remat=remat)
    remat_out, remat_grads, remat_jaxpr = value_and_grads(unet, inputs, weight)
    assert marker in remat_jaxpr and marker not in jaxpr
    if remat == "block":  # one checkpoint per down, mid and up block, with a barrier on each side of its backward
        blocks = len(unet.down_blocks) + 1 + len(unet.up_blocks)
        assert remat_jaxpr.count("optimization_barrier") == 2 * blocks
    # Same math; only XLA's fusion (and so fp32 rounding) may differ.
    assert rel_err(remat_out, out) <= 1e-6
    assert_grads_match(remat_grads, grads, rtol=1e-5)


def test_bfloat16_compute_keeps_fp32_params_and_stays_close():
    config = CONFIGS["sd2_upcast"]  # bf16 compute with fp32 (upcast) attention scores
    inputs = make_inputs(config, seed=5)
    module = torch_unet(config, seed=6)
    with torch.no_grad():
        expected = module(**torch_inputs(inputs)).sample.numpy()
    model = jax_unet(config, module, dtype=jnp.bfloat16)
    assert {v.dtype for v in jax.tree.leaves(nnx.state(model, nnx.Param))} == {np.dtype(np.float32)}
    actual = jit_forward(model)(inputs)
    assert actual.dtype == np.float32
    assert rel_err(actual, expected) <= 5e-2


@pytest.mark.parametrize("override, culprit", [
    ({"down_block_types": ["DownBlock2D", "SimpleCrossAttnDownBlock2D"]},
     "down_block_types[1]='SimpleCrossAttnDownBlock2D'"),
    ({"up_block_types": ["AttnUpBlock2D", "UpBlock2D"]}, "up_block_types[0]='AttnUpBlock2D'"),
    ({"class_embed_type": "timestep"}, "class_embed_type='timestep'"),
    ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift='scale_shift'"),
    ({"only_cross_attention": True}, "only_cross_attention=True"),
    ({"attention_head_dim": [2, 4, 8]}, "attention_head_dim has 3 entries"),
])
def test_unsupported_config_is_refused_by_name(override, culprit):
    with pytest.raises(ValueError, match="unet config: ") as info:
        UNet2DConditionModel.from_config({**SDXL, **override})
    assert culprit in str(info.value)


def test_missing_sdxl_conditioning_is_refused_by_name(sdxl, sdxl_model):
    inputs = dict(sdxl[1], added_cond_kwargs={"time_ids": sdxl[1]["added_cond_kwargs"]["time_ids"]})
    with pytest.raises(ValueError, match=r"needs added_cond_kwargs \['text_embeds'\]"):
        sdxl_model(**inputs)
