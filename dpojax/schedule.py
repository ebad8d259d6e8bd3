"""Noise schedules and the DDIM step with its Gaussian log-probability, as pure fp32 functions.

The numbers follow diffusers' ``DDPMScheduler``/``DDIMScheduler`` (betas in float32, the same timestep
spacings, DDIM eq. 16 for σ_t), so a schedule read from a diffusers ``scheduler_config.json`` trains and
samples exactly like the PyTorch original. Timesteps ``t`` may be a scalar or one per sample (shape ``(B,)``);
every array argument has a leading batch axis.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
# Options that change the maths in ways this module does not implement; they must be off.
_MUST_BE_OFF = ("clip_sample", "thresholding", "rescale_betas_zero_snr")
# Floor on σ in the log-prob, so steps with σ ≈ 0 (the last step when set_alpha_to_one) stay finite.
MIN_LOG_PROB_SIGMA = 1e-6


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)  # holds arrays: identity, not value, equality
class NoiseSchedule:
    """ᾱ_t for every training timestep plus the static options that decide how they are used."""

    alphas_cumprod: jax.Array  # (num_train_timesteps,) float32
    final_alpha_cumprod: jax.Array  # () float32: ᾱ used when the DDIM step goes below t = 0
    prediction_type: str = dataclasses.field(default="epsilon", metadata={"static": True})
    timestep_spacing: str = dataclasses.field(default="leading", metadata={"static": True})
    steps_offset: int = dataclasses.field(default=0, metadata={"static": True})

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> NoiseSchedule:
        """Build from a diffusers scheduler config dict (any scheduler class: DDIM, PNDM, Euler, DDPM...).

        Missing keys take ``DDIMScheduler``'s defaults, except ``clip_sample`` which counts as off (Stable
        Diffusion pipelines force it off). Keys that only matter to other samplers are ignored.
        """
        for key in _MUST_BE_OFF:
            if config.get(key):
                raise ValueError(f"scheduler config: {key}={config[key]!r} is not supported (must be false)")
        if config.get("trained_betas") is not None:
            raise ValueError("scheduler config: trained_betas is not supported (must be null)")
        options = {"beta_schedule": ("linear", BETA_SCHEDULES),
                   "prediction_type": ("epsilon", PREDICTION_TYPES),
                   "timestep_spacing": ("leading", TIMESTEP_SPACINGS)}
        chosen = {}
        for key, (default, supported) in options.items():
            chosen[key] = config.get(key, default)
            if chosen[key] not in supported:
                raise ValueError(f"scheduler config: {key}={chosen[key]!r} is not supported "
                                 f"(choose one of {', '.join(supported)})")
        num = config.get("num_train_timesteps", 1000)
        if not isinstance(num, int) or isinstance(num, bool) or num < 1:
            raise ValueError(f"scheduler config: num_train_timesteps={num!r} must be a positive integer")
        steps_offset = config.get("steps_offset", 0)
        if not isinstance(steps_offset, int) or isinstance(steps_offset, bool) or steps_offset < 0:
            raise ValueError(f"scheduler config: steps_offset={steps_offset!r} must be an integer >= 0")
        betas = make_betas(chosen["beta_schedule"], num, config.get("beta_start", 0.0001),
                           config.get("beta_end", 0.02))
        alphas_cumprod = np.cumprod(np.float32(1.0) - betas, dtype=np.float32)
        final = np.float32(1.0) if config.get("set_alpha_to_one", True) else alphas_cumprod[0]
        return cls(jnp.asarray(alphas_cumprod), jnp.asarray(final, jnp.float32), chosen["prediction_type"],
                   chosen["timestep_spacing"], steps_offset)


def make_betas(beta_schedule: str, num_train_timesteps: int, beta_start: float, beta_end: float
               ) -> np.ndarray:
    """The β_t of diffusers' schedulers, float32."""
    if beta_schedule == "linear":
        return np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64).astype(np.float32)
    if beta_schedule == "scaled_linear":
        roots = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float64)
        return roots.astype(np.float32) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        # Nichol & Dhariwal's cosine ᾱ, discretised to β with β capped at 0.999 (in float64, then cast).
        def alpha_bar(s: np.ndarray) -> np.ndarray:
            return np.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        grid = np.arange(num_train_timesteps, dtype=np.float64)
        betas = 1 - alpha_bar((grid + 1) / num_train_timesteps) / alpha_bar(grid / num_train_timesteps)
        return np.minimum(betas, 0.999).astype(np.float32)
    raise ValueError(f"beta_schedule={beta_schedule!r} is not supported "
                     f"(choose one of {', '.join(BETA_SCHEDULES)})")


