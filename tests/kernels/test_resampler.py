"""InstantID's Resampler (pure torch): shapes from a state dict, key checks, outputs."""

import torch

from patchlab.kernels.resampler import Resampler, ResamplerShape, shape_problems

RELEASED = ResamplerShape(dim=1280, depth=4, inner=1280, num_queries=16, embedding_dim=512, output_dim=2048,
                          ff_dim=5120)


def random_state_dict(shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=generator) * 0.02 for k, s in shape.expected().items()}


def test_the_released_shape_has_the_documented_keys():
    expected = RELEASED.expected()
    assert expected["latents"] == (1, 16, 1280)
    assert expected["layers.3.0.to_kv.weight"] == (2560, 1280)
    assert expected["layers.0.1.3.weight"] == (1280, 5120)
    assert RELEASED.heads == 20


def test_shape_is_read_back_from_a_state_dict():
    small = ResamplerShape(dim=64, depth=2, inner=64, num_queries=16, embedding_dim=512, output_dim=2048, ff_dim=256)
    assert ResamplerShape.from_state_dict(random_state_dict(small)) == small


def test_problems_list_missing_unexpected_and_misshaped_keys():
    small = ResamplerShape(dim=64, depth=1, inner=64, num_queries=4, embedding_dim=8, output_dim=16, ff_dim=256)
    sd = random_state_dict(small)
    del sd["proj_in.bias"]
    sd["extra"] = torch.zeros(1)
    sd["latents"] = torch.zeros(1, 4, 32)
    problems = shape_problems(sd, small)
    assert "missing proj_in.bias" in problems and "unexpected extra" in problems
    assert "latents has shape (1, 4, 32), expected (1, 4, 64)" in problems


def test_resampler_maps_embeddings_to_query_tokens():
    small = ResamplerShape(dim=64, depth=2, inner=64, num_queries=16, embedding_dim=512, output_dim=128, ff_dim=256)
    module = Resampler.from_state_dict(random_state_dict(small))
    embeds = torch.randn(3, 512)
    tokens = module(embeds)
    assert tokens.shape == (3, 16, 128) and torch.isfinite(tokens).all()
    torch.testing.assert_close(module(embeds[:, None]), tokens)
    torch.testing.assert_close(module(embeds[1:2]), tokens[1:2], rtol=1e-5, atol=1e-5)
