"""The D3PO training step's gradient against an independent PyTorch computation of the reference formula.

PyTorch side: diffusers' ``UNet2DConditionModel`` (policy with grad, a slightly different reference without),
classifier-free guidance as one batch of 2B, ``DDIMScheduler.alphas_cumprod`` and the DDIM step log-prob of
DDPO's ``ddim_step_with_logprob`` (``dpojax.bench_torch.ddim_log_prob``, in float64), ``torch.clamp`` of the
ratio, D3PO's loss per timestep and ``(L_j / K).backward()`` accumulated over the K timesteps (docs/d3po.md).
JAX side: ``dpojax.train.d3po_step.d3po_gradients`` (one ``lax.scan`` over the timesteps, unrolled or rolled).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from flax import nnx
from helpers import (
    grads_as_torch,
    policy_and_nearby_reference,
    rel_err,
    unet_only_components,
)

from dpojax import parallel
from dpojax.bench_torch import ddim_log_prob
from dpojax.config import D3POConfig
from dpojax.losses import LN2
from dpojax.pipeline import TextConditioning
from dpojax.schedule import NoiseSchedule, ddim_prev_timesteps, ddim_timesteps
from dpojax.tiny import SCHEDULER, TEXT_HIDDEN
from dpojax.train.d3po_step import d3po_gradients

PAIRS, STEPS, LATENT = 3, 4, 8
D3PO = D3POConfig(num_steps=STEPS, eta=1.0, guidance_scale=5.0, beta=0.1, eps=0.1)
PREFERENCE = np.array([[1, -1], [-1, 1], [0, 0]], np.int32)  # A wins, B wins, a tie


@pytest.fixture(scope="module")
def models():
    # a nearby reference: some (pair, step) ratios inside the clamp band, some outside
    return policy_and_nearby_reference(3e-3)


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((PAIRS, 2, STEPS + 1, 4, LATENT, LATENT)).astype(np.float32)
    latents[:, 1, 0] = latents[:, 0, 0]  # both members start from the same x_T
    return {
        "latents": latents,
        "hidden": rng.standard_normal((PAIRS, 77, 2 * TEXT_HIDDEN)).astype(np.float32),
        "pooled": rng.standard_normal((PAIRS, TEXT_HIDDEN)).astype(np.float32),
        "time_ids": np.tile(np.array([[64, 64, 0, 0, 64, 64]], np.float32), (PAIRS, 1)),
        # each pair trains its own subset and order of steps (timestep_fraction 3/4)
        "positions": np.array([[3, 0, 1], [2, 1, 3], [0, 2, 3]], np.int32),
    }


def torch_d3po_grads(policy, reference, x):
    """Reference formula in PyTorch; returns ({name: grad}, mean loss over the K steps, inside-band fraction)."""
    sched = DDIMScheduler.from_config(SCHEDULER)
    sched.set_timesteps(STEPS)
    alphas = sched.alphas_cumprod.double()
    final = sched.final_alpha_cumprod.double()
    steps = sched.timesteps.long()
    latents = torch.from_numpy(x["latents"]).double()
    hidden, pooled = torch.from_numpy(x["hidden"]), torch.from_numpy(x["pooled"])
    time_ids = torch.from_numpy(x["time_ids"])
    h = torch.from_numpy(PREFERENCE).double()
    positions = torch.from_numpy(x["positions"]).long()
    num_positions = positions.shape[1]

    def guided(unet, sample, t):  # sample (P, 4, h, w), t (P,)
        uncond = {"text_embeds": torch.zeros_like(pooled), "time_ids": time_ids}
        out = unet(torch.cat([sample, sample]).float(), torch.cat([t, t]),
                   torch.cat([torch.zeros_like(hidden), hidden]),
                   added_cond_kwargs={k: torch.cat([uncond[k], v]) for k, v in
                                      {"text_embeds": pooled, "time_ids": time_ids}.items()}).sample.double()
        e_u, e_c = out.chunk(2)
        return e_u + 5.0 * (e_c - e_u)

    def log_prob(eps, sample, nxt, t):  # eta 1, per-dimension mean
        return ddim_log_prob(alphas, final, eps, t, t - 1000 // STEPS, sample, nxt, 1.0)

    policy.zero_grad()
    total, inside = 0.0, []
    rows = torch.arange(PAIRS)
    for j in range(num_positions):
        pos = positions[:, j]
        t = steps[pos]
        terms = []
        for m in range(2):
            sample, nxt = latents[rows, m, pos], latents[rows, m, pos + 1]
            with torch.no_grad():
                ref_lp = log_prob(guided(reference, sample, t), sample, nxt, t)
            lp = log_prob(guided(policy, sample, t), sample, nxt, t)
            ratio = torch.clamp(torch.exp(lp - ref_lp), 1 - 0.1, 1 + 0.1)
            inside.append(((lp - ref_lp).exp() >= 0.9) & ((lp - ref_lp).exp() <= 1.1))
            terms.append(h[:, m] * torch.log(ratio))
        loss = -torch.nn.functional.logsigmoid(0.1 * (terms[0] + terms[1])).mean()
        (loss / num_positions).backward()
        total += loss.item() / num_positions
    grads = {k: p.grad.numpy().copy() for k, p in policy.named_parameters() if p.grad is not None}
    return grads, total, torch.cat(inside).double().mean().item()


def jax_d3po(policy_split, reference_split, x, d3po=D3PO, gradient_mesh=None):
    graph, params = policy_split
    ref_graph, ref_params = reference_split
    components = unet_only_components(graph, ref_graph)
    cond = TextConditioning(jnp.asarray(x["hidden"]), jnp.asarray(x["pooled"]), jnp.asarray(x["time_ids"]))
    uncond = dataclasses.replace(cond, hidden_states=jnp.zeros_like(cond.hidden_states),
                                 text_embeds=jnp.zeros_like(cond.text_embeds))

    @jax.jit
    def run(p, rp):
        return d3po_gradients(components, d3po, p, {"reference": rp}, jnp.asarray(x["latents"]), cond, uncond,
                              jnp.asarray(PREFERENCE), jnp.asarray(x["positions"]), gradient_mesh)

    grads, metrics = run(params, ref_params)
    return grads, jax.device_get(metrics)


@pytest.mark.parametrize(("unroll", "per_device"), [(0, False), (1, False), (0, True)],
                         ids=["unrolled", "rolled-loop", "per-device"])
def test_gradient_matches_pytorch_reference_formula(models, inputs, unroll, per_device):
    """``per_device``: one pair on each of 3 devices, their gradients averaged by ``parallel.data_parallel``."""
    policy, reference, policy_split, reference_split = models
    torch_grads, torch_loss, torch_inside = torch_d3po_grads(policy, reference, inputs)
    mesh = parallel.make_mesh(data=PAIRS, fsdp=1, devices=jax.devices()[:PAIRS]) if per_device else None
    grads, metrics = jax_d3po(policy_split, reference_split, inputs, dataclasses.replace(D3PO, unroll=unroll), mesh)
    assert 0.1 < torch_inside < 0.95, f"the check needs ratios both inside and outside the band: {torch_inside}"
    assert float(metrics["inside_fraction"]) == pytest.approx(torch_inside)
    # The fp32 UNet outputs enter each log-prob divided by σ², small at the last steps, so the fp32 log-ratios
    # differ from float64 ones by ~1e-4 and the loss (β = 0.1 times them) by a few 1e-6 (measured 2.2e-6).
    assert float(metrics["loss"]) == pytest.approx(torch_loss, abs=1e-5)
    graph, _ = policy_split
    jax_grads = grads_as_torch(nnx.state(nnx.merge(graph, grads)))
    names = sorted(torch_grads)
    assert set(names) <= set(jax_grads)
    flat_torch = np.concatenate([torch_grads[k].ravel() for k in names])
    flat_jax = np.concatenate([jax_grads[k].ravel() for k in names])
    assert np.linalg.norm(flat_torch) > 0
    assert rel_err(flat_jax, flat_torch) < 1e-4
    # the worst single tensor, so a misplaced gradient cannot hide in the global norm
    assert max(rel_err(jax_grads[k], torch_grads[k]) for k in names if np.linalg.norm(torch_grads[k]) > 1e-6) < 1e-3


def test_loss_is_ln2_at_init(models, inputs):
    _, _, policy_split, _ = models
    grads, metrics = jax_d3po(policy_split, policy_split, inputs)
    assert float(metrics["loss"]) == pytest.approx(LN2, abs=1e-7)
    assert float(metrics["loss_minus_ln2"]) == pytest.approx(0.0, abs=1e-7)
    assert float(metrics["inside_fraction"]) == 1.0
    # the tie contributes nothing; the decisive pairs give a non-zero gradient −(β/2)·(∇ℓ_w − ∇ℓ_l) at init
    assert float(jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(grads)))) > 0


def test_timestep_indices_follow_the_schedule():
    schedule = NoiseSchedule.from_config(SCHEDULER)
    np.testing.assert_array_equal(ddim_timesteps(schedule, STEPS), [751, 501, 251, 1])
    np.testing.assert_array_equal(ddim_prev_timesteps(schedule, STEPS), [501, 251, 1, -249])
