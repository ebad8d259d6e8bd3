"""The training objective against an independent PyTorch computation of the reference formula.

PyTorch side: diffusers' ``UNet2DConditionModel`` and ``DDPMScheduler.add_noise`` with the same weights,
the official code's loss (docs/losses.md) written out in torch (batch laid out [winners; losers]).
JAX side: ``dpojax.train.dpo_step.preference_objective`` (pair-interleaved layout) and ``jax.grad``.

fp32 limits the agreement at large β: the logit is β/2 times a difference of MSEs of order 1, so the ~1e-7
rounding of each MSE becomes ~1e-4 in the loss at β = 5000. The 1e-4 check therefore runs at β = 500 (with a
reference 10x further from the policy, so the logit is as large), and β = 5000 is checked to 1e-3.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from diffusers import DDPMScheduler
from helpers import policy_and_nearby_reference, rel_err, unet_only_components

from dpojax.config import LossConfig
from dpojax.losses import LN2
from dpojax.pipeline import TextConditioning
from dpojax.tiny import SCHEDULER, TEXT_HIDDEN
from dpojax.train.dpo_step import preference_objective

PAIRS, LATENT = 3, 8


@pytest.fixture(scope="module")
def models():
    # a slightly different reference, so the margin and the loss are not trivial
    return policy_and_nearby_reference(2e-2)


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    return {
        "latents_w": rng.standard_normal((PAIRS, 4, LATENT, LATENT), np.float32),
        "latents_l": rng.standard_normal((PAIRS, 4, LATENT, LATENT), np.float32),
        "noise": rng.standard_normal((PAIRS, 4, LATENT, LATENT), np.float32),
        "t": np.array([10, 500, 990], np.int64),
        "hidden": rng.standard_normal((PAIRS, 77, 2 * TEXT_HIDDEN), np.float32),
        "pooled": rng.standard_normal((PAIRS, TEXT_HIDDEN), np.float32),
        "time_ids": np.tile(np.array([[64, 64, 0, 0, 64, 64]], np.float32), (PAIRS, 1)),
    }


def torch_dpo(policy, reference, x, beta):
    """The reference formula in PyTorch; returns (loss, grad global norm, implicit_acc)."""
    sched = DDPMScheduler.from_config(SCHEDULER)
    two = lambda a: torch.cat([torch.from_numpy(a), torch.from_numpy(a)])  # noqa: E731  tile to [w; l]
    z = torch.cat([torch.from_numpy(x["latents_w"]), torch.from_numpy(x["latents_l"])])
    eps, t = two(x["noise"]), two(x["t"])
    z_t = sched.add_noise(z, eps, t)
    cond = {"text_embeds": two(x["pooled"]), "time_ids": two(x["time_ids"])}
    policy.zero_grad()
    pred = policy(z_t, t, two(x["hidden"]), added_cond_kwargs=cond).sample
    with torch.no_grad():
        pred_ref = reference(z_t, t, two(x["hidden"]), added_cond_kwargs=cond).sample
    m = ((pred - eps) ** 2).mean(dim=(1, 2, 3))
    mr = ((pred_ref - eps) ** 2).mean(dim=(1, 2, 3))
    u = -0.5 * beta * ((m[:PAIRS] - m[PAIRS:]) - (mr[:PAIRS] - mr[PAIRS:]))
    loss = -torch.nn.functional.logsigmoid(u).mean()
    loss.backward()
    grad_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in policy.parameters()))
    return loss.item(), grad_norm.item(), (u > 0).float().mean().item()


def jax_dpo(policy_split, reference_split, x, beta, *, same_reference=False):
    graph, params = policy_split
    ref_graph, ref_params = policy_split if same_reference else reference_split
    interleave = lambda w, l: jnp.stack([w, l], axis=1).reshape((-1,) + w.shape[1:])  # noqa: E731, E741
    pair = lambda a: jnp.repeat(jnp.asarray(a), 2, axis=0)  # noqa: E731
    latents = interleave(jnp.asarray(x["latents_w"]), jnp.asarray(x["latents_l"]))
    cond = TextConditioning(pair(x["hidden"]), pair(x["pooled"]), pair(x["time_ids"]))
    components = unet_only_components(graph, ref_graph)

    def loss_fn(p):
        return preference_objective(components, LossConfig(beta=beta), p, ref_params, latents,
                                    pair(x["noise"]), pair(x["t"].astype(np.int32)), cond)

    (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    return float(loss), float(optax.tree.norm(grads)), {k: float(v) for k, v in metrics.items()}


@pytest.mark.parametrize(("beta", "tolerance"), [(500.0, 1e-4), (5000.0, 1e-3)])
def test_loss_and_gradient_norm_match_pytorch(models, inputs, beta, tolerance):
    policy, reference, policy_split, reference_split = models
    torch_loss, torch_norm, torch_acc = torch_dpo(policy, reference, inputs, beta)
    loss, norm, metrics = jax_dpo(policy_split, reference_split, inputs, beta)
    assert 0.05 < torch_loss < 5 and abs(torch_loss - LN2) > 1e-2, "the check needs a non-trivial margin"
    assert rel_err(loss, torch_loss) <= tolerance
    assert rel_err(norm, torch_norm) <= tolerance
    assert metrics["implicit_acc"] == torch_acc


def test_loss_is_ln2_when_policy_is_reference(models, inputs):
    """At init u = 0 up to fp32 rounding: the policy's forward runs inside the gradient computation and the
    reference's alone, and XLA may round them a few ulps apart, so |M| is up to a few 1e-7 of MSEs near 1 (not
    exactly 0; measured 2e-7 on one CPU) and implicit_acc counts the sign of that noise. β/2 = 2500 turns that
    into a loss up to ~1e-3 from ln 2, so the loss is checked against softplus(−(β/2)·M) of the reported M."""
    _, _, policy_split, _ = models
    loss, norm, metrics = jax_dpo(policy_split, None, inputs, 5000.0, same_reference=True)
    assert abs(metrics["margin"]) < 1e-6
    assert loss == pytest.approx(np.logaddexp(0.0, -2500.0 * metrics["margin"]), abs=1e-6)
    assert loss == pytest.approx(LN2, abs=2e-3)
    assert norm > 0  # (β/4)·∇(m_w − m_l) is not zero
