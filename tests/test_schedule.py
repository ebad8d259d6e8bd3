"""Schedules and the DDIM step against diffusers' PyTorch schedulers and an independent SciPy closed form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from dpojax import schedule as S

SD_CONFIG = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False,
             "steps_offset": 1, "prediction_type": "epsilon"}
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def _config(**overrides):
    return {**SD_CONFIG, **overrides}


def _randn(seed, shape=(3, 4, 5, 6)):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _predicted_x0_and_eps(schedule, model_output, x_t, t):
    """The clean sample x̂0 and noise ε̂ a model prediction (epsilon or v) implies: the inversion ``ddim_step``
    makes, fp32."""
    a = S._alpha_bar(schedule, t, jnp.ndim(x_t))
    return S._x0_and_eps(schedule.prediction_type, jnp.asarray(model_output, jnp.float32),
                         jnp.asarray(x_t, jnp.float32), a)


@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
def test_add_noise_and_velocity_match_ddpm(beta_schedule):
    config = _config(beta_schedule=beta_schedule)
    ours, theirs = S.NoiseSchedule.from_config(config), DDPMScheduler.from_config(config)
    np.testing.assert_allclose(ours.alphas_cumprod, theirs.alphas_cumprod.numpy(), rtol=1e-6, atol=1e-7)
    x0, noise = _randn(0), _randn(1)
    t = np.array([0, 417, 999])
    tx0, tnoise, tt = torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)
    np.testing.assert_allclose(S.add_noise(ours, x0, noise, t), theirs.add_noise(tx0, tnoise, tt).numpy(),
                               atol=1e-5)
    np.testing.assert_allclose(S.velocity(ours, x0, noise, t), theirs.get_velocity(tx0, tnoise, tt).numpy(),
                               atol=1e-5)
    # A scalar timestep broadcasts over the batch.
    np.testing.assert_allclose(S.add_noise(ours, x0, noise, 417),
                               theirs.add_noise(tx0, tnoise, torch.tensor([417] * 3)).numpy(), atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_training_target_and_its_inversion(prediction_type):
    sched = S.NoiseSchedule.from_config(_config(prediction_type=prediction_type))
    x0, noise, t = _randn(2), _randn(3), np.array([5, 500, 990])
    target = S.training_target(sched, x0, noise, t)
    expected = S.velocity(sched, x0, noise, t) if prediction_type == "v_prediction" else noise
    np.testing.assert_allclose(target, expected, atol=1e-6)
    # A perfect prediction recovers the clean sample and the noise.
    x0_hat, eps_hat = _predicted_x0_and_eps(sched, target, S.add_noise(sched, x0, noise, t), t)
    np.testing.assert_allclose(x0_hat, x0, atol=1e-3)
    np.testing.assert_allclose(eps_hat, noise, atol=1e-4)


@pytest.mark.parametrize("spacing", S.TIMESTEP_SPACINGS)
@pytest.mark.parametrize("num_steps", [1, 7, 20, 50, 333])
def test_ddim_timesteps_match_diffusers(spacing, num_steps):
    config = _config(timestep_spacing=spacing)
    theirs = DDIMScheduler.from_config(config)
    theirs.set_timesteps(num_steps)
    ours = S.NoiseSchedule.from_config(config)
    np.testing.assert_array_equal(S.ddim_timesteps(ours, num_steps), theirs.timesteps.numpy())
    np.testing.assert_array_equal(S.ddim_prev_timesteps(ours, num_steps),
                                  theirs.timesteps.numpy() - 1000 // num_steps)


def test_sd15_d3po_timesteps():
    sched = S.NoiseSchedule.from_config(SD_CONFIG)
    np.testing.assert_array_equal(S.ddim_timesteps(sched, 20), np.arange(951, 0, -50))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("set_alpha_to_one", [False, True])
def test_ddim_step_matches_diffusers(prediction_type, eta, set_alpha_to_one):
    config = _config(prediction_type=prediction_type, set_alpha_to_one=set_alpha_to_one)
    theirs = DDIMScheduler.from_config(config)
    theirs.set_timesteps(10)
    ours = S.NoiseSchedule.from_config(config)
    ts, prevs = S.ddim_timesteps(ours, 10), S.ddim_prev_timesteps(ours, 10)
    x_t, model_output = _randn(4), _randn(5)
    for i in (0, 4, 9):  # first, middle, and the last step (t_prev < 0 uses final_alpha_cumprod)
        key = jax.random.key(i)
        z = np.asarray(jax.random.normal(key, x_t.shape, jnp.float32))
        expected = theirs.step(torch.from_numpy(model_output), int(ts[i]), torch.from_numpy(x_t), eta=eta,
                               variance_noise=torch.from_numpy(z.copy())).prev_sample.numpy()
        got, _ = S.ddim_step(ours, model_output, ts[i], prevs[i], x_t, eta, key=key)
        np.testing.assert_allclose(got, expected, atol=1e-5)
        if eta == 0:  # deterministic DDIM needs no key
            deterministic, _ = S.ddim_step(ours, model_output, ts[i], prevs[i], x_t, 0.0)
            np.testing.assert_allclose(deterministic, expected, atol=1e-5)


def _independent_sigma(sched_config, t, t_prev, eta):
    """σ of DDIM eq. 16 in float64 from diffusers' alphas (not from dpojax)."""
    alphas = DDIMScheduler.from_config(sched_config).alphas_cumprod.numpy().astype(np.float64)
    a_t = alphas[t]
    a_prev = np.where(t_prev >= 0, alphas[np.maximum(t_prev, 0)], 1.0 if sched_config["set_alpha_to_one"]
                      else alphas[0])
    return a_t, a_prev, eta * np.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_log_prob_matches_scipy(prediction_type):
    config = _config(prediction_type=prediction_type)
    sched = S.NoiseSchedule.from_config(config)
    t, t_prev, eta = np.array([951, 51, 1]), np.array([901, 1, -49]), 0.7
    x_t, out = _randn(6), _randn(7)
    a_t, a_prev, sigma = (v.reshape(-1, 1, 1, 1) for v in _independent_sigma(config, t, t_prev, eta))
    x_t64, out64 = x_t.astype(np.float64), out.astype(np.float64)
    if prediction_type == "epsilon":
        eps = out64
        x0 = (x_t64 - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
    else:
        x0 = np.sqrt(a_t) * x_t64 - np.sqrt(1 - a_t) * out64
        eps = np.sqrt(a_t) * out64 + np.sqrt(1 - a_t) * x_t64
    mean = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev - sigma**2) * eps
    # Score a point about 2σ off the mean, as a sampled step (or the other branch of a D3PO pair) would be.
    x_prev = (mean + 2 * sigma * _randn(8)).astype(np.float32)
    _, log_prob = S.ddim_step(sched, out, t, t_prev, x_t, eta, prev_sample=x_prev)
    expected = scipy.stats.norm.logpdf(x_prev, loc=mean, scale=sigma).mean(axis=(1, 2, 3))
    # fp32 rounding of μ, divided by σ ≈ 0.02 at the last step, allows ~2e-5 absolute.
    np.testing.assert_allclose(log_prob, expected, rtol=1e-5, atol=5e-5)


