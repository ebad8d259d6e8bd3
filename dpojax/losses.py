"""Preference losses as pure functions of per-sample errors or log-probs; each returns ``(loss, metrics)``.

Everything here is framework-free math on arrays: the training loops compute the UNet outputs and hand
over per-sample MSEs (Diffusion-DPO family) or per-step DDIM log-probs (D3PO). All reductions run in float32
whatever the compute dtype, because the DPO logit is a small difference of MSEs multiplied by β ≈ 5000.

Layout of the pair losses: a batch of B pairs is a (2B,) vector ``[winners; losers]``, row i of each half
being the same pair (same prompt, noise and timestep). Notation of docs/losses.md:
r = m_ref − m_θ per image, M = r_w − r_l, u = (β/2)·M.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

PAIR_LOSSES = ("sigmoid", "hinge", "ipo", "robust", "sft", "mapo")
REFERENCE_FREE_LOSSES = ("sft", "mapo")  # the training step can skip the reference UNet for these
WINNERS_ONLY_LOSSES = ("sft",)  # model_mse holds the B winners only; losers need not be computed

LN2 = math.log(2.0)


def per_sample_mse(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Mean of (pred − target)² over every axis but the first, in float32: the per-image denoising error."""
    diff = pred.astype(jnp.float32) - target.astype(jnp.float32)
    return jnp.mean(jnp.square(diff), axis=tuple(range(1, diff.ndim)))


def _split_pairs(x: jax.Array, name: str) -> tuple[jax.Array, jax.Array]:
    if x.ndim != 1 or x.shape[0] % 2:
        raise ValueError(f"{name} must have shape (2B,) laid out [winners; losers], got {x.shape}")
    half = x.shape[0] // 2
    x = x.astype(jnp.float32)
    return x[:half], x[half:]


# Per-pair losses of the implicit margin M (shape (B,)); `beta` is the DPO β, so β' = β/2 multiplies M.
def _sigmoid(margin, beta, label_smoothing):
    return jax.nn.softplus(-0.5 * beta * margin)


def _hinge(margin, beta, label_smoothing):
    return jax.nn.relu(1.0 - 0.5 * beta * margin)


def _ipo(margin, beta, label_smoothing):
    # (M − 1/(2β'))² with β' = β/2; the diffusers research script's IPO branch is broken, this is the formula.
    return jnp.square(margin - 1.0 / beta)


def _robust(margin, beta, label_smoothing):
    # Conservative DPO: the label is wrong with probability ε, −(1−ε)·log σ(u) − ε·log σ(−u).
    u = 0.5 * beta * margin
    return (1.0 - label_smoothing) * jax.nn.softplus(-u) + label_smoothing * jax.nn.softplus(u)


_MARGIN_LOSSES: dict[str, Callable] = {"sigmoid": _sigmoid, "hinge": _hinge, "ipo": _ipo, "robust": _robust}


