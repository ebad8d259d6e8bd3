"""The jitted Diffusion-DPO training step, built from pure functions of (graph, params) pairs.

One micro-batch of B pairs goes through: VAE encoding of the 2B images (a posterior *sample* times the
scaling factor, no gradient), the frozen text encoders, one noise and one timestep per pair shared by winner
and loser, the policy forward and backward pass and the reference forward pass (``stop_gradient``) on all 2B
noisy latents, and ``losses.pair_loss`` in fp32 (docs/losses.md).

Layout: inside the step images are *pair-interleaved*, ``[w0, l0, w1, l1, ...]``, so a device holding pair i
holds both of its images and the batch sharding never splits a pair; the per-sample errors are reordered to
the ``[winners; losers]`` layout of ``dpojax.losses`` only as (2B,) vectors. Winners-only losses (SFT) encode
and denoise the B winners alone, and reference-free ones skip the reference UNet.

Gradient accumulation: ``accumulate`` adds a micro-batch's gradient into a buffer (not checkpointed:
checkpoints are taken between optimizer steps, when it is zero); ``update`` adds the last one, averages,
clips and applies the optimizer. With ``dpo.grad_accum == 1`` only ``update`` exists and takes no buffer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dpojax import losses, parallel
from dpojax import schedule as sched
from dpojax.components import Components, policy_unet_params, shardings_of
from dpojax.config import LossConfig
from dpojax.models.vae import DiagonalGaussian
from dpojax.pipeline import TextConditioning, encode_text
from dpojax.train.harness import Setup
from dpojax.train.state import TrainState


def winners_first(x: jax.Array) -> jax.Array:
    """(2B,) pair-interleaved ``[w0, l0, w1, l1, ...]`` → ``[winners; losers]``."""
    return x.reshape(-1, 2).T.reshape(-1)


def text_conditioning(components: Components, frozen: dict, input_ids: jax.Array,
                      input_ids_2: jax.Array | None) -> TextConditioning:
    """Encode token ids with the frozen text encoders (``dpojax.pipeline.encode_text``); SDXL's ``time_ids``
    come from the batch and are added by the caller."""
    encoder = nnx.merge(components.text_encoder, frozen["text_encoder"])
    encoder_2 = nnx.merge(components.text_encoder_2, frozen["text_encoder_2"]) if components.is_sdxl else None
    return encode_text(encoder, encoder_2, input_ids, input_ids_2 if components.is_sdxl else None)


def unet_latents(components: Components, posterior: DiagonalGaussian, key: jax.Array) -> jax.Array:
    """A draw from the VAE posterior, as fp32 latents in the UNet's scale (shift, then scale, as diffusers)."""
    latents = posterior.sample(key).astype(jnp.float32)
    if components.vae_shift_factor is not None:
        latents = latents - components.vae_shift_factor
    return latents * components.vae_scaling_factor


def encode_images(components: Components, vae_params: dict, images: jax.Array, key: jax.Array) -> jax.Array:
    """NHWC pixels in [-1, 1] → fp32 NCHW latents in the UNet's scale (a sample of the posterior)."""
    vae = nnx.merge(components.vae, vae_params)
    pixels = jnp.transpose(images, (0, 3, 1, 2)).astype(components.compute_dtype)
    return unet_latents(components, vae.encode(pixels), key)


def denoiser_mse(graph: nnx.GraphDef, params: dict, components: Components, noisy: jax.Array,
                 timesteps: jax.Array, target: jax.Array, cond: TextConditioning) -> jax.Array:
    """Per-image mean squared error of one UNet's prediction against the training target, fp32."""
    unet = nnx.merge(graph, params)
    dtype = components.compute_dtype
    added = cond.added_cond_kwargs()
    if added is not None:
        added = {k: v.astype(dtype) for k, v in added.items()}
    pred = unet(noisy.astype(dtype), timesteps, cond.hidden_states.astype(dtype), added_cond_kwargs=added)
    return losses.per_sample_mse(pred, target)


