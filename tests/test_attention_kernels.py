"""The attention-kernel registry: every kernel computes softmax attention as a float64 NumPy definition does,
the fallbacks happen where a kernel cannot take a call, and the choice is recorded once."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import rel_err

from dpojax import parallel
from dpojax.config import ConfigError, load_config
from dpojax.models import UNet2DConditionModel
from dpojax.models import attention_kernels as kernels
from dpojax.models.attention import Attention, BasicTransformerBlock, configure_attention
from dpojax.tiny import UNET_SDXL


def reference_attention(q, k, v, mask=None):
    """The definition in float64, (B, T, H, D) layout; ``mask`` broadcasts to (B, H, T, S), True = attend."""
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    scores = np.einsum("bthd,bshd->bhts", q, k) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = np.where(mask, scores, -np.inf)
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return np.einsum("bhts,bshd->bthd", weights / weights.sum(axis=-1, keepdims=True), v)


def qkv(batch, q_len, kv_len, heads, head_dim, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal((batch, n, heads, head_dim), dtype=np.float32) * 2
                 for n in (q_len, kv_len, kv_len))


@pytest.mark.parametrize("q_len, kv_len", [(64, 64), (64, 77)])  # UNet self- and cross-attention shapes
def test_xla_kernel_matches_the_definition(q_len, kv_len):
    q, k, v = qkv(2, q_len, kv_len, heads=4, head_dim=16)
    out = jax.jit(lambda q, k, v: kernels.attention(q, k, v, kernel="xla"))(q, k, v)
    assert rel_err(out, reference_attention(q, k, v)) < 1e-5


def test_blocked_kernel_matches_the_definition_and_xla_gradients():
    """Query blocks of 16 over 64 queries (self- and cross-attention), forward and backward."""
    for kv_len in (64, 77):
        q, k, v = qkv(2, 64, kv_len, heads=4, head_dim=16, seed=kv_len)
        blocked = lambda q, k, v: kernels.blocked_attention(q, k, v, block=16)  # noqa: E731
        assert rel_err(jax.jit(blocked)(q, k, v), reference_attention(q, k, v)) < 1e-5
        loss = lambda fn: jax.grad(lambda *a: jnp.sum(jnp.sin(fn(*a))), argnums=(0, 1, 2))  # noqa: E731
        for got, want in zip(jax.jit(loss(blocked))(q, k, v), loss(kernels.xla_attention)(q, k, v), strict=True):
            assert rel_err(got, np.asarray(want, np.float64)) < 1e-5
    assert kernels.resolve("blocked", "gpu") == "blocked"


def test_xla_kernel_with_causal_and_padding_masks_matches_the_definition():
    q, k, v = qkv(2, 7, 7, heads=2, head_dim=8)
    causal = np.tril(np.ones((7, 7), bool))
    out = kernels.attention(q, k, v, is_causal=True)
    assert rel_err(out, reference_attention(q, k, v, causal)) < 1e-5
    keep = np.ones((2, 1, 1, 7), bool)
    keep[1, ..., 5:] = False  # second row: the last two tokens are padding
    out = kernels.attention(q, k, v, mask=jnp.asarray(keep))
    assert rel_err(out, reference_attention(q, k, v, keep)) < 1e-5


def test_splash_kernel_inside_shard_map_matches_the_definition_and_xla_gradients():
    """The Pallas TPU kernel in interpreter mode, per device over the 8 fake devices' batch axis; its custom
    backward kernels against XLA's autodiff."""
    mesh = parallel.make_mesh(data=1, fsdp=-1)
    q, k, v = qkv(8, 128, 128, heads=2, head_dim=16, seed=1)  # head_dim 16: padded to 128 lanes inside
    splash = jax.jit(lambda q, k, v: kernels.splash_attention(q, k, v, mesh=mesh, interpret=True))
    assert rel_err(splash(q, k, v), reference_attention(q, k, v)) < 1e-5

    cotangent = np.random.default_rng(2).standard_normal(q.shape, dtype=np.float32)

    def grads(fn):
        return jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * cotangent), argnums=(0, 1, 2)))(q, k, v)

    for got, want in zip(grads(lambda *a: kernels.splash_attention(*a, mesh=mesh, interpret=True)),
                         grads(kernels.xla_attention), strict=True):
        assert rel_err(got, np.asarray(want, np.float64)) < 1e-4


