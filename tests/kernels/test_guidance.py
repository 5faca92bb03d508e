"""Closed-form properties of the CFG-space kernels (pure torch)."""

import pytest
import torch

from patchlab.kernels import frequency, guidance, inpaint


def rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def test_rescale_zero_multiplier_is_the_identity():
    guided, cond = rand(2, 4, 8, 8), rand(2, 4, 8, 8, seed=1)
    torch.testing.assert_close(guidance.rescale(guided, cond, 0.0), guided)


def test_full_rescale_matches_the_positive_std_per_sample():
    guided, cond = rand(2, 4, 8, 8) * torch.tensor([3.0, 0.5]).view(2, 1, 1, 1), rand(2, 4, 8, 8, seed=1)
    out = guidance.rescale(guided, cond, 1.0)
    torch.testing.assert_close(out.std(dim=(1, 2, 3)), cond.std(dim=(1, 2, 3)))


def test_rescale_of_a_constant_result_is_finite():
    out = guidance.rescale(torch.full((1, 4, 8, 8), 2.0), torch.zeros(1, 4, 8, 8), 0.7)
    assert torch.isfinite(out).all()


def test_renorm_caps_the_norm_per_sample_and_zero_disables_it():
    cond = rand(2, 4, 8, 8)
    guided = cond * torch.tensor([5.0, 0.5]).view(2, 1, 1, 1)
    out = guidance.renorm(guided, cond, 1.0)
    torch.testing.assert_close(out[0].norm(), cond[0].norm())
    torch.testing.assert_close(out[1], guided[1])
    assert guidance.renorm(guided, cond, 0.0) is guided


def test_projection_splits_into_parallel_and_orthogonal_parts():
    v, onto = rand(3, 4, 6, 5), rand(3, 4, 6, 5, seed=1)
    parallel, orthogonal = guidance.project(v, onto)
    torch.testing.assert_close(parallel + orthogonal, v)
    dots = (orthogonal.double() * onto.double()).sum(dim=(1, 2, 3))
    torch.testing.assert_close(dots, torch.zeros(3, dtype=torch.float64), atol=1e-4, rtol=0)


def test_projection_onto_zero_leaves_everything_orthogonal():
    v = rand(1, 4, 8, 8)
    parallel, orthogonal = guidance.project(v, torch.zeros_like(v))
    assert torch.count_nonzero(parallel) == 0 and torch.equal(orthogonal, v)


def test_apg_update_with_eta_one_and_no_cap_is_the_difference():
    diff, cond = rand(2, 4, 8, 8), rand(2, 4, 8, 8, seed=1)
    torch.testing.assert_close(guidance.apg_update(diff, cond, 1.0, 0.0), diff)


def test_apg_norm_cap_bounds_the_update():
    diff, cond = rand(2, 4, 8, 8) * 10, rand(2, 4, 8, 8, seed=1)
    update = guidance.apg_update(diff, cond, 1.0, 2.0)
    assert torch.all(update.flatten(1).norm(dim=1) <= 2.0 + 1e-4)


def test_momentum_accumulates_with_the_given_weight():
    running, diff = torch.ones(1, 2), torch.full((1, 2), 3.0)
    torch.testing.assert_close(guidance.momentum_update(running, diff, -0.5), torch.full((1, 2), 2.5))


def tcfg_by_svd(cond, uncond):
    batch = cond.shape[0]
    matrix = torch.cat([uncond.reshape(batch, 1, -1), cond.reshape(batch, 1, -1)], dim=1).double()
    _, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    v1 = vh[:, 0:1, :]
    return ((uncond.reshape(batch, 1, -1).double() @ v1.transpose(1, 2)) * v1).reshape(uncond.shape)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tangential_damping_equals_the_svd_projection(seed):
    cond, uncond = rand(2, 4, 9, 7, seed=seed), rand(2, 4, 9, 7, seed=seed + 10) + 0.3 * rand(2, 4, 9, 7, seed=seed)
    torch.testing.assert_close(guidance.tangential_damping(cond, uncond).double(), tcfg_by_svd(cond, uncond),
                               rtol=1e-5, atol=1e-5)


def test_tangential_damping_of_parallel_and_zero_scores_is_finite_and_exact():
    cond = rand(1, 4, 8, 8)
    torch.testing.assert_close(guidance.tangential_damping(cond, 2 * cond), 2 * cond)
    zeros = torch.zeros(1, 4, 8, 8)
    assert torch.count_nonzero(guidance.tangential_damping(zeros, zeros)) == 0


