"""Attention-guidance kernels: blurs, token grids, attention mass, query smoothing (pure torch)."""

import pytest
import torch
import torch.nn.functional as F

from patchlab.kernels import attention as ka


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("length,pad", [(5, 2), (9, 4), (3, 1)])
def test_reflect_indices_match_torch_reflect_padding(length, pad):
    signal = torch.arange(length, dtype=torch.float32).view(1, 1, length)
    expected = F.pad(signal, (pad, pad), mode="reflect").flatten().long()
    assert torch.equal(ka.reflect_indices(length, pad), expected)


def test_reflect_indices_fold_for_signals_shorter_than_the_pad():
    assert ka.reflect_indices(2, 4).tolist() == [0, 1, 0, 1, 0, 1, 0, 1, 0, 1]
    assert ka.reflect_indices(1, 3).tolist() == [0] * 7


def test_separable_blur_equals_the_2d_kernel_convolution():
    x = rand(2, 3, 12, 10)
    taps = ka.gaussian_kernel1d(2.0, 9)
    kernel = (taps[:, None] * taps[None, :]).expand(3, 1, 9, 9)
    expected = F.conv2d(F.pad(x, (4, 4, 4, 4), mode="reflect"), kernel, groups=3)
    torch.testing.assert_close(ka.gaussian_blur(x, 2.0, 9), expected, rtol=1e-5, atol=1e-5)


def test_blur_keeps_constants_and_sigma_zero_is_the_identity():
    constant = torch.full((1, 2, 7, 5), 3.0)
    torch.testing.assert_close(ka.gaussian_blur(constant, 1.5), constant)
    x = rand(1, 2, 7, 5)
    assert ka.gaussian_blur(x, 0.0) is x


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 2, 2, 3), (1, 1, 3, 1)])
def test_blur_works_on_any_size(shape):
    out = ka.gaussian_blur(rand(*shape), 3.0)
    assert out.shape == shape and torch.isfinite(out).all()


def test_blur_keeps_half_precision():
    assert ka.gaussian_blur(rand(1, 2, 8, 8).half(), 1.0).dtype == torch.float16


@pytest.mark.parametrize("hw,tokens,grid", [
    ((64, 64), 64 * 64, (64, 64)), ((64, 64), 8 * 8, (8, 8)), ((13, 22), 7 * 11, (7, 11)),
    ((13, 22), 2 * 3, (2, 3)), ((96, 160), 12 * 20, (12, 20)), ((5, 5), 1, (1, 1)),
])
def test_token_grid_follows_the_unet_downsampling(hw, tokens, grid):
    assert ka.token_grid(*hw, tokens) == grid


def test_token_grid_rejects_a_count_no_level_has():
    with pytest.raises(ValueError, match="do not form a downsampled grid"):
        ka.token_grid(16, 16, 50)


def full_column_mass(q, k, heads):
    b, n, width = q.shape
    d = width // heads
    qh = q.reshape(b, n, heads, d).transpose(1, 2)
    kh = k.reshape(b, -1, heads, d).transpose(1, 2)
    probs = (qh @ kh.transpose(-1, -2) * d ** -0.5).softmax(-1)
    return probs.sum(dim=2).mean(dim=1)


def test_attention_mass_equals_the_full_softmax_in_any_chunking():
    q, k = rand(2, 50, 16), rand(2, 50, 16, seed=1)
    expected = full_column_mass(q, k, 4)
    for chunk in (1, 7, 50, 1000):
        torch.testing.assert_close(ka.attention_column_mass(q, k, 4, query_chunk=chunk), expected)


def test_attention_mass_of_self_attention_averages_one_per_token():
    q = rand(3, 36, 8)
    mass = ka.attention_column_mass(q, q, 2)
    torch.testing.assert_close(mass.mean(dim=1), torch.ones(3))


def test_mask_marks_tokens_above_the_threshold_on_the_latent_grid():
    mass = torch.tensor([[2.0, 0.5, 0.5, 1.0]])
    mask = ka.attention_mask_on_latent(mass, (2, 2), 0.9, (4, 4))
    assert mask.shape == (1, 1, 4, 4)
    assert mask[0, 0, :2, :2].eq(1).all() and mask[0, 0, :2, 2:].eq(0).all() and mask[0, 0, 2:, 2:].eq(1).all()