def _per_sample(values: jax.Array, ndim: int) -> jax.Array:
    """Reshape a scalar or per-sample ``(B,)`` coefficient to broadcast against a rank-``ndim`` batch."""
    values = jnp.asarray(values, jnp.float32)
    return values.reshape(values.shape + (1,) * (ndim - values.ndim)) if values.ndim else values


def _alpha_bar(schedule: NoiseSchedule, t, ndim: int) -> jax.Array:
    return _per_sample(schedule.alphas_cumprod[jnp.asarray(t)], ndim)


def _alpha_bar_prev(schedule: NoiseSchedule, t_prev, ndim: int) -> jax.Array:
    """ᾱ at the DDIM target timestep; below t = 0 it is ``final_alpha_cumprod``."""
    t_prev = jnp.asarray(t_prev)
    values = jnp.where(t_prev >= 0, schedule.alphas_cumprod[jnp.maximum(t_prev, 0)],
                       schedule.final_alpha_cumprod)
    return _per_sample(values, ndim)


def _f32(x: jax.Array) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def add_noise(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t) -> jax.Array:
    """x_t = sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·noise (the forward process), fp32."""
    a = _alpha_bar(schedule, t, jnp.ndim(x0))
    return jnp.sqrt(a) * _f32(x0) + jnp.sqrt(1 - a) * _f32(noise)


def velocity(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t) -> jax.Array:
    """v = sqrt(ᾱ_t)·noise − sqrt(1 − ᾱ_t)·x0, the v-prediction target, fp32."""
    a = _alpha_bar(schedule, t, jnp.ndim(x0))
    return jnp.sqrt(a) * _f32(noise) - jnp.sqrt(1 - a) * _f32(x0)


def training_target(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t) -> jax.Array:
    """What the denoiser is trained to output: the noise (epsilon) or v, per ``prediction_type``."""
    if schedule.prediction_type == "v_prediction":
        return velocity(schedule, x0, noise, t)
    return _f32(noise)


def _x0_and_eps(prediction_type: str, model_output: jax.Array, x_t: jax.Array, a: jax.Array):
    """The clean sample x̂0 and noise ε̂ a model prediction (epsilon or v) implies at ᾱ_t = ``a``."""
    if prediction_type == "v_prediction":
        x0 = jnp.sqrt(a) * x_t - jnp.sqrt(1 - a) * model_output
        return x0, jnp.sqrt(a) * model_output + jnp.sqrt(1 - a) * x_t
    return (x_t - jnp.sqrt(1 - a) * model_output) / jnp.sqrt(a), model_output