def test_log_prob_of_own_sample_at_the_last_step_is_finite():
    sched = S.NoiseSchedule.from_config(_config(set_alpha_to_one=True))  # σ = 0 at the last step: floored
    x_prev, log_prob = S.ddim_step(sched, _randn(1), 1, -99, _randn(2), 1.0, key=jax.random.key(0))
    assert np.all(np.isfinite(x_prev)) and np.all(np.isfinite(log_prob))


def test_log_prob_gradient_flows_only_through_the_mean():
    sched = S.NoiseSchedule.from_config(SD_CONFIG)
    x_t, out, x_prev = _randn(9), _randn(10), _randn(11)

    def total(out, x_prev):
        return S.ddim_step(sched, out, 501, 451, x_t, 1.0, prev_sample=x_prev)[1].sum()

    d_out, d_prev = jax.grad(total, argnums=(0, 1))(out, x_prev)
    assert np.all(np.asarray(d_prev) == 0)
    assert np.abs(np.asarray(d_out)).min() > 0


def test_eta_zero_has_no_log_prob_and_eta_positive_needs_noise():
    sched = S.NoiseSchedule.from_config(SD_CONFIG)
    _, log_prob = S.ddim_step(sched, _randn(1), 501, 451, _randn(2), 0.0)
    assert np.all(np.isnan(log_prob))
    with pytest.raises(ValueError, match="eta=1.0 needs a key"):
        S.ddim_step(sched, _randn(1), 501, 451, _randn(2), 1.0)
    with pytest.raises(ValueError, match="not both"):
        S.ddim_step(sched, _randn(1), 501, 451, _randn(2), 1.0, key=jax.random.key(0), prev_sample=_randn(3))


