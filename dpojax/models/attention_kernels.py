"""The attention-kernel registry: one softmax attention, several implementations, chosen in one place.

- ``xla``: plain XLA ops; runs everywhere and is the fallback of the others.
- ``cudnn``: cuDNN flash attention through ``jax.nn.dot_product_attention(implementation="cudnn")`` (GPU, bf16 or
  fp16, head_dim a multiple of 8 up to 128).
- ``splash``: the Pallas TPU splash kernel, per device inside ``jax.shard_map`` over the batch mesh axes (a
  Pallas call cannot be partitioned by the compiler), for sequences that are multiples of 128 tokens without a
  mask; the head dimension is zero-padded to a multiple of 128 lanes.
- ``blocked``: xla over blocks of ``QUERY_BLOCK`` queries one after another, with flash attention's backward
  pass (probabilities rebuilt per block from the saved log-sum-exp): like the fused kernels it never holds a
  whole (queries x keys) score matrix, so `dpojax plan` uses it on CPU to stand in for cudnn/splash memory;
  also a fallback for long sequences on any platform.
- ``auto``: cudnn on GPU, splash on TPU, xla elsewhere.

A kernel that cannot take a call (cross-attention to 77 text tokens under splash, fp32 under cuDNN, a mask or
causal attention under either, the VAE's 512-wide heads under cuDNN) falls back for that call: to blocked when
the call is unmasked and its score matrix is large (``BLOCKED_MIN_SCORES``: no whole score matrix of a
16384-token image), else to xla (cross-attention of 4096 queries to 77 tokens is one small matrix, not eight
serialised blocks). Which kernel ran, and why, is logged once per distinct choice at trace time (``logging``
name ``dpojax.attention``) and kept in :data:`CHOSEN` for reports such as `dpojax bench`.
All kernels compute the same function, with the softmax scale 1/sqrt(head_dim) applied in fp32 as
``jax.nn.dot_product_attention`` and cuDNN do; tests compare them with a NumPy reference.
"""

from __future__ import annotations

import functools
import logging
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from dpojax.parallel import BATCH_AXES

KERNELS = ("auto", "xla", "cudnn", "splash", "blocked")
QUERY_BLOCK = 512  # queries per block of the blocked kernel
BLOCKED_MIN_SCORES = 1 << 20  # a fallback runs blocked from this many scores per (image, head): 1024 x 1024
SPLASH_BLOCK = 128  # TPU lane width: splash needs sequence lengths (and pads head_dim) to multiples of it
SPLASH_MAX_BLOCK = 512

logger = logging.getLogger("dpojax.attention")
CHOSEN: dict[tuple[str, str], str] = {}  # (requested, used) -> reason, filled the first time each is traced


def check_kernel(name: str) -> str:
    if name not in KERNELS:
        raise ValueError(f"attention kernel {name!r} is not one of {', '.join(KERNELS)}")
    return name


def resolve(requested: str, platform: str) -> str:
    """The kernel ``requested`` names on ``platform`` ("auto" picks the platform's fast one)."""
    if check_kernel(requested) != "auto":
        return requested
    return {"gpu": "cudnn", "cuda": "cudnn", "tpu": "splash"}.get(platform, "xla")


def unsupported_reason(kernel: str, q: jax.Array, k: jax.Array, *, platform: str, masked: bool) -> str | None:
    """Why ``kernel`` cannot compute this call (None when it can)."""
    if kernel == "cudnn":
        if platform not in ("gpu", "cuda"):
            return f"cuDNN needs a GPU, running on {platform}"
        if q.dtype not in (jnp.bfloat16, jnp.float16):
            return f"cuDNN flash attention needs bf16/fp16, got {q.dtype}"
        if q.shape[-1] % 8 or q.shape[-1] > 128:
            return f"cuDNN flash attention needs head_dim a multiple of 8 up to 128, got {q.shape[-1]}"
        if masked:  # the cudnn call here takes no mask: a masked or causal call must not lose it
            return "cuDNN is used without masks (the UNet's attention)"
    if kernel == "splash":
        if platform != "tpu":
            return f"splash is a TPU kernel, running on {platform}"
        if masked:
            return "splash is used without masks (the UNet's attention)"
        if q.shape[1] % SPLASH_BLOCK or k.shape[1] % SPLASH_BLOCK:
            return f"splash needs sequence lengths that are multiples of {SPLASH_BLOCK}, got {q.shape[1]}x{k.shape[1]}"
    return None


def _announce(requested: str, used: str, reason: str) -> None:
    if (requested, used) not in CHOSEN:
        CHOSEN[(requested, used)] = reason
        logger.info("attention kernel %s (requested %s): %s", used, requested, reason)


def softmax_scale(q: jax.Array) -> jax.Array:
    """1/sqrt(head_dim) in fp32 (in bf16 it would be rounded: 0.057% too large for a head of 40)."""
    return jnp.float32(1.0 / math.sqrt(q.shape[-1]))