def test_degrade_blurs_only_inside_the_mask():
    x0 = rand(1, 4, 8, 8)
    assert torch.equal(ka.degrade(x0, torch.zeros(1, 1, 8, 8), 2.0), x0)
    torch.testing.assert_close(ka.degrade(x0, torch.ones(1, 1, 8, 8), 2.0), ka.gaussian_blur(x0, 2.0, 9))


def test_infinite_query_blur_is_the_mean_query():
    q = rand(2, 12, 8)
    torch.testing.assert_close(ka.blur_queries(q, (3, 4), ka.INFINITE_BLUR), q.mean(1, keepdim=True).expand_as(q))


def test_query_blur_smooths_on_the_token_grid():
    q = rand(1, 12, 8)
    torch.testing.assert_close(ka.blur_queries(q, (3, 4), 0.0), q)
    blurred = ka.blur_queries(q, (3, 4), 1.0)
    expected = ka.gaussian_blur(q.transpose(1, 2).reshape(1, 8, 3, 4), 1.0).reshape(1, 8, 12).transpose(1, 2)
    torch.testing.assert_close(blurred, expected)


# --- Normalized Attention Guidance -------------------------------------------------------------------

def nag_inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, 5, 8, generator=generator), torch.randn(2, 5, 8, generator=generator)


def test_nag_at_scale_one_or_alpha_zero_is_the_positive_output():
    pos, neg = nag_inputs()
    assert torch.equal(ka.normalized_attention_guidance(pos, neg, 1.0, 2.5, 0.25), pos)
    assert torch.equal(ka.normalized_attention_guidance(pos, neg, 5.0, 2.5, 0.0), pos)


def test_nag_extrapolates_away_from_the_negative_below_the_norm_cap():
    pos, neg = nag_inputs()
    out = ka.normalized_attention_guidance(pos, neg, 2.0, 1e9, 1.0)
    torch.testing.assert_close(out, 2 * pos - neg)


def test_nag_caps_each_tokens_l1_norm_ratio_at_tau():
    pos, neg = nag_inputs()
    out = ka.normalized_attention_guidance(pos, neg, 8.0, 2.0, 1.0)
    ratio = out.abs().sum(-1) / pos.abs().sum(-1)
    uncapped = (8 * pos - 7 * neg).abs().sum(-1) / pos.abs().sum(-1)
    torch.testing.assert_close(ratio, uncapped.clamp(max=2.0))


def test_nag_blends_with_alpha_and_keeps_a_zero_token_finite_in_half_precision():
    pos, neg = nag_inputs()
    pos[0, 0] = 0
    capped = ka.normalized_attention_guidance(pos, neg, 4.0, 2.5, 1.0)
    out = ka.normalized_attention_guidance(pos.half(), neg.half(), 4.0, 2.5, 0.3)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), 0.3 * capped + 0.7 * pos, rtol=2e-3, atol=2e-3)
    assert torch.equal(capped[0, 0], pos[0, 0])


def test_token_permutation_is_a_seeded_permutation_independent_of_the_global_rng():
    torch.manual_seed(0)
    first = ka.token_permutation(50, seed=7)
    torch.manual_seed(1)
    assert torch.equal(ka.token_permutation(50, seed=7), first)
    assert torch.equal(first.sort().values, torch.arange(50))
    assert not torch.equal(ka.token_permutation(50, seed=8), first)


def test_shuffle_reorders_only_the_chosen_tokens_and_keeps_their_set():
    x = torch.randn(2, 10, 4)
    permutation = ka.token_permutation(6, seed=3)
    out = ka.shuffle_tokens(x, 4, 10, permutation)
    assert torch.equal(out[:, :4], x[:, :4])
    assert torch.equal(out[:, 4:], x[:, 4:][:, permutation])
    torch.testing.assert_close(out.norm(dim=(1, 2)), x.norm(dim=(1, 2)))


def test_unshuffle_puts_every_shuffled_token_back_in_its_place():
    x = torch.randn(2, 10, 4)
    permutation = ka.token_permutation(6, seed=3)
    assert torch.equal(ka.unshuffle_tokens(ka.shuffle_tokens(x, 4, 10, permutation), 4, 10, permutation), x)