def preference_objective(components: Components, loss_config: LossConfig, params: dict,
                         reference_params: dict | None, latents: jax.Array, noise: jax.Array,
                         timesteps: jax.Array, cond: TextConditioning) -> tuple[jax.Array, dict]:
    """The loss of fixed latents, noise, timesteps and conditioning, as a function of the policy ``params``.

    Every argument holds one row per image: pair-interleaved for pair losses, the winners for
    winners-only ones. Returns ``(loss, metrics)`` from ``losses.pair_loss``.
    """
    schedule = components.schedule
    noisy = sched.add_noise(schedule, latents, noise, timesteps)
    target = sched.training_target(schedule, latents, noise, timesteps)
    model_mse = denoiser_mse(components.unet, params, components, noisy, timesteps, target, cond)
    if loss_config.type in losses.WINNERS_ONLY_LOSSES:
        return losses.pair_loss(loss_config.type, model_mse, beta=loss_config.beta)
    ref_mse = None
    if loss_config.type not in losses.REFERENCE_FREE_LOSSES:
        ref_mse = jax.lax.stop_gradient(denoiser_mse(components.reference, reference_params, components,
                                                     noisy, timesteps, target, cond))
        ref_mse = winners_first(ref_mse)
    return losses.pair_loss(loss_config.type, winners_first(model_mse), ref_mse, beta=loss_config.beta,
                            label_smoothing=loss_config.label_smoothing, mapo_beta=loss_config.mapo_beta,
                            mapo_temperature=loss_config.mapo_temperature)


def micro_batch_inputs(components: Components, frozen: dict, batch: dict, key: jax.Array,
                       images_per_pair: int) -> tuple[jax.Array, jax.Array, jax.Array, TextConditioning]:
    """(latents, noise, timesteps, conditioning) for a device batch, one row per image, pair-interleaved.

    Noise and timestep are drawn once per pair and repeated for its images; so is the text conditioning.
    """
    vae_key, noise_key, t_key = jax.random.split(key, 3)
    if "latent_mean" in batch:  # a `dpojax data encode` cache: stored posterior moments and text encodings
        moments = [batch[k][:, :images_per_pair] for k in ("latent_mean", "latent_logvar")]
        moments = jnp.concatenate([m.reshape((-1,) + m.shape[2:]) for m in moments], axis=1)
        latents = unet_latents(components, DiagonalGaussian.from_moments(moments), vae_key)
        cond = TextConditioning(batch["hidden"], batch.get("pooled"))
    else:
        pixels = batch["pixels"][:, :images_per_pair]
        latents = encode_images(components, frozen["vae"], pixels.reshape((-1,) + pixels.shape[2:]), vae_key)
        cond = text_conditioning(components, frozen, batch["input_ids"], batch.get("input_ids_2"))
    num_pairs = latents.shape[0] // images_per_pair
    noise = jax.random.normal(noise_key, (num_pairs,) + latents.shape[1:], jnp.float32)
    timesteps = jax.random.randint(t_key, (num_pairs,), 0, components.schedule.num_train_timesteps)
    cond = jax.tree.map(lambda x: jnp.repeat(x, images_per_pair, axis=0), cond)
    if components.is_sdxl:  # per image: the two images of a pair may differ in size and crop
        time_ids = batch["time_ids"][:, :images_per_pair]
        cond = dataclasses.replace(cond, time_ids=time_ids.reshape(-1, time_ids.shape[-1]))
    repeat = lambda x: jnp.repeat(x, images_per_pair, axis=0)  # noqa: E731
    return jax.lax.stop_gradient(latents), repeat(noise), repeat(timesteps), jax.lax.stop_gradient(cond)


@dataclasses.dataclass(frozen=True)
class StepFunctions:
    """The compiled step. ``update(state, accum, frozen, batch, micro) -> (state, accum, metrics)``;
    ``accumulate(state, accum, frozen, batch, micro) -> (accum, metrics)`` (None when grad_accum == 1);
    ``zeros_accum(params) -> accum`` (fp32 zeros shaped like the parameters)."""

    update: Callable
    accumulate: Callable | None
    zeros_accum: Callable | None