def test_mahiro_treats_each_sample_on_its_own():
    cond, uncond = rand(2, 4, 8, 8), rand(2, 4, 8, 8, seed=1)
    guided = guidance.cfg(cond, uncond, 5.0)
    both = guidance.mahiro(cond, uncond, guided, 5.0)
    alone = guidance.mahiro(cond[1:], uncond[1:], guided[1:], 5.0)
    torch.testing.assert_close(both[1:], alone)


def test_zero_star_alpha_is_the_least_squares_scale():
    uncond = rand(2, 4, 8, 8)
    cond = 0.8 * uncond + 0.01 * rand(2, 4, 8, 8, seed=3)
    alpha = guidance.zero_star_alpha(cond, uncond).flatten()
    expected = (cond * uncond).sum(dim=(1, 2, 3)) / (uncond * uncond).sum(dim=(1, 2, 3))
    torch.testing.assert_close(alpha, expected)
    assert torch.isfinite(guidance.zero_star_alpha(cond, torch.zeros_like(uncond))).all()


def test_zero_star_with_alpha_one_is_plain_cfg():
    cond, uncond = rand(1, 4, 8, 8), rand(1, 4, 8, 8, seed=1)
    uncond_aligned = uncond * (cond * uncond).sum() / (uncond * uncond).sum()  # alpha(cond, aligned) == 1
    torch.testing.assert_close(guidance.zero_star(cond, uncond_aligned, 4.0),
                               guidance.cfg(cond, uncond_aligned, 4.0), rtol=1e-5, atol=1e-5)


def test_unit_frequency_scales_return_the_input():
    x = rand(2, 4, 16, 12)
    torch.testing.assert_close(frequency.scale_frequencies(x, 1.0, 1.0, 3), x, rtol=1e-5, atol=1e-5)


def test_low_band_is_a_centred_square():
    mask = frequency.low_frequency_mask(8, 6, 2)
    assert mask.sum() == 4 * 4
    assert mask[2:6, 1:5].all() and not mask[1].any() and not mask[:, 0].any()


def test_scaling_all_frequencies_scales_the_signal():
    x = rand(1, 2, 8, 8)
    torch.testing.assert_close(frequency.scale_frequencies(x, 2.0, 2.0, 3), 2 * x, rtol=1e-5, atol=1e-5)


def test_video_latents_are_filtered_frame_by_frame():
    video = rand(1, 4, 3, 16, 16)
    out = frequency.scale_frequencies(video, 1.0, 1.5, 4)
    for t in range(3):
        torch.testing.assert_close(out[:, :, t], frequency.scale_frequencies(video[:, :, t], 1.0, 1.5, 4))


def test_fourier_filter_keeps_half_precision():
    assert frequency.scale_frequencies(rand(1, 4, 8, 8, dtype=torch.float16), 1.0, 1.2, 2).dtype == torch.float16


def test_freeu_v2_factor_spans_one_to_b_and_is_b_on_a_flat_map():
    h = rand(2, 8, 6, 6)
    factor = frequency.freeu_v2_backbone_factor(h, 1.4)
    assert factor.shape == (2, 1, 6, 6)
    assert float(factor.min()) == pytest.approx(1.0) and float(factor.max()) == pytest.approx(1.4)
    flat = frequency.freeu_v2_backbone_factor(torch.full((1, 8, 6, 6), 3.0), 1.4)
    torch.testing.assert_close(flat, torch.full((1, 1, 6, 6), 1.4))


def test_progressive_mask_strength_blends_binary_and_given_masks():
    mask = torch.linspace(0, 1, 11).view(1, 1, 1, 11)
    threshold = torch.tensor(0.5)
    binary = (mask >= 0.5).float()
    torch.testing.assert_close(inpaint.progressive_mask(mask, threshold, 1.0), binary)
    torch.testing.assert_close(inpaint.progressive_mask(mask, threshold, 0.0), mask)


def test_progress_threshold_runs_from_one_to_zero_and_survives_a_zero_span():
    start, end = torch.tensor(999.0), torch.tensor(0.0)
    assert float(inpaint.progress_threshold(start, start, end)) == 1.0
    assert float(inpaint.progress_threshold(end, start, end)) == 0.0
    assert float(inpaint.progress_threshold(start, start, start)) == 0.0
