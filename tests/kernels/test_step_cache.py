"""Step-cache kernels: change indicators, the reuse decision, the cached direction and its sigma forecast."""

import pytest
import torch

from patchlab.kernels import step_cache as kc


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_relative_change_is_zero_for_an_unchanged_input():
    x = rand(3, 4, 5, 6)
    assert torch.equal(kc.relative_change(x, x.clone()), torch.zeros(3))


def test_relative_change_is_per_item():
    reference = rand(2, 4, 8, 8)
    current = reference.clone()
    current[1] *= 1.5
    change = kc.relative_change(current, reference)
    assert change[0] == 0
    torch.testing.assert_close(change[1], torch.tensor(0.5))


def test_relative_change_is_float32_for_half_inputs():
    x = rand(2, 3, 4).half()
    assert kc.relative_change(x * 2, x).dtype == torch.float32


def test_relative_change_rejects_different_shapes():
    with pytest.raises(ValueError, match="equal shapes"):
        kc.relative_change(rand(1, 2, 3), rand(1, 2, 4))


def test_relative_change_of_a_zero_reference_is_finite_and_large():
    change = kc.relative_change(torch.ones(1, 4), torch.zeros(1, 4))
    assert torch.isfinite(change).all() and change.item() > 1e6


def test_all_below_needs_every_item_below():
    assert kc.all_below(torch.tensor([0.1, 0.2]), 0.3)
    assert not kc.all_below(torch.tensor([0.1, 0.4]), 0.3)


def test_all_below_is_false_at_threshold_zero():
    assert not kc.all_below(torch.zeros(3), 0.0)


def test_forecast_without_a_previous_evaluation_is_plain_reuse():
    r = rand(2, 3, 4, 4)
    assert kc.forecast(r, torch.tensor([5.0, 5.0]), torch.tensor([4.0, 4.0])) is r


def test_forecast_is_exact_on_a_residual_linear_in_sigma():
    a, b = rand(2, 3, 4, 4, seed=1), rand(2, 3, 4, 4, seed=2)

    def residual(s):
        return a + s * b

    sigma_prev, sigma_last, sigma = torch.tensor([8.0, 6.0]), torch.tensor([5.0, 3.0]), torch.tensor([4.0, 1.0])
    r_prev = torch.stack([residual(sigma_prev[i])[i] for i in range(2)])
    r_last = torch.stack([residual(sigma_last[i])[i] for i in range(2)])
    expected = torch.stack([residual(sigma[i])[i] for i in range(2)])
    got = kc.forecast(r_last, sigma_last, sigma, r_prev, sigma_prev)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_forecast_falls_back_to_reuse_where_the_two_sigmas_coincide():
    r_prev, r_last = rand(2, 4, seed=1), rand(2, 4, seed=2)
    got = kc.forecast(r_last, torch.tensor([3.0, 3.0]), torch.tensor([2.0, 2.0]), r_prev, torch.tensor([3.0, 5.0]))
    torch.testing.assert_close(got[0], r_last[0])
    assert not torch.allclose(got[1], r_last[1])


def test_forecast_keeps_the_dtype_and_accepts_scalar_sigmas():
    r_prev, r_last = rand(1, 4, 2, 2, seed=1).half(), rand(1, 4, 2, 2, seed=2).half()
    got = kc.forecast(r_last, torch.tensor(2.0), torch.tensor(1.0), r_prev, torch.tensor(3.0))
    assert got.dtype == torch.float16 and got.shape == r_last.shape
    torch.testing.assert_close(got.float(), (2 * r_last.float() - r_prev.float()), rtol=1e-2, atol=1e-2)


def test_forecast_gain_scales_the_first_order_step():
    r_prev, r_last = rand(2, 4, seed=1), rand(2, 4, seed=2)
    sigmas = (torch.tensor(3.0), torch.tensor(2.0), r_prev, torch.tensor(4.0))
    full = kc.forecast(r_last, *sigmas)
    half = kc.forecast(r_last, *sigmas, gain=0.5)
    torch.testing.assert_close(half, (r_last + full) / 2)
    torch.testing.assert_close(kc.forecast(r_last, *sigmas, gain=0.0), r_last)


def _quadratic(sigmas):
    """Per item, a feature quadratic in sigma: ``a + b s + c s^2`` at each item's sigma ([B] -> [B, 3, 4])."""
    a, b, c = rand(2, 3, 4, seed=1), rand(2, 3, 4, seed=2), rand(2, 3, 4, seed=3)
    s = sigmas.view(-1, 1, 1)
    return a + b * s + c * s * s


def test_taylor2_forecast_is_exact_on_a_feature_quadratic_in_sigma():
    history = [torch.tensor([5.0, 3.0]), torch.tensor([6.0, 3.5]), torch.tensor([8.0, 4.5])]  # newest first
    target = torch.tensor([4.0, 2.0])
    got = kc.forecast_history([_quadratic(s) for s in history], history, target, "taylor 2")
    torch.testing.assert_close(got, _quadratic(target), rtol=1e-4, atol=1e-4)