def make_step_functions(setup: Setup) -> StepFunctions:
    """Jit the step over the setup's mesh with explicit shardings; state and accumulator buffers are donated."""
    components, config, tx, lr_schedule = setup.components, setup.config, setup.tx, setup.lr_schedule
    state_shardings, frozen_shardings = setup.shardings, shardings_of(setup.frozen)
    loss_config = config.loss
    images_per_pair = 1 if loss_config.type in losses.WINNERS_ONLY_LOSSES else 2
    grad_accum = config.dpo.grad_accum
    nan_step = config.train.debug_nan_at_step
    replicated, batch_sharding, gradient_mesh = setup.replicated, setup.batch_sharding, setup.gradient_mesh

    def loss_gradients(params, frozen, step, latents, noise, timesteps, cond):
        def loss_fn(params):
            policy = policy_unet_params(components, params, frozen)  # with LoRA: base weights + adapters
            loss, metrics = preference_objective(components, loss_config, policy, frozen.get("reference"),
                                                 latents, noise, timesteps, cond)
            loss = poisoned(loss, step, nan_step)  # test hook: exercises the non-finite-loss stop
            return loss, {**metrics, "loss": loss}

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return grads, metrics, ()

    def gradients(state: TrainState, frozen: dict, batch: dict, micro: jax.Array):
        key = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step), micro)
        rows = micro_batch_inputs(components, frozen, batch, key, images_per_pair)
        grads, metrics, _ = parallel.data_parallel(loss_gradients, gradient_mesh, (state.params, frozen, state.step),
                                                   rows)
        return grads, metrics

    def update(state: TrainState, accum: Any, frozen: dict, batch: dict, micro: jax.Array):
        grads, metrics = gradients(state, frozen, batch, micro)
        if accum is not None:
            grads = jax.tree.map(lambda a, g: (a + g) / grad_accum, accum, grads)
            accum = jax.tree.map(jnp.zeros_like, accum)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {**metrics, "grad_norm": optax.tree.norm(grads), "lr": lr_schedule(state.step)}
        return TrainState(state.step + 1, params, opt_state, state.key), accum, metrics

    def accumulate(state: TrainState, accum: Any, frozen: dict, batch: dict, micro: jax.Array):
        grads, metrics = gradients(state, frozen, batch, micro)
        return jax.tree.map(jnp.add, accum, grads), metrics

    accum_shardings = state_shardings.params if grad_accum > 1 else None
    in_shardings = (state_shardings, accum_shardings, frozen_shardings, batch_sharding, replicated)
    update_fn = jax.jit(update, in_shardings=in_shardings,
                        out_shardings=(state_shardings, accum_shardings, replicated), donate_argnums=(0, 1))
    if grad_accum == 1:
        return StepFunctions(update_fn, None, None)
    accumulate_fn = jax.jit(accumulate, in_shardings=in_shardings, out_shardings=(accum_shardings, replicated),
                            donate_argnums=(1,))

    def zeros_accum(params):
        return jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)

    zeros_fn = jax.jit(zeros_accum, in_shardings=(state_shardings.params,), out_shardings=accum_shardings)
    return StepFunctions(update_fn, accumulate_fn, zeros_fn)


def host_batch(components: Components, batch: dict) -> dict[str, np.ndarray]:
    """A loader batch → the arrays the step takes (captions become token ids; cached arrays pass as they are)."""
    if "latent_mean" in batch:
        return {k: np.asarray(v, np.float32) for k, v in batch.items()}
    out = {"pixels": np.asarray(batch["pixels"], np.float32), **components.folder.token_ids(batch["captions"])}
    if components.is_sdxl:
        out["time_ids"] = np.asarray(batch["time_ids"], np.float32)
    return out


def poisoned(loss: jax.Array, step: jax.Array, nan_step: int) -> jax.Array:
    """``train.debug_nan_at_step``: the loss (and so the update) of that optimizer step becomes NaN."""
    return loss * jnp.where(step + 1 == nan_step, jnp.nan, 1.0) if nan_step else loss
