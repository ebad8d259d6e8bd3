"""The losses against independent float64 computations: NumPy loops for values, torch autograd or the analytic
formulas (docs/losses.md) for gradients."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dpojax import losses

BETA = 5000.0


def _pair_mses(seed, pairs=6, spread=4e-4):
    """Per-sample MSEs near 0.1 whose winner/loser gaps give DPO logits of order 1 at β = 5000."""
    rng = np.random.default_rng(seed)
    ref = (0.1 + spread * rng.standard_normal(2 * pairs)).astype(np.float32)
    model = (ref + spread * rng.standard_normal(2 * pairs)).astype(np.float32)
    return model, ref


def _margins(model, ref):
    """M_i = (r_w − m_w) − (r_l − m_l), one pair at a time in float64."""
    b = len(model) // 2
    return np.array([(float(ref[i]) - float(model[i])) - (float(ref[b + i]) - float(model[b + i]))
                     for i in range(b)])


def _log_sigmoid(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


REFERENCE_PER_PAIR = {
    "sigmoid": lambda m, beta, eps: -_log_sigmoid(beta / 2 * m),
    "hinge": lambda m, beta, eps: max(0.0, 1.0 - beta / 2 * m),
    "ipo": lambda m, beta, eps: (m - 1.0 / (2 * (beta / 2))) ** 2,
    "robust": lambda m, beta, eps: (-(1 - eps) * _log_sigmoid(beta / 2 * m)
                                    - eps * _log_sigmoid(-beta / 2 * m)),
}


def test_per_sample_mse_matches_loop_and_reduces_in_float32():
    rng = np.random.default_rng(0)
    pred, target = rng.standard_normal((2, 3, 4, 5, 6))
    expected = [np.mean([(p - t) ** 2 for p, t in zip(pred[i].ravel(), target[i].ravel(), strict=True)])
                for i in range(3)]
    got = losses.per_sample_mse(jnp.asarray(pred, jnp.bfloat16), jnp.asarray(target, jnp.bfloat16))
    assert got.dtype == jnp.float32 and got.shape == (3,)
    bf16 = lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64)  # noqa: E731
    np.testing.assert_allclose(got, np.mean((bf16(pred) - bf16(target)) ** 2, axis=(1, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(losses.per_sample_mse(jnp.asarray(pred), jnp.asarray(target)), expected,
                               rtol=1e-5)


def test_dpo_at_init_is_ln2_with_zero_accuracy_and_quarter_beta_gradient():
    model, _ = _pair_mses(1, pairs=4)
    loss, metrics = losses.pair_loss("sigmoid", jnp.asarray(model), jnp.asarray(model), beta=BETA)
    assert float(loss) == pytest.approx(math.log(2), abs=1e-7)
    assert float(metrics["implicit_acc"]) == 0.0  # u = 0 is not > 0
    grad = jax.grad(lambda m: losses.pair_loss("sigmoid", m, jnp.asarray(model), beta=BETA)[0])(
        jnp.asarray(model))
    b = 4
    np.testing.assert_allclose(grad, np.r_[np.full(b, BETA / 4 / b), np.full(b, -BETA / 4 / b)], rtol=1e-6)


def test_dpo_value_metrics_and_analytic_gradient():
    model, ref = _pair_mses(2)
    b = len(model) // 2
    margin = _margins(model, ref)
    u = BETA / 2 * margin
    loss, metrics = losses.pair_loss("sigmoid", jnp.asarray(model), jnp.asarray(ref), beta=BETA)
    # fp32 MSEs near 0.1 carry ~1e-8 absolute error, times β/2 = 2500 in u.
    assert float(loss) == pytest.approx(np.mean([-_log_sigmoid(x) for x in u]), abs=1e-4)
    assert float(metrics["implicit_acc"]) == pytest.approx(np.mean(u > 0))
    assert 0 < float(metrics["implicit_acc"]) < 1  # the data exercise both sides
    np.testing.assert_allclose(metrics["margin"], margin.mean(), atol=2e-8)
    np.testing.assert_allclose(metrics["scaled_margin"], u.mean(), atol=1e-4)
    np.testing.assert_allclose(metrics["model_mse"], np.mean(model.astype(np.float64)), rtol=1e-6)
    np.testing.assert_allclose(metrics["ref_mse"], np.mean(ref.astype(np.float64)), rtol=1e-6)
    model64, ref64 = model.astype(np.float64), ref.astype(np.float64)
    np.testing.assert_allclose(metrics["model_mse_gap"], np.mean(model64[:b] - model64[b:]), atol=1e-8)
    np.testing.assert_allclose(metrics["ref_mse_gap"], np.mean(ref64[:b] - ref64[b:]), atol=1e-8)

    fn = lambda m: losses.pair_loss("sigmoid", m, jnp.asarray(ref), beta=BETA)[0]  # noqa: E731
    grad = jax.grad(fn)(jnp.asarray(model))
    sigma_neg_u = 1 / (1 + np.exp(u))
    expected = np.r_[BETA / 2 * sigma_neg_u / b, -BETA / 2 * sigma_neg_u / b]
    np.testing.assert_allclose(grad, expected, rtol=1e-3, atol=1e-2)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "robust"])
def test_reference_variants_match_formulas_and_torch_gradients(loss_type):
    model, ref = _pair_mses(3)
    beta, eps = BETA, 0.1  # IPO's target margin 1/β = 2e-4 is of the order of the data's margins
    margin = _margins(model, ref)
    expected = np.mean([REFERENCE_PER_PAIR[loss_type](m, beta, eps) for m in margin])
    smoothing = eps if loss_type == "robust" else 0.0
    fn = lambda m: losses.pair_loss(loss_type, m, jnp.asarray(ref), beta=beta, label_smoothing=smoothing)[0]  # noqa: E731
    loss, grad = jax.value_and_grad(fn)(jnp.asarray(model))
    assert float(loss) == pytest.approx(expected, rel=1e-3, abs=1e-6)

    # torch autograd on the same formula, written on the (w, l) halves
    m_t = torch.tensor(model, dtype=torch.float64, requires_grad=True)
    r_t = torch.tensor(ref, dtype=torch.float64)
    b = len(model) // 2
    big_m = (r_t[:b] - m_t[:b]) - (r_t[b:] - m_t[b:])
    u = beta / 2 * big_m
    logsigmoid = torch.nn.functional.logsigmoid
    per_pair = {
        "sigmoid": lambda: -logsigmoid(u),
        "hinge": lambda: torch.clamp(1 - u, min=0),
        "ipo": lambda: (big_m - 1 / beta) ** 2,
        "robust": lambda: -(1 - eps) * logsigmoid(u) - eps * logsigmoid(-u),
    }[loss_type]()
    per_pair.mean().backward()
    np.testing.assert_allclose(grad, m_t.grad.numpy(), rtol=2e-3, atol=1e-3 * np.abs(m_t.grad.numpy()).max())


def test_robust_with_zero_smoothing_is_dpo():
    model, ref = _pair_mses(4)
    dpo = losses.pair_loss("sigmoid", jnp.asarray(model), jnp.asarray(ref), beta=BETA)[0]
    robust = losses.pair_loss("robust", jnp.asarray(model), jnp.asarray(ref), beta=BETA, label_smoothing=0.0)
    robust = robust[0]
    assert float(robust) == pytest.approx(float(dpo), rel=1e-6)


def test_sft_is_mean_winner_mse():
    winners = np.array([0.1, 0.3, 0.2], np.float32)
    loss, metrics = losses.pair_loss("sft", jnp.asarray(winners), beta=BETA)
    assert float(loss) == pytest.approx(0.2, rel=1e-6)
    assert float(metrics["model_mse"]) == pytest.approx(0.2, rel=1e-6)


def _phi64(m, s=0.5):
    x = s * m
    return 1.0 if x == 0 else x / math.expm1(x)


def test_mapo_matches_formula_and_torch_gradient():
    rng = np.random.default_rng(5)
    model = (0.1 + 0.01 * rng.standard_normal(8)).astype(np.float32)
    b = 4
    odds = [1000.0 * (_phi64(float(model[i])) - _phi64(float(model[b + i]))) for i in range(b)]
    expected = np.mean(model[:b].astype(np.float64)) - 0.1 * np.mean([_log_sigmoid(o) for o in odds])
    fn = lambda m: losses.pair_loss("mapo", m, beta=BETA, mapo_beta=0.1, mapo_temperature=1000.0)[0]  # noqa: E731
    loss, grad = jax.value_and_grad(fn)(jnp.asarray(model))
    assert float(loss) == pytest.approx(expected, rel=1e-4)

    m_t = torch.tensor(model, dtype=torch.float64, requires_grad=True)
    phi = 0.5 * m_t / torch.expm1(0.5 * m_t)
    t_loss = m_t[:b].mean() - 0.1 * torch.nn.functional.logsigmoid(1000.0 * (phi[:b] - phi[b:])).mean()
    t_loss.backward()
    np.testing.assert_allclose(grad, m_t.grad.numpy(), rtol=1e-3, atol=1e-5)


def test_mapo_phi_is_smooth_through_zero():
    m = jnp.array([0.0, 1e-5, 1.99e-3, 2.01e-3, 0.5, 3.0])
    np.testing.assert_allclose(losses.mapo_phi(m), [_phi64(float(x)) for x in m], rtol=1e-6)
    grad = jax.grad(lambda x: losses.mapo_phi(x).sum())(m)
    assert np.all(np.isfinite(grad))
    assert float(grad[0]) == pytest.approx(-0.25, rel=1e-6)  # d/dm of 1 − m/4 + ...


def test_pair_loss_rejects_bad_input():
    x = jnp.ones(4)
    with pytest.raises(ValueError, match="'dpo' is not one of"):
        losses.pair_loss("dpo", x, x, beta=1.0)
    with pytest.raises(ValueError, match="needs ref_mse"):
        losses.pair_loss("hinge", x, beta=1.0)
    with pytest.raises(ValueError, match=r"model_mse must have shape \(2B,\)"):
        losses.pair_loss("sigmoid", jnp.ones(3), jnp.ones(3), beta=1.0)


def test_losses_jit():
    model, ref = _pair_mses(6)
    eager = losses.pair_loss("robust", jnp.asarray(model), jnp.asarray(ref), beta=BETA, label_smoothing=0.2)
    jitted = jax.jit(losses.pair_loss, static_argnames="loss_type")(
        "robust", jnp.asarray(model), jnp.asarray(ref), beta=BETA, label_smoothing=0.2)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), eager, jitted)
    h = jnp.array([[1, -1], [0, 0]])
    eager = losses.d3po_loss(jnp.zeros((2, 2)), jnp.zeros((2, 2)), h)
    jitted = jax.jit(losses.d3po_loss)(jnp.zeros((2, 2)), jnp.zeros((2, 2)), h)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), eager, jitted)


# --- D3PO ---------------------------------------------------------------------------------------------------

def _d3po_torch(logp, ref_logp, h, beta, eps):
    """The D3PO repo's formulation: ratio = exp(Δ), torch.clamp, then log."""
    logp_t = torch.tensor(logp, dtype=torch.float64, requires_grad=True)
    ratio = torch.clamp(torch.exp(logp_t - torch.tensor(ref_logp, dtype=torch.float64)), 1 - eps, 1 + eps)
    h_t = torch.tensor(h, dtype=torch.float64)
    z = beta * (h_t[:, 0] * torch.log(ratio[:, 0]) + h_t[:, 1] * torch.log(ratio[:, 1]))
    loss = -torch.nn.functional.logsigmoid(z).mean()
    loss.backward()
    return loss.item(), logp_t.grad.numpy()


