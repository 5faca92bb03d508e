"""The similarity AdaptiveGuidance measures (pure torch)."""

import torch

from patchlab.kernels.guidance_skip import prediction_similarity


def rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def test_identical_predictions_have_similarity_one():
    x, cond = rand(2, 4, 8, 8), rand(2, 4, 8, 8, seed=1)
    assert torch.equal(prediction_similarity(x, cond, cond.clone()), torch.ones(2))


def test_it_is_the_cosine_of_the_noise_predictions_over_the_whole_sample():
    x, cond, uncond = rand(1, 4, 6, 10), rand(1, 4, 6, 10, seed=1), rand(1, 4, 6, 10, seed=2)
    a, b = (x - cond).flatten(), (x - uncond).flatten()
    torch.testing.assert_close(prediction_similarity(x, cond, uncond), (a @ b / (a.norm() * b.norm())).view(1))


def test_each_sample_is_measured_alone():
    x, cond, uncond = rand(3, 4, 8, 8), rand(3, 4, 8, 8, seed=1), rand(3, 4, 8, 8, seed=2)
    whole = prediction_similarity(x, cond, uncond)
    for i in range(3):
        torch.testing.assert_close(whole[i:i + 1], prediction_similarity(x[i:i + 1], cond[i:i + 1], uncond[i:i + 1]))


def test_half_precision_inputs_give_float32():
    x, cond, uncond = (rand(2, 4, 8, 8, seed=s, dtype=torch.bfloat16) for s in range(3))
    out = prediction_similarity(x, cond, uncond)
    assert out.dtype == torch.float32 and out.shape == (2,) and bool(((out >= -1) & (out <= 1)).all())


def test_video_latents_are_flattened_whole():
    x, cond, uncond = rand(1, 16, 3, 4, 4), rand(1, 16, 3, 4, 4, seed=1), rand(1, 16, 3, 4, 4, seed=2)
    flat = prediction_similarity(x.flatten(1), cond.flatten(1), uncond.flatten(1))
    torch.testing.assert_close(prediction_similarity(x, cond, uncond), flat)


def test_a_zero_prediction_gives_a_finite_value():
    x = rand(1, 4, 4, 4)
    assert torch.isfinite(prediction_similarity(x, x, rand(1, 4, 4, 4, seed=1))).all()
