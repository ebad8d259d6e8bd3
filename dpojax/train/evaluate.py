"""Held-out implicit reward accuracy (paper §5.5): does the policy rank a pair the way the label does?

For each pair the DPO logit u = (β/2)·[(m_ref^w − m_θ^w) − (m_ref^l − m_θ^l)] is averaged over ``draws``
random (noise, timestep) draws; the pair counts as correct when the average is > 0.
"""

from __future__ import annotations

from collections.abc import Iterable

import jax
import numpy as np
from jax.sharding import NamedSharding

from dpojax import schedule as sched
from dpojax.train.state import Components, policy_unet_params
from dpojax.train.step import denoiser_mse, device_batch, host_batch, micro_batch_inputs, winners_first


def make_pair_logits(components: Components, beta: float):
    """Jitted ``(params, frozen, batch, key) -> (B,)`` DPO logits u of the batch's pairs for one draw."""

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

    return pair_logits


def implicit_accuracy(components: Components, params, frozen: dict, batches: Iterable[dict], *, beta: float,
                      batch_sharding: NamedSharding, seed: int = 0, draws: int = 10) -> dict[str, float]:
    """Accuracy and mean logit over loader ``batches`` (winner first), each pair's u averaged over draws."""
    pair_logits = make_pair_logits(components, beta)
    key = jax.random.key(seed)
    logits = []
    for i, batch in enumerate(batches):
        batch = device_batch(host_batch(components, batch), batch_sharding)
        u = sum(pair_logits(params, frozen, batch, jax.random.fold_in(key, i * draws + d))
                for d in range(draws)) / draws
        logits.append(np.asarray(jax.device_get(u)))
    u = np.concatenate(logits)
    return {"implicit_acc": float(np.mean(u > 0)), "mean_logit": float(np.mean(u)), "pairs": int(u.size),
            "ties": int(np.sum(u == 0))}