def test_d3po_matches_torch_clamp_semantics():
    rng = np.random.default_rng(7)
    ref_logp = rng.normal(-1.0, 0.3, (8, 2)).astype(np.float32)
    delta = rng.uniform(-0.2, 0.2, (8, 2)).astype(np.float32)  # some inside log[0.9, 1.1], some outside
    delta[0] = [300.0, -300.0]  # far outside: exp() overflows in the naive form
    logp = ref_logp + delta
    h = np.array([[1, -1], [-1, 1], [0, 0], [1, -1], [-1, 1], [1, -1], [0, 0], [-1, 1]])
    expected_loss, expected_grad = _d3po_torch(logp, ref_logp, h, beta=0.1, eps=0.1)
    fn = lambda lp: losses.d3po_loss(lp, jnp.asarray(ref_logp), jnp.asarray(h), beta=0.1, eps=0.1)  # noqa: E731
    (loss, metrics), grad = jax.value_and_grad(fn, has_aux=True)(jnp.asarray(logp))
    assert float(loss) == pytest.approx(expected_loss, rel=1e-5)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-8)
    log_ratio = logp.astype(np.float64) - ref_logp
    outside = (log_ratio < math.log(0.9)) | (log_ratio > math.log(1.1))
    assert 0 < outside.mean() < 1
    assert float(metrics["clip_fraction"]) == pytest.approx(outside.mean())
    assert float(metrics["mean_abs_log_ratio"]) == pytest.approx(np.abs(log_ratio).mean(), rel=1e-5)
    assert float(metrics["loss_minus_ln2"]) == pytest.approx(expected_loss - math.log(2), abs=1e-6)
    assert np.all(grad[outside] == 0) and np.all(grad[2] == 0) and np.all(grad[6] == 0)  # clipped, ties


