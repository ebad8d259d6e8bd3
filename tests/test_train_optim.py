"""The optimizers against their PyTorch originals (torch AdamW, transformers Adafactor) and the schedule."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from transformers.optimization import Adafactor

from dpojax.config import OptimConfig
from dpojax.train.optim import learning_rate_schedule, make_optimizer

SHAPES = {"kernel": (128, 160), "bias": (160,)}  # both matrix axes >= 128: optax and transformers factor alike


def gradient_sequence(steps: int, scale: float):
    rng = np.random.default_rng(0)
    return [{k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}
            for _ in range(steps)]


def run_optax(config: OptimConfig, params, grads_seq):
    tx, _ = make_optimizer(config, config.lr)
    params = {k: jnp.asarray(v) for k, v in params.items()}
    state = tx.init(params)
    for grads in grads_seq:
        updates, state = tx.update({k: jnp.asarray(v) for k, v in grads.items()}, state, params)
        params = optax.apply_updates(params, updates)
    return {k: np.asarray(v) for k, v in params.items()}


def run_torch(make_optimizer_fn, params, grads_seq, max_grad_norm):
    tensors = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in params.items()}
    opt = make_optimizer_fn(list(tensors.values()))
    for grads in grads_seq:
        for k, t in tensors.items():
            t.grad = torch.from_numpy(grads[k].copy())
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(list(tensors.values()), max_grad_norm)
        opt.step()
    return {k: t.detach().numpy() for k, t in tensors.items()}


@pytest.fixture
def params():
    rng = np.random.default_rng(1)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}


@pytest.mark.parametrize("grad_scale", [1e-3, 1.0])  # below and above the clip threshold
def test_adamw_with_clipping_matches_torch(params, grad_scale):
    config = OptimConfig(name="adamw", lr=1e-2, warmup_steps=0, weight_decay=1e-2, max_grad_norm=1.0)
    grads = gradient_sequence(4, grad_scale)
    expected = run_torch(lambda p: torch.optim.AdamW(p, lr=1e-2, betas=(0.9, 0.999), eps=1e-8,
                                                     weight_decay=1e-2), params, grads, 1.0)
    actual = run_optax(config, params, grads)
    for k in SHAPES:
        np.testing.assert_allclose(actual[k], expected[k], rtol=1e-5, atol=1e-6)
        assert not np.allclose(actual[k], params[k])


def test_adafactor_matches_transformers(params):
    config = OptimConfig(name="adafactor", lr=1e-2, warmup_steps=0, weight_decay=1e-2, max_grad_norm=1.0)
    grads = gradient_sequence(4, 1.0)
    expected = run_torch(lambda p: Adafactor(p, lr=1e-2, scale_parameter=False, relative_step=False,
                                             warmup_init=False, clip_threshold=1.0, decay_rate=-0.8, beta1=None,
                                             weight_decay=1e-2), params, grads, 1.0)
    actual = run_optax(config, params, grads)
    for k in SHAPES:
        np.testing.assert_allclose(actual[k], expected[k], rtol=1e-5, atol=1e-6)
        assert not np.allclose(actual[k], params[k])


def test_schedule_is_torch_constant_with_warmup():
    schedule = learning_rate_schedule(2e-5, 4)
    # torch LambdaLR(min(1, step / warmup)): the first update (count 0) uses lr 0.
    assert [float(schedule(i)) for i in range(6)] == pytest.approx([0, 5e-6, 1e-5, 1.5e-5, 2e-5, 2e-5])
    assert float(learning_rate_schedule(3e-4, 0)(0)) == pytest.approx(3e-4)
