"""The D3PO sampler on the tiny SDXL pipeline over 8 fake devices: pair structure and log-probs.

The log-probs recorded while sampling must be reproduced by re-scoring the stored transitions (what the
training step does) and must equal the Gaussian log-density computed independently in NumPy/SciPy from the
guided noise prediction and diffusers' ``DDIMScheduler`` coefficients (docs/d3po.md).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from diffusers import DDIMScheduler
from flax import nnx
from scipy.stats import norm

from dpojax import parallel
from dpojax.config import load_config
from dpojax.pipeline import guided_predictor
from dpojax.schedule import ddim_prev_timesteps, ddim_timesteps
from dpojax.tiny import SCHEDULER
from dpojax.train.d3po_step import guidance_conditioning, make_sampler, text_inputs, transition_log_probs
from dpojax.train.harness import Setup

STEPS = 4
PROMPTS = ["a cat", "a dog", "a red barn", "a lighthouse", "a bowl of fruit", "a forest", "a boat", "a tree"]


@pytest.fixture(scope="module")
def sampled(tiny_sdxl):
    config = load_config(None, ["objective=d3po", f"model.pretrained={tiny_sdxl}", "model.dtype=float32",
                                "model.reference_dtype=float32", "d3po.resolution=32", f"d3po.num_steps={STEPS}",
                                "d3po.prompts=[a cat]"])
    setup = Setup.build(config)
    components, params, frozen = setup.components, setup.params, setup.frozen
    sampler = make_sampler(setup, group_size=2)
    text = text_inputs(components, PROMPTS, 32)
    out = sampler(params, frozen, parallel.global_batch(text, setup.mesh), jax.random.key(0))
    return config, components, params, frozen, text, jax.device_get(out)


def test_pairs_share_prompt_and_start_noise_but_not_step_noise(sampled):
    *_, out = sampled
    latents = out["latents"].reshape(len(PROMPTS), 2, STEPS + 1, 4, 16, 16)
    assert out["images"].shape == (2 * len(PROMPTS), 32, 32, 3) and out["images"].dtype == np.uint8
    np.testing.assert_array_equal(latents[:, 0, 0], latents[:, 1, 0])  # the same x_T
    assert np.all(np.abs(latents[:, 0, 1] - latents[:, 1, 1]).mean(axis=(1, 2, 3)) > 1e-2)  # then they part
    assert np.all(np.abs(latents[1:, 0, 0] - latents[:-1, 0, 0]).mean(axis=(1, 2, 3)) > 0.5)  # x_T per prompt
    assert out["log_probs"].shape == (2 * len(PROMPTS), STEPS) and out["log_probs"].dtype == np.float32


def test_rescoring_reproduces_sampling_log_probs(sampled):
    config, components, params, frozen, text, out = sampled
    cond, uncond = guidance_conditioning(components, frozen, jax.tree.map(jnp.asarray, text), 5.0)
    pair = lambda c: jax.tree.map(lambda a: jnp.repeat(a, 2, axis=0), c)  # noqa: E731
    timesteps = ddim_timesteps(components.schedule, STEPS)
    prev = ddim_prev_timesteps(components.schedule, STEPS)
    rows = 2 * len(PROMPTS)

    @jax.jit
    def rescore(p, x, x_next, t, t_prev):  # per-sample timesteps, as the training step passes them
        return transition_log_probs(nnx.merge(components.unet, p), components, config.d3po, pair(cond),
                                    pair(uncond), x, x_next, t, t_prev)

    for j in range(STEPS):
        t, t_prev = jnp.full((rows,), timesteps[j]), jnp.full((rows,), prev[j])
        rescored = rescore(params, jnp.asarray(out["latents"][:, j]), jnp.asarray(out["latents"][:, j + 1]),
                           t, t_prev)
        np.testing.assert_allclose(np.asarray(rescored), out["log_probs"][:, j], rtol=0, atol=1e-5)


def test_log_probs_equal_scipy_gaussian_density(sampled):
    """Step 0 and the last step (σ smallest), from the guided ε̂ with diffusers' DDIM coefficients in float64."""
    config, components, params, frozen, text, out = sampled
    cond, uncond = guidance_conditioning(components, frozen, jax.tree.map(jnp.asarray, text), 5.0)
    pair = lambda c: jax.tree.map(lambda a: jnp.repeat(a, 2, axis=0), c)  # noqa: E731
    predict = jax.jit(lambda p, x, t: guided_predictor(nnx.merge(components.unet, p), pair(cond), pair(uncond),
                                                       5.0)(x, t))
    scheduler = DDIMScheduler.from_config(SCHEDULER)
    scheduler.set_timesteps(STEPS)
    alphas = scheduler.alphas_cumprod.double().numpy()
    for j in (0, STEPS - 1):
        t = int(scheduler.timesteps[j])
        t_prev = t - 1000 // STEPS
        x, x_next = out["latents"][:, j].astype(np.float64), out["latents"][:, j + 1].astype(np.float64)
        eps = np.asarray(predict(params, jnp.asarray(out["latents"][:, j]), jnp.int32(t)), np.float64)
        a_t = alphas[t]
        a_prev = alphas[t_prev] if t_prev >= 0 else float(scheduler.final_alpha_cumprod)
        x0 = (x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
        var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        mean = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev - var) * eps
        expected = norm.logpdf(x_next, loc=mean, scale=np.sqrt(var)).mean(axis=(1, 2, 3))
        np.testing.assert_allclose(out["log_probs"][:, j], expected, rtol=0, atol=2e-5)