def test_auto_picks_the_platform_kernel():
    assert kernels.resolve("auto", "gpu") == "cudnn"
    assert kernels.resolve("auto", "tpu") == "splash"
    assert kernels.resolve("auto", "cpu") == "xla"
    assert kernels.resolve("splash", "cpu") == "splash"


@pytest.mark.parametrize("kernel, platform, dtype, kv_len, masked, reason", [
    ("splash", "tpu", jnp.float32, 77, False, "multiples of 128, got 128x77"),
    ("splash", "tpu", jnp.float32, 128, True, "without masks"),
    ("splash", "cpu", jnp.float32, 128, False, "TPU kernel"),
    ("cudnn", "gpu", jnp.float32, 77, False, "needs bf16/fp16"),
    ("cudnn", "cpu", jnp.bfloat16, 77, False, "needs a GPU"),
    ("cudnn", "gpu", jnp.bfloat16, 77, True, "without masks"),  # text encoders: the mask must not be dropped
])
def test_a_kernel_that_cannot_take_a_call_says_why(kernel, platform, dtype, kv_len, masked, reason):
    q = jnp.zeros((1, 128, 2, 64), dtype)
    k = jnp.zeros((1, kv_len, 2, 64), dtype)
    assert reason in kernels.unsupported_reason(kernel, q, k, platform=platform, masked=masked)


@pytest.mark.parametrize("kernel, platform", [("splash", "tpu"), ("cudnn", "gpu")])
def test_a_kernel_takes_the_calls_it_supports(kernel, platform):
    q = jnp.zeros((1, 128, 2, 64), jnp.bfloat16)
    assert kernels.unsupported_reason(kernel, q, q, platform=platform, masked=False) is None


def test_fallback_runs_xla_and_is_recorded_once():
    kernels.CHOSEN.clear()
    q, k, v = qkv(1, 16, 16, heads=2, head_dim=8)
    for _ in range(2):
        out = kernels.attention(q, k, v, kernel="splash")  # CPU: splash falls back
    assert rel_err(out, reference_attention(q, k, v)) < 1e-5
    assert list(kernels.CHOSEN) == [("splash", "xla")]
    assert "fallback: splash is a TPU kernel" in kernels.CHOSEN[("splash", "xla")]


def test_long_unmasked_fallback_runs_blocked():
    """A call the kernel cannot take (here: cuDNN on CPU) that is longer than a query block runs blocked, as the
    VAE's 16384-token attention at 1024 px does under cuDNN (its 512-wide heads), so no score matrix is held."""
    kernels.CHOSEN.clear()
    q, k, v = qkv(1, 2 * kernels.QUERY_BLOCK, 2 * kernels.QUERY_BLOCK, heads=1, head_dim=8)
    out = jax.jit(lambda q, k, v: kernels.attention(q, k, v, kernel="cudnn"))(q, k, v)
    assert rel_err(out, reference_attention(q, k, v)) < 1e-5
    assert list(kernels.CHOSEN) == [("cudnn", "blocked")]
    assert "fallback: cuDNN needs a GPU" in kernels.CHOSEN[("cudnn", "blocked")]


def test_configure_attention_reaches_every_attention_of_the_unet():
    model = configure_attention(UNet2DConditionModel.from_config(dict(UNET_SDXL)), "xla")
    modules = [m for _, m in nnx.iter_modules(model)]
    found = [m for m in modules if isinstance(m, Attention)]
    blocks = [m for m in modules if isinstance(m, BasicTransformerBlock)]
    assert len(blocks) == 8 and len(found) == 2 * len(blocks)  # self- and cross-attention in each block
    assert {m.kernel for m in found} == {"xla"}


def test_unknown_kernel_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="attention kernel 'flash' is not one of auto, xla, cudnn, splash"):
        kernels.resolve("flash", "cpu")
    with pytest.raises(ConfigError, match="model.attention must be one of"):
        load_config(None, ["model.attention=flash"])