def test_taylor2_weights_by_hand():
    # sigmas 3, 4, 5 -> 2: Lagrange weights (2-4)(2-5)/((3-4)(3-5)) = 3, (2-3)(2-5)/((4-3)(4-5)) = -3, then 1
    weights = kc.taylor2_weights(torch.tensor([[3.0, 4.0, 5.0]]), torch.tensor([2.0]))
    torch.testing.assert_close(weights, torch.tensor([[3.0, -3.0, 1.0]]))


def test_chebyshev_forecast_without_ridge_is_exact_on_a_quadratic_and_sums_to_one():
    history = torch.tensor([[3.0, 4.0, 5.0, 6.0]])
    weights = kc.chebyshev_weights(history, torch.tensor([2.0]), ridge=0.0)
    values = 2 + 3 * history - 0.5 * history ** 2
    torch.testing.assert_close((weights * values).sum(-1), torch.tensor([2 + 6 - 2.0]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(kc.chebyshev_weights(history, torch.tensor([2.0])).sum(-1), torch.ones(1))


def test_chebyshev_forecast_of_four_evaluations_is_within_two_percent_on_a_quadratic():
    # the ridge biases the fit a little towards the history's mean: within 2 % of the features' scale
    history = [torch.tensor([5.0, 3.0]), torch.tensor([6.0, 3.5]), torch.tensor([8.0, 4.5]), torch.tensor([9.0, 6.0])]
    target = torch.tensor([4.0, 2.0])
    features = [_quadratic(s) for s in history]
    got = kc.forecast_history(features, history, target, "chebyshev")
    scale = max(float(f.abs().max()) for f in features)
    assert float((got - _quadratic(target)).abs().max()) <= 0.02 * scale


@pytest.mark.parametrize("method", ["taylor 2", "chebyshev"])
def test_higher_order_forecast_with_repeated_sigmas_is_the_first_order_forecast(method):
    # item 0 has had two evaluations (the history repeats its oldest), item 1 one
    d0, d1 = rand(2, 4, seed=1), rand(2, 4, seed=2)
    sigmas = [torch.tensor([3.0, 3.0]), torch.tensor([4.0, 3.0]), torch.tensor([4.0, 3.0]), torch.tensor([4.0, 3.0])]
    got = kc.forecast_history([d0, d1, d1, d1][:kc.HISTORY[method]], sigmas[:kc.HISTORY[method]],
                              torch.tensor([2.0, 2.0]), method)
    first = kc.forecast(d0, sigmas[0], torch.tensor([2.0, 2.0]), d1, sigmas[1], gain=kc.FORECAST_GAIN)
    torch.testing.assert_close(got, first)
    torch.testing.assert_close(got[1], d0[1])


def test_higher_order_forecast_keeps_the_dtype():
    ds = [rand(1, 4, 2, 2, seed=k).half() for k in range(3)]
    got = kc.forecast_history(ds, [torch.tensor(2.0), torch.tensor(3.0), torch.tensor(4.0)], torch.tensor(1.0),
                              "taylor 2")
    assert got.dtype == torch.float16 and got.shape == ds[0].shape


def test_unknown_forecast_method_is_refused():
    with pytest.raises(ValueError, match="taylor 2"):
        kc.forecast_history([rand(1, 2)], [torch.tensor(1.0)], torch.tensor(0.5), "cubic")


def test_direction_of_an_eps_model_is_its_noise_prediction():
    # ComfyUI's EPS: denoised = x - sigma * eps
    x, eps, sigma = rand(2, 4, 3, 3, seed=1), rand(2, 4, 3, 3, seed=2), torch.tensor([7.0, 0.5])
    denoised = x - sigma.view(2, 1, 1, 1) * eps
    torch.testing.assert_close(kc.direction(x, sigma, denoised), eps, rtol=1e-4, atol=1e-4)


def test_denoised_from_direction_inverts_direction():
    x, denoised, sigma = rand(2, 4, 5, seed=1), rand(2, 4, 5, seed=2), torch.tensor([3.0, 0.2])
    d = kc.direction(x, sigma, denoised)
    torch.testing.assert_close(kc.denoised_from_direction(x, sigma, d), denoised, rtol=1e-5, atol=1e-5)


def test_direction_at_sigma_zero_is_zero_not_inf():
    x = rand(2, 3, seed=1)
    d = kc.direction(x, torch.tensor([0.0, 1.0]), torch.zeros(2, 3))
    assert torch.equal(d[0], torch.zeros(3)) and torch.isfinite(d).all()


def test_direction_is_float32_for_half_inputs():
    x = rand(1, 4, 2, 2).half()
    assert kc.direction(x, torch.tensor(1.0), x * 0.5).dtype == torch.float32
