"""The jitted D3PO programs: the group sampler and the training step on stored transitions.

Sampler (docs/d3po.md): G prompts, each sampled k times from ONE starting noise x_T with
independent per-step noise, by ``pipeline.ddim_loop`` under ``lax.scan`` with classifier-free guidance against
the empty prompt. It records every state x_t and the per-step log-probs (fp32, per-dimension mean) and
decodes x_0 to uint8 images, in one program sharded over the batch mesh axes. Rows are group-major
``[g0m0, g0m1, ..., g1m0, ...]``, so a device holds whole groups.

Training step: P pairs of stored trajectories with preferences h (P, 2); K = int(T·timestep_fraction)
denoising steps per pair, one random subset per pair shared by both members. ``lax.scan`` over the K positions
takes value_and_grad of the D3PO loss at each and sums the gradients, so only one timestep's graph is alive
at a time (D3PO's backward per timestep; ``model.remat`` checkpoints each UNet layer inside it), and their mean
makes one optimizer step, all in one jitted call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from dpojax import losses, parallel
from dpojax import schedule as sched
from dpojax.components import Components, policy_unet_params, shardings_of
from dpojax.config import D3POConfig
from dpojax.pipeline import TextConditioning, ddim_loop, decode_to_uint8, guided_predictor, sdxl_time_ids
from dpojax.train.dpo_step import poisoned, text_conditioning
from dpojax.train.harness import Setup
from dpojax.train.state import TrainState

TRAIN_STREAM = 1  # fold_in tag of the training step's randomness (the timestep subsets)


def text_inputs(components: Components, prompts: list[str], size: int) -> dict[str, np.ndarray]:
    """Host arrays the programs take for ``prompts`` of square ``size``-pixel images: token ids (and SDXL's
    size ids)."""
    out = components.folder.token_ids(prompts)
    if components.is_sdxl:
        out["time_ids"] = sdxl_time_ids(size, size, len(prompts))
    return out


def text_shapes(components: Components, prompts: int) -> dict[str, tuple[tuple[int, ...], object]]:
    """``{name: (shape, dtype)}`` of ``text_inputs`` for that many prompts."""
    tokens = components.folder.component_config("text_encoder").get("max_position_embeddings", 77)
    shapes = {"input_ids": ((prompts, tokens), jnp.int32)}
    if components.is_sdxl:
        shapes.update(input_ids_2=((prompts, tokens), jnp.int32), time_ids=((prompts, 6), jnp.float32))
    return shapes


def guidance_conditioning(components: Components, frozen: dict, text: dict, guidance_scale: float
                          ) -> tuple[TextConditioning, TextConditioning | None]:
    """(prompt conditioning, negative conditioning or None without guidance), one row per prompt.

    The negative is zeros where the folder says force_zeros_for_empty_prompt (SDXL's default), else the
    encoded empty prompt, as ``Pipeline.encode_negative`` makes it.
    """
    cond = text_conditioning(components, frozen, text["input_ids"], text.get("input_ids_2"))
    if components.is_sdxl:
        cond = dataclasses.replace(cond, time_ids=text["time_ids"])
    cond = dataclasses.replace(cond, hidden_states=cond.hidden_states.astype(components.compute_dtype))
    if guidance_scale <= 1:
        return cond, None
    if components.folder.force_zeros_for_empty_prompt:
        return cond, dataclasses.replace(cond, hidden_states=jnp.zeros_like(cond.hidden_states),
                                         text_embeds=jnp.zeros_like(cond.text_embeds))
    empty_ids = {k: jnp.asarray(v) for k, v in components.folder.token_ids([""]).items()}
    empty = text_conditioning(components, frozen, empty_ids["input_ids"], empty_ids.get("input_ids_2"))
    rows = cond.hidden_states.shape[0]
    empty = jax.tree.map(lambda x: jnp.broadcast_to(x, (rows, *x.shape[1:])), empty)
    return cond, dataclasses.replace(cond, hidden_states=empty.hidden_states.astype(cond.hidden_states.dtype),
                                     text_embeds=empty.text_embeds)


def _repeat_rows(tree, times: int):
    return jax.tree.map(lambda a: jnp.repeat(a, times, axis=0), tree)


def sample_groups(components: Components, d3po: D3POConfig, params: dict, frozen: dict, text: dict,
                  key: jax.Array, group_size: int, latent_hw: tuple[int, int]) -> dict[str, jax.Array]:
    """Sample ``group_size`` trajectories per prompt of ``text``; all of a prompt's share x_T.

    Returns ``latents`` (G·k, T+1, C, h, w) fp32 (x_T ... x_0), ``log_probs`` (G·k, T) fp32 and ``images``
    (G·k, H, W, 3) uint8, group-major.
    """
    cond, uncond = guidance_conditioning(components, frozen, text, d3po.guidance_scale)
    num_prompts = cond.hidden_states.shape[0]
    init_key, loop_key = jax.random.split(key)
    x_T = jax.random.normal(init_key, (num_prompts, components.latent_channels, *latent_hw), jnp.float32)
    policy = nnx.merge(components.unet, policy_unet_params(components, params, frozen))
    predict = guided_predictor(policy, _repeat_rows(cond, group_size),
                               None if uncond is None else _repeat_rows(uncond, group_size), d3po.guidance_scale)
    x0, trajectory = ddim_loop(predict, components.schedule, jnp.repeat(x_T, group_size, axis=0),
                               sched.ddim_timesteps(components.schedule, d3po.num_steps),
                               sched.ddim_prev_timesteps(components.schedule, d3po.num_steps), d3po.eta, loop_key,
                               return_trajectory=True)
    images = decode_to_uint8(nnx.merge(components.vae, frozen["vae"]), x0)
    return {"latents": trajectory.latents, "log_probs": trajectory.log_probs, "images": images}


def transition_log_probs(unet: nnx.Module, components: Components, d3po: D3POConfig, cond: TextConditioning,
                         uncond: TextConditioning | None, states: jax.Array, next_states: jax.Array,
                         timesteps: jax.Array, prev_timesteps: jax.Array) -> jax.Array:
    """log p(x_{t'} | x_t) of stored transitions under ``unet`` (guided as when sampling), fp32, one per row."""
    predict = guided_predictor(unet, cond, uncond, d3po.guidance_scale)
    _, log_prob = sched.ddim_step(components.schedule, predict(states, timesteps), timesteps, prev_timesteps,
                                  states, d3po.eta, prev_sample=next_states)
    return log_prob


def d3po_gradients(components: Components, d3po: D3POConfig, params: dict, frozen: dict,
                   latents: jax.Array, cond: TextConditioning, uncond: TextConditioning | None,
                   preference: jax.Array, positions: jax.Array, gradient_mesh: Mesh | None = None,
                   platform: str | None = None) -> tuple[dict, dict[str, jax.Array]]:
    """The mean over K positions of the gradient of the D3PO loss, and the step's metrics.

    ``latents`` (P, 2, T+1, C, h, w): both members' x_T ... x_0; ``cond``/``uncond``: P rows;
    ``preference`` (P, 2) in {−1, 0, +1}; ``positions`` (P, K) int: the denoising-step indices trained per pair.
    ``gradient_mesh``: take the gradients per device on it (``parallel.data_parallel``); ``platform``: the one
    the program is for (default: the running backend's), which decides how the positions are traced.
    """
    num_steps = latents.shape[2] - 1
    preference = preference.astype(jnp.float32)
    unroll = positions_unroll(d3po, positions.shape[1], platform or jax.devices()[0].platform)

    def pairs_gradients(params, frozen, latents, cond, uncond, preference, positions):
        grads, step_metrics, log_ratios = _positions_gradients(components, d3po, params, frozen, latents, cond,
                                                               uncond, preference, positions, unroll)
        return grads, step_metrics, jnp.swapaxes(log_ratios, 0, 1)  # (P, K, 2): the rows lead

    grads, step_metrics, log_ratios = parallel.data_parallel(pairs_gradients, gradient_mesh, (params, frozen),
                                                             (latents, cond, uncond, preference, positions))
    return grads, d3po_metrics(step_metrics, jnp.swapaxes(log_ratios, 0, 1), positions, preference, num_steps)


def _positions_gradients(components: Components, d3po: D3POConfig, params: dict, frozen: dict,
                         latents: jax.Array, cond: TextConditioning, uncond: TextConditioning | None,
                         preference: jax.Array, positions: jax.Array, unroll: int | bool):
    """(mean gradient over the K positions, per-position loss metrics, log-ratios (K, P, 2)) of these pairs;
    ``unroll`` as ``positions_unroll`` gives it."""
    reference = nnx.merge(components.reference, frozen["reference"])
    num_pairs, num_positions = positions.shape
    num_steps = latents.shape[2] - 1
    timesteps = jnp.asarray(sched.ddim_timesteps(components.schedule, num_steps))
    prev_timesteps = jnp.asarray(sched.ddim_prev_timesteps(components.schedule, num_steps))
    cond2 = _repeat_rows(cond, 2)  # pair-interleaved rows [p0A, p0B, p1A, ...]
    uncond2 = None if uncond is None else _repeat_rows(uncond, 2)
    # A per-pair index, vmapped so each device gathers from its own pairs (fancy indexing gathers globally).
    at_step = jax.vmap(lambda pair_latents, step: pair_latents[:, step])

    def at_position(grad_sum, position):
        flat = lambda x: x.reshape((2 * num_pairs,) + x.shape[2:])  # noqa: E731
        states, next_states = flat(at_step(latents, position)), flat(at_step(latents, position + 1))
        t, t_prev = jnp.repeat(timesteps[position], 2), jnp.repeat(prev_timesteps[position], 2)
        args = (cond2, uncond2, states, next_states, t, t_prev)
        ref_logp = jax.lax.stop_gradient(transition_log_probs(reference, components, d3po, *args))

        def loss_fn(p):
            policy = nnx.merge(components.unet, policy_unet_params(components, p, frozen))
            logp = transition_log_probs(policy, components, d3po, *args)
            loss, metrics = losses.d3po_loss(logp.reshape(num_pairs, 2), ref_logp.reshape(num_pairs, 2),
                                             preference, beta=d3po.beta, eps=d3po.eps)
            return loss, (logp, metrics)

        (_, (logp, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        log_ratio = (logp - ref_logp).reshape(num_pairs, 2)
        grad_sum = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_sum, grads)
        return grad_sum, (metrics, log_ratio)

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    if unroll is True:  # traced position by position: lax.scan keeps even a one-step scan a loop
        grad_sum, per_position = zeros, []
        for position in positions.T:
            grad_sum, out = at_position(grad_sum, position)
            per_position.append(out)
        step_metrics, log_ratios = jax.tree.map(lambda *o: jnp.stack(o), *per_position)
    else:
        grad_sum, (step_metrics, log_ratios) = jax.lax.scan(at_position, zeros, positions.T, unroll=unroll)
    grads = jax.tree.map(lambda g: g / num_positions, grad_sum)
    return grads, step_metrics, log_ratios


def positions_unroll(d3po: D3POConfig, num_positions: int, platform: str) -> int | bool:
    """``d3po.unroll``, or the default of the ``platform`` the program is for: every position on CPU, a rolled
    loop on GPU/TPU. All positions is ``True``: straight-line code, as XLA:CPU runs the weight-gradient
    convolutions of a loop body, even of a one-trip loop, on a much slower path."""
    unroll = d3po.unroll or (num_positions if platform == "cpu" else 1)
    return True if unroll >= num_positions else unroll


def d3po_metrics(step_metrics: dict[str, jax.Array], log_ratios: jax.Array, positions: jax.Array,
                 preference: jax.Array, num_steps: int) -> dict[str, jax.Array]:
    """``losses.d3po_loss``'s metrics averaged over the K steps, with the fraction of (pair, member, step)
    inside the clamp band in place of the fraction outside it; |log ρ| summed per denoising step (with counts,
    so the host can average over an epoch); and the win count: decisive (pair, step)s where the policy already
    favours the preferred member more than the reference does."""
    means = {k: jnp.mean(v) for k, v in step_metrics.items()}
    inside = 1.0 - means.pop("clip_fraction")
    abs_per_pair = jnp.mean(jnp.abs(log_ratios), axis=-1)  # (K, P)
    index = positions.T.reshape(-1)
    decisive = jnp.any(preference != 0, axis=-1)  # (P,)
    favoured = jnp.sum(preference * log_ratios, axis=-1) > 0  # (K, P)
    return {
        **means,
        "inside_fraction": inside,
        "abs_log_ratio_sum": jax.ops.segment_sum(abs_per_pair.reshape(-1), index, num_segments=num_steps),
        "abs_log_ratio_count": jax.ops.segment_sum(jnp.ones_like(index, jnp.float32), index,
                                                   num_segments=num_steps),
        "wins": jnp.sum((favoured & decisive).astype(jnp.float32)),
        "decisive": jnp.sum(decisive.astype(jnp.float32)) * log_ratios.shape[0],
    }


def training_positions(key: jax.Array, num_pairs: int, num_steps: int, fraction: float) -> jax.Array:
    """(P, K) step indices: the first K = int(T·fraction) of one random permutation of the T steps per pair."""
    count = max(1, int(num_steps * fraction))
    perms = jax.vmap(lambda k: jax.random.permutation(k, num_steps))(jax.random.split(key, num_pairs))
    return perms[:, :count]


def latent_size(components: Components, resolution: int) -> tuple[int, int]:
    """(h, w) of the latents of square ``resolution``-pixel images."""
    return (resolution // components.vae_scale_factor,) * 2


def make_sampler(setup: Setup, group_size: int) -> Callable:
    """Jitted ``sample(params, frozen, text, key) -> {latents, log_probs, images}`` (see ``sample_groups``),
    the prompts' rows and the outputs sharded over the batch mesh axes."""
    components, d3po = setup.components, setup.config.d3po
    latent_hw = latent_size(components, d3po.resolution)

    def sample(params, frozen, text, key):
        return sample_groups(components, d3po, params, frozen, text, key, group_size, latent_hw)

    frozen_shardings = shardings_of(setup.frozen)
    return jax.jit(sample, in_shardings=(setup.shardings.params, frozen_shardings, setup.batch_sharding,
                                         setup.replicated), out_shardings=setup.batch_sharding)


def make_update(setup: Setup) -> Callable:
    """Jitted ``update(state, frozen, batch) -> (state, metrics)``: one optimizer step on P pairs (the state
    buffers are donated). ``batch``: latents (P, 2, T+1, C, h, w), the prompts' text inputs, preference (P, 2)."""
    components, config, tx = setup.components, setup.config, setup.tx
    d3po, nan_step = config.d3po, config.train.debug_nan_at_step

    def update(state: TrainState, frozen: dict, batch: dict):
        key = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(state.key), TRAIN_STREAM),
                                 state.step)
        cond, uncond = guidance_conditioning(components, frozen, batch, d3po.guidance_scale)
        latents = batch["latents"]
        positions = training_positions(key, latents.shape[0], latents.shape[2] - 1, d3po.timestep_fraction)
        grads, metrics = d3po_gradients(components, d3po, state.params, frozen, latents, cond,
                                        uncond, batch["preference"], positions, setup.gradient_mesh,
                                        setup.platform)
        grads = jax.tree.map(lambda g: poisoned(g, state.step, nan_step), grads)  # test hook (NaN stop)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {**metrics, "loss": poisoned(metrics["loss"], state.step, nan_step),
                   "grad_norm": optax.tree.norm(grads), "lr": setup.lr_schedule(state.step)}
        return TrainState(state.step + 1, params, opt_state, state.key), metrics

    return jax.jit(update, in_shardings=(setup.shardings, shardings_of(setup.frozen), setup.batch_sharding),
                   out_shardings=(setup.shardings, setup.replicated), donate_argnums=(0,))