def test_ddim_step_jits_with_traced_timesteps_and_eta():
    sched = S.NoiseSchedule.from_config(SD_CONFIG)
    x_t, out = _randn(1), _randn(2)
    step = jax.jit(lambda s, t, tp, eta, key: S.ddim_step(s, out, t, tp, x_t, eta, key=key))
    eager = S.ddim_step(sched, out, 951, 901, x_t, 1.0, key=jax.random.key(3))
    jitted = step(sched, jnp.int32(951), jnp.int32(901), jnp.float32(1.0), jax.random.key(3))
    np.testing.assert_allclose(jitted[0], eager[0], atol=1e-6)
    np.testing.assert_allclose(jitted[1], eager[1], rtol=1e-6)


def test_classifier_free_guidance():
    u, c = _randn(1), _randn(2)
    np.testing.assert_allclose(S.classifier_free_guidance(u, c, 5.0), u + 5.0 * (c - u), atol=1e-6)
    np.testing.assert_allclose(S.classifier_free_guidance(u, c, 1.0), c, atol=1e-6)


@pytest.mark.parametrize("override, culprit", [
    ({"beta_schedule": "sigmoid"}, "beta_schedule='sigmoid'"),
    ({"prediction_type": "sample"}, "prediction_type='sample'"),
    ({"timestep_spacing": "karras"}, "timestep_spacing='karras'"),
    ({"clip_sample": True}, "clip_sample=True"),
    ({"thresholding": True}, "thresholding=True"),
    ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr=True"),
    ({"trained_betas": [0.1, 0.2]}, "trained_betas"),
    ({"num_train_timesteps": 0}, "num_train_timesteps=0"),
])
def test_unsupported_config_names_the_key(override, culprit):
    with pytest.raises(ValueError, match=culprit.replace("(", r"\(")):
        S.NoiseSchedule.from_config(_config(**override))


def test_real_world_configs_load():
    """SD1.5 ships a PNDM config and SDXL an Euler one; their extra keys are irrelevant to DDIM."""
    sd15 = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False,
            "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False}
    sdxl = {**sd15, "_class_name": "EulerDiscreteScheduler", "interpolation_type": "linear",
            "sample_max_value": 1.0, "timestep_spacing": "leading", "use_karras_sigmas": False}
    for config in (sd15, sdxl):
        sched = S.NoiseSchedule.from_config(config)
        assert sched.prediction_type == "epsilon" and float(sched.final_alpha_cumprod) < 1


def test_bad_num_steps():
    sched = S.NoiseSchedule.from_config(SD_CONFIG)
    with pytest.raises(ValueError, match="num_steps=0"):
        S.ddim_timesteps(sched, 0)
    with pytest.raises(ValueError, match="steps_offset=1 pushes timestep 1000"):
        S.ddim_timesteps(sched, 1000)
