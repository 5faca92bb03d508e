"""Closed-form properties of the schedule kernels (pure torch, no ComfyUI)."""

import math

import pytest
import torch

from patchlab.kernels import sigma_schedules as ss


def sd15_sigmas(zsnr=False):
    sigmas = ss.vp_sigmas(ss.beta_schedule("linear", 1000, 0.00085, 0.012))
    return ss.zero_terminal_snr(sigmas) if zsnr else sigmas


@pytest.mark.parametrize("t", [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
@pytest.mark.parametrize("shift", [0.5, 1.0, 1.73, 3.0, 6.0])
def test_flow_shift_is_the_sd3_formula(t, shift):
    expected = shift * t / (1 + (shift - 1) * t)
    assert ss.flow_shift(t, shift) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_flow_shift_one_is_the_identity_and_keeps_the_endpoints():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    assert torch.equal(ss.flow_shift(t, 1.0), t)
    for shift in (0.5, 3.0, 10.0):
        shifted = ss.flow_shift(t, shift)
        assert shifted[0] == 0 and shifted[-1] == 1
        assert torch.all(shifted[1:] > shifted[:-1])


def test_higher_shift_spends_more_of_the_schedule_at_high_noise():
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    assert torch.all(ss.flow_shift(t, 6.0) > ss.flow_shift(t, 3.0))
    assert torch.all(ss.flow_shift(t, 3.0) > t)


@pytest.mark.parametrize("shift", [0.5, 3.0, 6.0])
def test_flow_unshift_inverts_flow_shift(shift):
    t = torch.linspace(0, 1, 51, dtype=torch.float64)
    torch.testing.assert_close(ss.flow_unshift(ss.flow_shift(t, shift), shift), t)


@pytest.mark.parametrize("mu", [0.5, 1.15, 2.0])
def test_flux_shift_is_flow_shift_with_shift_exp_mu(mu):
    t = torch.linspace(0.01, 1, 100, dtype=torch.float64)
    torch.testing.assert_close(ss.flux_shift(t, mu), ss.flow_shift(t, math.exp(mu)))


def test_flux_mu_interpolates_between_256_and_4096_patches():
    assert ss.flux_mu(256, 0.5, 1.15) == pytest.approx(0.5)
    assert ss.flux_mu(4096, 0.5, 1.15) == pytest.approx(1.15)
    assert ss.flux_mu(2176, 0.5, 1.15) == pytest.approx((0.5 + 1.15) / 2)


def test_sd15_schedule_spans_the_known_sigma_range():
    sigmas = sd15_sigmas()
    assert float(sigmas[0]) == pytest.approx(0.0292, abs=1e-4)
    assert float(sigmas[-1]) == pytest.approx(14.6146, abs=1e-3)
    assert torch.all(sigmas[1:] > sigmas[:-1])


def test_zero_terminal_snr_drives_the_last_snr_to_zero():
    plain, rescaled = sd15_sigmas(), sd15_sigmas(zsnr=True)
    assert float(ss.snr(plain[-1])) > 4e-3
    assert float(ss.snr(rescaled[-1])) < 1e-7


def test_zero_terminal_snr_keeps_the_first_step_and_is_affine_in_sqrt_alpha_bar():
    plain, rescaled = sd15_sigmas(), sd15_sigmas(zsnr=True)
    torch.testing.assert_close(rescaled[0], plain[0])
    root = (1 / (plain ** 2 + 1)).sqrt()
    expected = (root - root[-1]) * root[0] / (root[0] - root[-1])
    torch.testing.assert_close((1 / (rescaled[:-1] ** 2 + 1)).sqrt(), expected[:-1])


def test_table_timestep_inverts_table_sigma_at_whole_timesteps():
    log_sigmas = sd15_sigmas().float().log()
    t = torch.arange(0, 1000, 37)
    torch.testing.assert_close(ss.table_timestep(log_sigmas, ss.table_sigma(log_sigmas, t)), t)


def test_table_sigma_interpolates_in_log_space_and_clamps():
    log_sigmas = sd15_sigmas().float().log()
    mid = ss.table_sigma(log_sigmas, torch.tensor(10.5))
    assert float(mid) == pytest.approx(math.exp((float(log_sigmas[10]) + float(log_sigmas[11])) / 2), rel=1e-6)
    assert float(ss.table_sigma(log_sigmas, torch.tensor(5000.0))) == pytest.approx(float(log_sigmas[-1].exp()))


def test_distill_table_keeps_every_skip_th_sigma_counted_from_the_end():
    sigmas = sd15_sigmas().float()
    table, skip = ss.distill_table(sigmas, 50)
    assert skip == 20
    torch.testing.assert_close(table, sigmas[19::20])


def test_lcm_scalings_meet_the_consistency_boundary_condition():
    c_skip, c_out = ss.lcm_scalings(torch.tensor([0.0, 999.0]))
    assert float(c_skip[0]) == 1.0 and float(c_out[0]) == 0.0
    assert float(c_skip[1]) < 1e-6 and float(c_out[1]) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("forward,inverse", [
    (ss.edm_timestep, ss.edm_sigma),
    (ss.angular_timestep, ss.angular_sigma),
])
def test_continuous_time_maps_are_inverses(forward, inverse):
    sigma = ss.log_linear_table(0.002, 120.0).double()
    torch.testing.assert_close(inverse(forward(sigma)), sigma)


def test_rflow_sigma_inverts_rflow_timestep_and_saturates():
    sigma = ss.log_linear_table(0.002, 120.0)
    sigma_max = sigma[-1]
    torch.testing.assert_close(ss.rflow_sigma(ss.rflow_timestep(sigma[:-1]), sigma_max), sigma[:-1], rtol=1e-4, atol=0)
    assert float(ss.rflow_sigma(torch.tensor(0.9999), sigma_max)) == float(sigma_max)


def test_log_linear_table_is_evenly_spaced_in_log_sigma():
    table = ss.log_linear_table(0.03, 500.0, 11).double()
    steps = table.log().diff()
    torch.testing.assert_close(steps, torch.full_like(steps, (math.log(500) - math.log(0.03)) / 10), rtol=1e-5, atol=0)
    assert ss.log_linear_percent_to_sigma(0.0, 0.03, 500.0) == pytest.approx(500.0)
    assert ss.log_linear_percent_to_sigma(1.0, 0.03, 500.0) == pytest.approx(0.03)


@pytest.mark.parametrize("shift", [1.0, 2.0])
def test_cascade_timestep_inverts_the_unshifted_cascade_sigma(shift):
    t = torch.linspace(0.05, 0.95, 19)
    sigma = ss.cascade_sigma(t, 1.0)
    torch.testing.assert_close(ss.cascade_timestep(sigma), t, rtol=0, atol=1e-4)
    shifted = ss.cascade_sigma(t, shift)
    assert torch.all(shifted >= sigma) if shift > 1 else torch.equal(shifted, sigma)


def test_schedules_follow_the_input_dtype():
    t = torch.linspace(0.1, 0.9, 5, dtype=torch.float64)
    assert ss.flow_shift(t, 3.0).dtype == torch.float64
    assert ss.flow_shift(t.half(), 3.0).dtype == torch.float16


def test_unknown_beta_schedule_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown beta schedule 'quadratic'"):
        ss.beta_schedule("quadratic", 1000, 0.1, 0.2)
