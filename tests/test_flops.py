"""Model FLOPs read from a program's jaxpr (``dpojax.flops``), against hand counts and against PyTorch's own
FLOP counter (``torch.utils.flop_counter``) on diffusers' UNet of the same tiny configs.

Both sides count every matrix product and convolution at 2 FLOPs per multiply-add (diffusers with its plain
attention processor: ``helpers.torch_unet_flops``), so the counts must be equal."""

import jax
import jax.numpy as jnp
import pytest
from diffusers import UNet2DConditionModel as TorchUNet
from flax import nnx
from helpers import torch_unet_flops

from dpojax.flops import matmul_flops, unet_forward_flops
from dpojax.models import UNet2DConditionModel
from dpojax.tiny import UNET_SD15, UNET_SDXL
from dpojax.weights import io


def test_products_convolutions_and_control_flow_are_counted_by_hand():
    x, w = jnp.zeros((5, 3, 7)), jnp.zeros((7, 4))
    assert matmul_flops(lambda x, w: x @ w, x, w) == 2 * 5 * 3 * 7 * 4
    image, kernel = jnp.zeros((2, 9, 9, 3)), jnp.zeros((3, 3, 3, 8))  # NHWC, HWIO, valid padding: 7x7 out
    conv = jax.lax.conv_general_dilated(image, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert conv.shape == (2, 7, 7, 8)
    assert matmul_flops(lambda i, k: jax.lax.conv_general_dilated(
        i, k, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")), image, kernel) == 2 * 2 * 7 * 7 * 8 * 27
    grouped = jnp.zeros((3, 3, 1, 3))  # depthwise: each output channel reads one input channel
    assert matmul_flops(lambda i, k: jax.lax.conv_general_dilated(
        i, k, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=3),
        image, grouped) == 2 * 2 * 7 * 7 * 3 * 9
    square = jnp.zeros((4, 4))

    def scanned(m):
        return jax.lax.scan(lambda c, _: (c @ m, None), m, length=3)[0]

    assert matmul_flops(scanned, square) == 3 * 2 * 4 ** 3
    branches = (lambda m: m @ m @ m, lambda m: m @ m)  # a cond runs one branch: the larger is counted
    assert matmul_flops(lambda p, m: jax.lax.cond(p, *branches, m), True, square) == 2 * 2 * 4 ** 3
    assert matmul_flops(jax.jit(lambda m: jnp.tanh(m @ m) + 1), square) == 2 * 4 ** 3  # inside a nested jit
    assert matmul_flops(jax.checkpoint(lambda m: m @ m), square) == 2 * 4 ** 3  # inside remat


def test_while_loops_with_products_are_refused():
    def loop(m):
        return jax.lax.while_loop(lambda c: c[0, 0] < 10, lambda c: c @ m, m)

    with pytest.raises(ValueError, match="while loop"):
        matmul_flops(loop, jnp.ones((2, 2)))


@pytest.mark.parametrize(("config", "sdxl"), [(UNET_SDXL, True), (UNET_SD15, False)], ids=["sdxl", "sd15"])
def test_unet_forward_count_equals_torch_flop_counter(config, sdxl):
    size, tokens, width = 8, 77, config["cross_attention_dim"]
    graph, params = nnx.split(io.abstract_module(UNet2DConditionModel, config), nnx.Param)
    added = None
    if sdxl:
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        added = {"text_embeds": (pooled,), "time_ids": (6,)}
    ours = unet_forward_flops(graph, params, latent=(4, size, size), hidden=(tokens, width), added=added)
    assert ours == torch_unet_flops(TorchUNet(**config), size) > 0