def prescaled_query(q: jax.Array) -> jax.Array:
    """``q`` times the softmax scale, multiplied in fp32 and rounded once to ``q``'s dtype, for a kernel that
    does not scale (splash): unbiased, where a bf16 product would take the bf16-rounded scale."""
    return (q.astype(jnp.float32) * softmax_scale(q)).astype(q.dtype)


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None,
                  is_causal: bool = False) -> jax.Array:
    """Masked calls go to ``jax.nn.dot_product_attention``; unmasked ones (the UNet's) are two einsums around
    a softmax, scores in fp32 as there: on XLA:CPU this has fewer ops (no mask plumbing), and it is the faster
    on CPU (``dpojax bench``)."""
    if mask is not None or is_causal:
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, implementation="xla")
    return _softmax_attention(q, k, v)


@jax.custom_vjp
def _softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    return _softmax_attention_forward(q, k, v)[0]


def _softmax_attention_forward(q, k, v):
    """Attention keeping the probabilities for the backward pass. Differentiated automatically, XLA:CPU fused
    the score product and the exponential into several backward fusions and computed them again in each."""
    weights = jax.nn.softmax(_scores(q, k), axis=-1)
    return jnp.einsum("bhts,bshd->bthd", weights.astype(v.dtype), v), (q, k, v, weights)


def _softmax_attention_backward(residuals, d_out):
    q, k, v, weights = residuals
    f32 = dict(preferred_element_type=jnp.float32)
    dv = jnp.einsum("bhts,bthd->bshd", weights.astype(v.dtype), d_out)
    d_weights = jnp.einsum("bthd,bshd->bhts", d_out, v, **f32)
    d_scores = weights * (d_weights - jnp.sum(d_weights * weights, axis=-1, keepdims=True))
    d_scores = (d_scores * softmax_scale(q)).astype(q.dtype)
    return (jnp.einsum("bhts,bshd->bthd", d_scores, k), jnp.einsum("bhts,bthd->bshd", d_scores, q), dv)


_softmax_attention.defvjp(_softmax_attention_forward, _softmax_attention_backward)


def _blocks(x: jax.Array, block: int) -> list[jax.Array]:
    """(B, T, ...) -> T/block arrays of (B, block, ...)."""
    return [x[:, i:i + block] for i in range(0, x.shape[1], block)]


def _chained(*arrays):
    """``arrays`` unchanged, but computed only once all of them exist: XLA cannot move work on the first ones
    ahead of the last (the blocks run one after another, holding one block's scores at a time)."""
    return jax.lax.optimization_barrier(arrays)


def _scores(q_block: jax.Array, k: jax.Array) -> jax.Array:
    """Scaled scores in fp32, (B, H, T, S)."""
    return jnp.einsum("bthd,bshd->bhts", q_block, k, preferred_element_type=jnp.float32) * softmax_scale(q_block)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _blocked(q: jax.Array, k: jax.Array, v: jax.Array, block: int) -> jax.Array:
    return _blocked_forward(q, k, v, block)[0]


def _blocked_forward(q, k, v, block):
    """Softmax attention one query block at a time; also the rows' log-sum-exp (fp32), which is all the
    backward pass needs to rebuild a block's probabilities."""
    outs, lses, previous = [], [], jnp.zeros((), v.dtype)
    for q_block in _blocks(q, block):
        q_block, _ = _chained(q_block, previous)
        scores = _scores(q_block, k)
        lse = jax.nn.logsumexp(scores, axis=-1)
        weights = jnp.exp(scores - lse[..., None]).astype(v.dtype)
        previous = jnp.einsum("bhts,bshd->bthd", weights, v)
        outs.append(previous)
        lses.append(lse)
    out = jnp.concatenate(outs, axis=1)
    return out, (q, k, v, out, jnp.concatenate(lses, axis=-1))


def _blocked_backward(block, residuals, d_out):
    """Flash attention's backward pass, block by block: rebuild the probabilities from the log-sum-exp,
    accumulate dK and dV in fp32; each block waits for the previous one's accumulators."""
    q, k, v, out, lse = residuals
    f32 = dict(preferred_element_type=jnp.float32)
    dk, dv = jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
    dqs = []
    for i, (q_block, o_block, do_block) in enumerate(zip(_blocks(q, block), _blocks(out, block),
                                                         _blocks(d_out, block), strict=True)):
        lse_block = lse[:, :, i * block:(i + 1) * block]
        (q_block, o_block, do_block, lse_block), (dk, dv) = _chained((q_block, o_block, do_block, lse_block),
                                                                     (dk, dv))
        probs = jnp.exp(_scores(q_block, k) - lse_block[..., None])
        dv = dv + jnp.einsum("bhts,bthd->bshd", probs.astype(v.dtype), do_block, **f32)
        d_probs = jnp.einsum("bthd,bshd->bhts", do_block, v, **f32)
        rows = jnp.einsum("bthd,bthd->bht", do_block.astype(jnp.float32), o_block.astype(jnp.float32))
        d_scores = (probs * (d_probs - rows[..., None]) * softmax_scale(q)).astype(q.dtype)
        dqs.append(jnp.einsum("bhts,bshd->bthd", d_scores, k, **f32).astype(q.dtype))
        dk = dk + jnp.einsum("bhts,bthd->bshd", d_scores, q_block, **f32)
    return jnp.concatenate(dqs, axis=1), dk.astype(k.dtype), dv.astype(v.dtype)