@pytest.mark.parametrize("kernel", ["xla", "blocked"])
def test_the_softmax_scale_is_applied_in_fp32(kernel):
    """bf16 queries and keys (SD1.5's head size 40), fp32 values so that the output shows the scores' error: the
    scores are the exact bf16 products scaled in fp32, so the output is the float64 definition's to fp32
    rounding. A scale rounded to bf16 is 0.057% too large and moves this output by about 1e-3."""
    q, k, v = qkv(2, 64, 64, heads=2, head_dim=40, seed=3)
    q, k = (jnp.asarray(t * 3, jnp.bfloat16) for t in (q, k))  # logits of a few units: the softmax is sensitive
    fn = {"xla": kernels.xla_attention, "blocked": lambda q, k, v: kernels.blocked_attention(q, k, v, block=16)}
    out = jax.jit(fn[kernel])(q, k, v)
    assert out.dtype == jnp.float32
    assert rel_err(out, reference_attention(np.asarray(q, np.float32), np.asarray(k, np.float32), v)) < 1e-5


def test_splash_takes_queries_scaled_in_fp32_and_rounded_once():
    """Splash does not scale: its queries are multiplied by 1/sqrt(40) in fp32 and rounded once to bf16, which
    is unbiased; a bf16 product uses the bf16-rounded scale, 0.057% too large on average."""
    q = jnp.asarray(np.random.default_rng(4).standard_normal((4, 128, 2, 40)), jnp.bfloat16)
    ratio = np.asarray(kernels.prescaled_query(q), np.float64) / np.asarray(q, np.float64)
    assert abs(ratio.mean() * math.sqrt(40) - 1) < 1e-4


def test_a_refused_call_runs_blocked_only_when_its_score_matrix_is_large():
    """The fallback decides by the size of the score matrix: 4096 queries against 77 text tokens (SDXL's
    cross-attention at 1024 px) are one xla call, 1024 x 1024 and more run blocked."""
    kernels.CHOSEN.clear()
    q, k, v = qkv(1, 4096, 77, heads=1, head_dim=8)
    out = jax.jit(lambda q, k, v: kernels.attention(q, k, v, kernel="cudnn"))(q, k, v)  # CPU: cuDNN refuses
    assert rel_err(out, reference_attention(q, k, v)) < 1e-5
    assert list(kernels.CHOSEN) == [("cudnn", "xla")]
    q, k, v = qkv(1, 2048, 512, heads=1, head_dim=8)
    jax.jit(lambda q, k, v: kernels.attention(q, k, v, kernel="cudnn"))(q, k, v)
    assert ("cudnn", "blocked") in kernels.CHOSEN


def _attention_modules(graph, tree) -> list[Attention]:
    return [m for _, m in nnx.iter_modules(nnx.merge(graph, tree)) if isinstance(m, Attention)]


@pytest.mark.parametrize("platform, kernel", [("tpu", "splash"), ("gpu", "cudnn")])
def test_auto_is_configured_exactly_as_the_kernel_it_resolves_to(tiny_sdxl, monkeypatch, platform, kernel):
    """model.attention=auto, built for a TPU or a GPU: every Attention of the policy, the reference and the VAE
    holds the resolved kernel and the mesh. On TPU the lowered training step runs splash per device inside
    shard_map (here the Pallas kernel in interpreter mode, so that it lowers on CPU): the only shard_map of a
    TPU program, whose gradients are partitioned by XLA."""
    from dpojax.train.dpo import update_program
    from dpojax.train.harness import Setup

    config = load_config("configs/tiny_sdxl_dpo.yaml", [f"model.pretrained={tiny_sdxl}", "model.attention=auto",
                                                       "mesh.data=1", "mesh.fsdp=-1", "data.resolution=64",
                                                       "dpo.pairs_per_device=1"])
    setup = Setup.build(config, weights="none", platform=platform)
    components, frozen = setup.components, setup.frozen
    modules = [*_attention_modules(components.unet, setup.params),
               *_attention_modules(components.reference, frozen["reference"]),
               *_attention_modules(components.vae, frozen["vae"])]
    assert len(modules) == 2 * 16 + 2  # self- and cross-attention of 8 blocks, twice; the VAE's two
    assert {(m.kernel, m.mesh, m.platform) for m in modules} == {(kernel, setup.mesh, platform)}
    if platform != "tpu":
        return
    make_kernel = kernels._splash_kernel
    monkeypatch.setattr(kernels, "_splash_kernel", lambda *a: make_kernel(*a[:3], True))
    kernels.CHOSEN.clear()
    text = update_program(setup).lower().as_text()
    assert ("auto", "splash") not in kernels.CHOSEN and any(used == "splash" for _, used in kernels.CHOSEN)
    assert "sdy.manual_computation" in text or "SPMDFullToShardShape" in text