def test_d3po_at_init_is_ln2_with_sign_gradient():
    logp = jnp.asarray(np.random.default_rng(8).normal(size=(4, 2)), jnp.float32)
    h = jnp.array([[1, -1], [-1, 1], [0, 0], [1, -1]])
    fn = lambda lp: losses.d3po_loss(lp, logp, h, beta=0.1, eps=0.1)  # noqa: E731
    (loss, _), grad = jax.value_and_grad(fn, has_aux=True)(logp)
    assert float(loss) == pytest.approx(math.log(2), abs=1e-7)
    # −d/dℓ log σ(β Σ h ℓ) at z = 0 is −β·h/2, averaged over P pairs
    np.testing.assert_allclose(grad, -0.1 * np.asarray(h) / 2 / 4, rtol=1e-6)


@pytest.mark.parametrize("reward_a, reward_b, expected", [
    ([1.0, 2.0], [1.0, 3.0], [-1, 1]),  # A dominated (one equal, one strictly less)
    ([2.0, 3.0], [1.0, 3.0], [1, -1]),  # B dominated
    ([2.0, 1.0], [1.0, 2.0], [0, 0]),  # neither dominates
    ([1.0, 2.0], [1.0, 2.0], [0, 0]),  # equal
])
def test_pareto_preference_vector(reward_a, reward_b, expected):
    h = losses.pareto_preference(jnp.array([reward_a]), jnp.array([reward_b]))
    assert h.shape == (1, 2) and h.tolist() == [expected]


def test_pareto_preference_scalar_is_sign():
    r_a = np.array([0.5, 0.1, 0.3, -2.0])
    r_b = np.array([0.2, 0.4, 0.3, -1.0])
    h = losses.pareto_preference(jnp.asarray(r_a), jnp.asarray(r_b))
    np.testing.assert_array_equal(h, np.stack([np.sign(r_a - r_b), np.sign(r_b - r_a)], axis=-1))