_blocked.defvjp(_blocked_forward, _blocked_backward)


def _blockable(q: jax.Array, block: int = QUERY_BLOCK) -> bool:
    return q.shape[1] > block and q.shape[1] % block == 0


def _blocked_fallback(q: jax.Array, k: jax.Array) -> bool:
    """Whether an unmasked call a kernel refuses runs blocked: its score matrix is large, and it splits into
    query blocks. Smaller ones (a 4096 x 77 cross-attention) are one xla call rather than serialised blocks."""
    return q.shape[1] * k.shape[1] >= BLOCKED_MIN_SCORES and _blockable(q)


def blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, block: int = QUERY_BLOCK) -> jax.Array:
    """xla attention over blocks of ``block`` queries, one after another, with flash attention's backward pass
    (probabilities rebuilt per block from the saved log-sum-exp): forward and backward hold one block's
    (block x keys) scores at a time, whatever order XLA would otherwise schedule them in. Python-unrolled, so
    XLA's cost analysis counts every block."""
    if not _blockable(q, block):
        return xla_attention(q, k, v)
    return _blocked(q, k, v, block)


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")


def _splash_block(length: int) -> int:
    return math.gcd(length, SPLASH_MAX_BLOCK)


def _splash_kernel(heads: int, q_len: int, kv_len: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    bq, bkv = _splash_block(q_len), _splash_block(kv_len)
    blocks = splash.BlockSizes(block_q=bq, block_kv=bkv, block_q_dkv=bq, block_kv_dkv=bkv, block_q_dq=bq,
                               block_kv_dq=bkv)
    mask = masks.MultiHeadMask([masks.FullMask((q_len, kv_len)) for _ in range(heads)])
    return splash.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mesh: Mesh | None = None,
                     interpret: bool = False) -> jax.Array:
    """Splash over (B, T, H, D) arrays; inside ``shard_map`` over the batch axes of ``mesh`` when given."""
    head_dim = q.shape[-1]
    pad = -head_dim % SPLASH_BLOCK  # zero lanes add nothing to q·k and give zero output columns
    q = prescaled_query(q)  # the kernel does not scale

    def per_device(q, k, v):
        to_heads = lambda t: jnp.pad(t, ((0, 0),) * 3 + ((0, pad),)).transpose(0, 2, 1, 3)  # noqa: E731
        kernel = _splash_kernel(q.shape[2], q.shape[1], k.shape[1], interpret)
        out = jax.vmap(kernel)(to_heads(q), to_heads(k), to_heads(v))
        return out.transpose(0, 2, 1, 3)[..., :head_dim]

    axes = tuple(a for a in BATCH_AXES if mesh is not None and a in mesh.shape and mesh.shape[a] > 1)
    if not axes or q.shape[0] % math.prod(mesh.shape[a] for a in axes):
        return per_device(q, k, v)
    spec = PartitionSpec(axes)
    return jax.shard_map(per_device, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, kernel: str = "auto", mask: jax.Array | None = None,
              is_causal: bool = False, mesh: Mesh | None = None, platform: str | None = None,
              interpret: bool = False) -> jax.Array:
    """Softmax(q·kᵀ/√d)·v over (batch, tokens, heads, head_dim), by ``kernel`` or, when it cannot, by xla.

    ``mask`` (True = attend) and ``is_causal`` serve the CLIP text encoders; ``mesh`` places splash per device;
    ``platform`` is the one the program is built for (default: the running backend's); ``interpret`` runs the
    Pallas kernel in interpreter mode (tests on CPU).
    """
    platform = platform or jax.devices()[0].platform
    chosen = resolve(kernel, platform)
    masked = mask is not None or is_causal
    reason = unsupported_reason(chosen, q, k, platform=platform, masked=masked)
    if reason is not None:
        if not masked and _blocked_fallback(q, k):  # e.g. the VAE's 16384-token, 512-wide attention at 1024 px
            _announce(kernel, "blocked", f"fallback: {reason}; {q.shape[1]}x{k.shape[1]} scores: blocked keeps "
                                         f"memory linear")
            return blocked_attention(q, k, v)
        _announce(kernel, "xla", f"fallback: {reason}")
        return xla_attention(q, k, v, mask=mask, is_causal=is_causal)
    _announce(kernel, chosen, f"on {platform}")
    if chosen == "cudnn":
        return cudnn_attention(q, k, v)
    if chosen == "splash":
        return splash_attention(q, k, v, mesh=mesh, interpret=interpret)
    if chosen == "blocked" and not masked:
        return blocked_attention(q, k, v)
    return xla_attention(q, k, v, mask=mask, is_causal=is_causal)