def reference_margin_loss(loss_type: str, model_mse: jax.Array, ref_mse: jax.Array, *, beta: float,
                          label_smoothing: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Diffusion-DPO and its reference-based variants ("sigmoid", "hinge", "ipo", "robust").

    Metrics: ``implicit_acc`` is the fraction of pairs with u > 0 (strict, as the official code: ties count as
    wrong); ``margin`` is mean M (the raw implicit reward margin); ``scaled_margin`` is mean u = (β/2)·M, the
    logit inside σ; ``model_mse_gap``/``ref_mse_gap`` are mean (m_w − m_l) of policy/reference.
    """
    per_pair = _MARGIN_LOSSES[loss_type]
    model_w, model_l = _split_pairs(model_mse, "model_mse")
    ref_w, ref_l = _split_pairs(ref_mse, "ref_mse")
    margin = (ref_w - model_w) - (ref_l - model_l)
    loss = jnp.mean(per_pair(margin, beta, label_smoothing))
    u = 0.5 * beta * margin
    metrics = {
        "loss": loss,
        "implicit_acc": jnp.mean((u > 0).astype(jnp.float32)),
        "model_mse": jnp.mean(jnp.concatenate([model_w, model_l])),
        "ref_mse": jnp.mean(jnp.concatenate([ref_w, ref_l])),
        "model_mse_w": jnp.mean(model_w),
        "model_mse_l": jnp.mean(model_l),
        "model_mse_gap": jnp.mean(model_w - model_l),
        "ref_mse_gap": jnp.mean(ref_w - ref_l),
        "margin": jnp.mean(margin),
        "scaled_margin": jnp.mean(u),
    }
    return loss, metrics


def sft_loss(winner_mse: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Supervised fine-tuning on the preferred images only: the plain denoising MSE, no reference."""
    winner_mse = winner_mse.astype(jnp.float32)
    loss = jnp.mean(winner_mse)
    return loss, {"loss": loss, "model_mse": loss}


def mapo_phi(mse: jax.Array, scale: float = 0.5) -> jax.Array:
    """φ(m) = s·m / (exp(s·m) − 1), continued by its limit 1 at m → 0 (series 1 − x/2 + x²/12 near 0)."""
    x = scale * mse.astype(jnp.float32)
    small = jnp.abs(x) < 1e-3
    x_safe = jnp.where(small, 1.0, x)  # keeps the unused branch (and its gradient) finite at x = 0
    return jnp.where(small, 1.0 - x / 2.0 + jnp.square(x) / 12.0, x_safe / jnp.expm1(x_safe))


def mapo_loss(model_mse: jax.Array, *, beta: float = 0.1, temperature: float = 1000.0,
              scale: float = 0.5) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Reference-free MaPO: L = mean m_w − β_M·mean log σ(T·(φ(m_w) − φ(m_l))).

    φ decreases in m, so the odds term rewards a lower error on the winner than on the loser.
    ``implicit_acc`` is the fraction of pairs where φ(m_w) > φ(m_l), i.e. m_w < m_l.
    """
    model_w, model_l = _split_pairs(model_mse, "model_mse")
    log_odds = temperature * (mapo_phi(model_w, scale) - mapo_phi(model_l, scale))
    odds_term = jnp.mean(jax.nn.log_sigmoid(log_odds))
    loss = jnp.mean(model_w) - beta * odds_term
    metrics = {
        "loss": loss,
        "implicit_acc": jnp.mean((log_odds > 0).astype(jnp.float32)),
        "model_mse": jnp.mean(jnp.concatenate([model_w, model_l])),
        "model_mse_w": jnp.mean(model_w),
        "model_mse_l": jnp.mean(model_l),
        "log_odds": jnp.mean(log_odds),
        "odds_term": odds_term,
    }
    return loss, metrics


def pair_loss(loss_type: str, model_mse: jax.Array, ref_mse: jax.Array | None = None, *, beta: float,
              label_smoothing: float = 0.0, mapo_beta: float = 0.1, mapo_temperature: float = 1000.0,
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The one entry point for the offline pair losses, selected by name (see ``PAIR_LOSSES``).

    ``model_mse``/``ref_mse`` are (2B,) ``[winners; losers]`` from ``per_sample_mse``; for "sft" ``model_mse``
    is the (B,) winners only, and "sft"/"mapo" take no ``ref_mse``.
    """
    if loss_type not in PAIR_LOSSES:
        raise ValueError(f"loss type {loss_type!r} is not one of {', '.join(PAIR_LOSSES)}")
    if loss_type == "sft":
        return sft_loss(model_mse)
    if loss_type == "mapo":
        return mapo_loss(model_mse, beta=mapo_beta, temperature=mapo_temperature)
    if ref_mse is None:
        raise ValueError(f"loss type {loss_type!r} needs ref_mse (the frozen reference's per-sample MSE)")
    return reference_margin_loss(loss_type, model_mse, ref_mse, beta=beta, label_smoothing=label_smoothing)


def clipped_log_ratio(log_ratio: jax.Array, eps: float) -> jax.Array:
    """log clip(exp(d), 1−ε, 1+ε) with torch.clamp's gradient: 1 inside the band (ends included), 0 outside.

    Clipping in log space is the same number and cannot overflow exp() for a far-off ratio.
    """
    lo, hi = math.log1p(-eps), math.log1p(eps)
    inside = (log_ratio >= lo) & (log_ratio <= hi)
    return jnp.where(inside, log_ratio, jax.lax.stop_gradient(jnp.clip(log_ratio, lo, hi)))


def d3po_loss(logp: jax.Array, ref_logp: jax.Array, preference: jax.Array, *, beta: float = 0.1,
              eps: float = 0.1) -> tuple[jax.Array, dict[str, jax.Array]]:
    """D3PO loss at one denoising step for P pairs: −mean log σ(β·Σ_m h_m·log clip(π_θ/π_ref, 1−ε, 1+ε)).

    ``logp``/``ref_logp`` are (P, 2) per-dimension-mean DDIM log-probs of members (A, B) under the policy and
    the frozen reference; ``preference`` is (P, 2) in {−1, 0, +1} from ``pareto_preference`` (ties are (0, 0)
    and give zero gradient). At init (policy = reference) the loss is ln 2.
    """
    log_ratio = logp.astype(jnp.float32) - ref_logp.astype(jnp.float32)
    log_rho = clipped_log_ratio(log_ratio, eps)
    logits = beta * jnp.sum(preference.astype(jnp.float32) * log_rho, axis=-1)
    loss = -jnp.mean(jax.nn.log_sigmoid(logits))
    outside = (log_ratio < math.log1p(-eps)) | (log_ratio > math.log1p(eps))
    metrics = {
        "loss": loss,
        "loss_minus_ln2": loss - LN2,
        "clip_fraction": jnp.mean(outside.astype(jnp.float32)),
        "mean_abs_log_ratio": jnp.mean(jnp.abs(log_ratio)),
        "logit": jnp.mean(logits),
    }
    return loss, metrics


def pareto_preference(reward_a: jax.Array, reward_b: jax.Array) -> jax.Array:
    """h = (h_A, h_B) per pair from (P,) scalar or (P, R) vector rewards by Pareto dominance, int32 (P, 2).

    A dominated (every r_A ≤ r_B, one strictly less) → (−1, +1); B dominated → (+1, −1); otherwise (0, 0).
    For scalar rewards this is (sign(r_A − r_B), sign(r_B − r_A)).
    """
    reward_a, reward_b = jnp.asarray(reward_a), jnp.asarray(reward_b)
    if reward_a.ndim == 1:
        reward_a, reward_b = reward_a[:, None], reward_b[:, None]
    a_dominated = jnp.all(reward_a <= reward_b, axis=-1) & jnp.any(reward_a < reward_b, axis=-1)
    b_dominated = jnp.all(reward_b <= reward_a, axis=-1) & jnp.any(reward_b < reward_a, axis=-1)
    h_a = b_dominated.astype(jnp.int32) - a_dominated.astype(jnp.int32)
    return jnp.stack([h_a, -h_a], axis=-1)
