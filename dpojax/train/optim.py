"""The optimizer of the official Diffusion-DPO launchers as one optax transformation.

AdamW (SD1.5) or Adafactor (SDXL), behind a global-norm clip, with ``constant_with_warmup``: the learning rate
rises linearly from 0 over ``warmup_steps`` optimizer steps, then stays at its peak. As in PyTorch's
``LambdaLR``, the first update uses the schedule at count 0, i.e. lr 0 when there is a warmup.
Gradient accumulation is the training step's business (``dpojax.train.dpo_step``); this module sees one averaged
gradient per optimizer step.
"""

from __future__ import annotations

import jax
import optax

from dpojax.config import OptimConfig


def learning_rate_schedule(peak_lr: float, warmup_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to ``peak_lr`` over ``warmup_steps`` steps, then constant."""
    if warmup_steps == 0:
        return optax.constant_schedule(peak_lr)
    return optax.join_schedules([optax.linear_schedule(0.0, peak_lr, warmup_steps),
                                 optax.constant_schedule(peak_lr)], [warmup_steps])


def adafactor(schedule: optax.Schedule, weight_decay: float, eps: float = 1e-30) -> optax.GradientTransformation:
    """Adafactor as the official SDXL run sets up ``transformers.Adafactor``.

    Factored second moment with decay 1 − t^−0.8, no first moment, update RMS clipped at 1, no parameter
    scaling and no relative step, weight decay applied as p −= lr·wd·p. (optax's ``adafactor`` alias applies
    its weight decay without the learning rate, hence this chain.) Which two axes are factored differs: optax
    factors the two largest (≥ 128) axes, transformers always the last two of the PyTorch layout.
    """
    return optax.chain(
        optax.scale_by_factored_rms(factored=True, decay_rate=0.8, epsilon=eps),
        optax.clip_by_block_rms(1.0),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(schedule),
    )


def make_optimizer(config: OptimConfig, peak_lr: float) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(transformation, schedule) for ``config`` at ``peak_lr`` (``Config.learning_rate`` resolves scaling)."""
    schedule = learning_rate_schedule(peak_lr, config.warmup_steps)
    if config.name == "adamw":
        b1, b2 = config.betas
        inner = optax.adamw(schedule, b1=b1, b2=b2, eps=config.eps, weight_decay=config.weight_decay)
    else:
        inner = adafactor(schedule, config.weight_decay)
    if config.max_grad_norm is None:
        return inner, schedule
    return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), inner), schedule


def opt_state_shardings(tx: optax.GradientTransformation, abstract_params, param_shardings, replicated):
    """Shardings for ``tx.init(params)``: a param-shaped leaf follows its parameter, anything else (counts,
    Adafactor's factored row/column statistics) is ``replicated``."""
    abstract_state = jax.eval_shape(tx.init, abstract_params)

    def pick(leaf, param, sharding):
        return sharding if leaf.shape == param.shape else replicated

    return optax.tree_map_params(tx, pick, abstract_state, abstract_params, param_shardings,
                                 transform_non_params=lambda _: replicated)