def ddim_timesteps(schedule: NoiseSchedule, num_steps: int) -> np.ndarray:
    """The descending sampling timesteps of ``DDIMScheduler.set_timesteps`` (int32, host array)."""
    n = schedule.num_train_timesteps
    if not 1 <= num_steps <= n:
        raise ValueError(f"num_steps={num_steps} must be between 1 and num_train_timesteps={n}")
    if schedule.timestep_spacing == "linspace":
        steps = np.linspace(0, n - 1, num_steps).round()[::-1]
    elif schedule.timestep_spacing == "leading":
        steps = (np.arange(num_steps) * (n // num_steps)).round()[::-1] + schedule.steps_offset
    else:  # trailing
        steps = np.round(np.arange(n, 0, -n / num_steps)) - 1
    steps = steps.astype(np.int32)
    if steps.max() >= n:
        raise ValueError(f"steps_offset={schedule.steps_offset} pushes timestep {steps.max()} past "
                         f"num_train_timesteps={n} at num_steps={num_steps}")
    return steps


def ddim_prev_timesteps(schedule: NoiseSchedule, num_steps: int) -> np.ndarray:
    """The target timestep of each DDIM step, t − num_train_timesteps // num_steps as diffusers computes it.

    Negative values mean "past the end" and select ``final_alpha_cumprod``. With "linspace"/"trailing" spacing
    this can differ from the next sampling timestep; diffusers does the same.
    """
    return ddim_timesteps(schedule, num_steps) - schedule.num_train_timesteps // num_steps


def ddim_step(schedule: NoiseSchedule, model_output: jax.Array, t, t_prev, x_t: jax.Array, eta, *,
              key: jax.Array | None = None, prev_sample: jax.Array | None = None
              ) -> tuple[jax.Array, jax.Array]:
    """One DDIM step t → t_prev with the log-probability of the result under the step's Gaussian.

    Either samples ``x_prev = μ + σ·z`` (``key`` given), or scores a given ``prev_sample`` (D3PO/DDPO
    training). With neither, ``eta`` must be the number 0 and the deterministic mean is returned.
    Returns ``(prev_sample, log_prob)``: fp32 ``prev_sample`` and per-sample ``log_prob`` of shape ``(B,)``,
    the MEAN over all non-batch dims of log N(prev_sample; μ, σ²) (per-dimension units, as DDPO/D3PO use),
    with no gradient through ``prev_sample`` and σ floored at ``MIN_LOG_PROB_SIGMA``. When ``eta == 0`` the
    step has no density and ``log_prob`` is NaN.
    """
    if key is not None and prev_sample is not None:
        raise ValueError("ddim_step: pass key (to sample) or prev_sample (to score), not both")
    if key is None and prev_sample is None and not (isinstance(eta, int | float) and eta == 0):
        raise ValueError(f"ddim_step: eta={eta!r} needs a key to sample or a prev_sample to score")
    x_t = _f32(x_t)
    a_t = _alpha_bar(schedule, t, x_t.ndim)
    a_prev = _alpha_bar_prev(schedule, t_prev, x_t.ndim)
    x0, eps = _x0_and_eps(schedule.prediction_type, _f32(model_output), x_t, a_t)
    sigma = _f32(eta) * jnp.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))  # DDIM eq. 16
    mean = jnp.sqrt(a_prev) * x0 + jnp.sqrt(jnp.maximum(1 - a_prev - sigma**2, 0.0)) * eps
    if prev_sample is None:
        prev_sample = mean if key is None else mean + sigma * jax.random.normal(key, x_t.shape, jnp.float32)
    prev_sample = _f32(prev_sample)
    return prev_sample, gaussian_log_prob(prev_sample, mean, sigma, eta)


def gaussian_log_prob(sample: jax.Array, mean: jax.Array, sigma: jax.Array, eta) -> jax.Array:
    """Per-sample mean over non-batch dims of log N(sg(sample); mean, σ²); NaN where ``eta == 0``."""
    sigma = jnp.maximum(sigma, MIN_LOG_PROB_SIGMA)
    per_dim = (-(jax.lax.stop_gradient(sample) - mean) ** 2 / (2 * sigma**2)
               - jnp.log(sigma) - 0.5 * math.log(2 * math.pi))
    log_prob = jnp.mean(per_dim, axis=tuple(range(1, per_dim.ndim)))
    return jnp.where(_f32(eta) > 0, log_prob, jnp.nan)


def classifier_free_guidance(eps_uncond: jax.Array, eps_cond: jax.Array, scale) -> jax.Array:
    """ε̂ = ε(∅) + w·(ε(c) − ε(∅)); works for v-predictions too (the guidance is linear)."""
    return eps_uncond + scale * (eps_cond - eps_uncond)
