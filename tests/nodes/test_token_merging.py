"""ToMe and ToDo on tiny SD1.5/SDXL models: parity with core, SDXL reach, RNG hygiene, batches, sizes."""

import logging

import comfy.sample
import pytest
import torch

from devtools import checks
from devtools.sampling import sample
from devtools.testkit import tiny_models
from patchlab.kernels.attention import grid_level
from patchlab.nodes import token_merging as nodes
from patchlab.patches import once

FULL = {"start_percent": 0.0, "end_percent": 1.0}
NEVER = {"start_percent": 1.0, "end_percent": 1.0}
TOME = {"ratio": 0.5, "max_downsample": 1, "stride_x": 2, "stride_y": 2, "destinations": "random", "seed": 0,
        "metric": "input", "merge": "queries, keys and values"}
TODO = {"downsample_factor": 2.0, "max_downsample": 1, "method": "nearest-exact"}
SIZE = {"height": 24, "width": 24}


def close(actual, expected, rel=1e-4):
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * float(expected.abs().max()))


def tome(model, window=FULL, **overrides):
    return checks.run_node(nodes.TokenMerging, model=model, **{**TOME, **overrides}, **window)[0]


def todo(model, window=FULL, **overrides):
    return checks.run_node(nodes.TokenDownsampling, model=model, **{**TODO, **overrides}, **window)[0]


def prompts(layout):
    return {"positive": tiny_models.conditioning(layout, seed=1), "negative": tiny_models.conditioning(layout, seed=2)}


@pytest.fixture(scope="module")
def sd15(tiny_model):
    return tiny_model("sd15")


@pytest.fixture(scope="module")
def plain(sd15):
    return sample(sd15, "sd15", steps=3, **SIZE)


def merged_layers(model, layout, **size):
    """How many self-attention calls of one model evaluation get merged or downsampled tokens."""
    seen = []

    def probe(n, context, value, extra_options):
        shape = extra_options["original_shape"]
        seen.append(not (is_grid(shape, n.shape[1]) and is_grid(shape, context.shape[1])
                         and n.shape[1] == context.shape[1]))
        return n, context, value

    probed = model.clone()
    probed.set_model_attn1_patch(probe)
    sample(probed, layout, steps=1, **size)
    return sum(seen)


def is_grid(shape, tokens):
    try:
        grid_level(shape[-2], shape[-1], tokens)
        return True
    except ValueError:
        return False


# --- parity and reach ----------------------------------------------------------------------------

def test_matches_core_tome_in_its_mode(core_nodes, sd15, monkeypatch):
    """Core draws destinations from the global RNG; with that pinned to the top-left both plan the same merges."""
    ours = tome(sd15, destinations="deterministic", merge="queries only")
    (core,) = checks.run_node(core_nodes["TomePatchModel"], model=sd15, ratio=0.5)
    monkeypatch.setattr(torch, "randint", lambda high, size, **kw: torch.zeros(size, dtype=torch.long,
                                                                                 device=kw.get("device")))
    expected = sample(core, "sd15", steps=3, **SIZE)
    monkeypatch.undo()
    close(sample(ours, "sd15", steps=3, **SIZE), expected, rel=1e-5)


@pytest.mark.parametrize("max_downsample,expected", [(2, 10), (4, 70)])
def test_sdxl_layers_are_reached_where_core_touches_none(core_nodes, tiny_model, max_downsample, expected):
    model = tiny_model("sdxl")
    (core,) = checks.run_node(core_nodes["TomePatchModel"], model=model, ratio=0.5)
    patched = tome(model, max_downsample=max_downsample)
    assert merged_layers(patched, "sdxl") == expected  # cond and uncond run in one call
    assert not torch.allclose(sample(patched, "sdxl", steps=2), sample(model, "sdxl", steps=2), rtol=1e-3,
                              atol=1e-3)
    core_result = sample(core, "sdxl", steps=2)
    torch.testing.assert_close(core_result, sample(model, "sdxl", steps=2))


def test_todo_reaches_sdxl_layers(tiny_model):
    model = tiny_model("sdxl")
    patched = todo(model, max_downsample=2)
    assert merged_layers(patched, "sdxl") == 10
    assert not torch.allclose(sample(patched, "sdxl", steps=2), sample(model, "sdxl", steps=2), rtol=1e-3,
                              atol=1e-3)


def test_a_model_out_of_reach_is_warned_about_once(tiny_model, caplog):
    once._warned.clear()
    with caplog.at_level(logging.WARNING):
        tome(tiny_model("sdxl"), max_downsample=1)
        tome(tiny_model("sdxl"), max_downsample=1)
    warnings = [r for r in caplog.records if "touches no layer" in r.getMessage()]
    assert len(warnings) == 1 and "set max_downsample to 2" in warnings[0].getMessage()


# --- neutral settings and hygiene ---------------------------------------------------------------------

def test_ratio_zero_is_exactly_unpatched(sd15, plain):
    assert torch.equal(sample(tome(sd15, ratio=0.0), "sd15", steps=3, **SIZE), plain)


def test_factor_one_is_exactly_unpatched(sd15, plain):
    assert torch.equal(sample(todo(sd15, downsample_factor=1.0), "sd15", steps=3, **SIZE), plain)


@pytest.mark.parametrize("make", [tome, todo])
def test_outside_the_window_is_exactly_unpatched(sd15, plain, make):
    assert torch.equal(sample(make(sd15, NEVER), "sd15", steps=3, **SIZE), plain)


@pytest.mark.parametrize("make", [tome, todo])
def test_the_patch_speeds_up_by_changing_the_result_a_little(sd15, plain, make):
    result = sample(make(sd15), "sd15", steps=3, **SIZE)
    assert not torch.allclose(result, plain, rtol=1e-3, atol=1e-3) and torch.isfinite(result).all()


def test_random_destinations_never_touch_the_global_rng(core_nodes, sd15):
    state = torch.random.get_rng_state()
    sample(tome(sd15), "sd15", steps=2, **SIZE)
    assert torch.equal(torch.random.get_rng_state(), state)
    (core,) = checks.run_node(core_nodes["TomePatchModel"], model=sd15, ratio=0.5)
    sample(core, "sd15", steps=2, **SIZE)
    assert not torch.equal(torch.random.get_rng_state(), state)


def test_random_destinations_are_reproducible_with_an_ancestral_sampler(sd15):
    model = tome(sd15)
    first = sample(model, "sd15", steps=3, sampler="euler_ancestral", **SIZE)
    assert torch.equal(sample(model, "sd15", steps=3, sampler="euler_ancestral", **SIZE), first)


def test_the_seed_changes_the_random_destinations(sd15):
    assert not torch.equal(sample(tome(sd15, seed=0), "sd15", steps=2, **SIZE),
                           sample(tome(sd15, seed=1), "sd15", steps=2, **SIZE))


def test_query_metric_merges_differently(sd15):
    assert not torch.allclose(sample(tome(sd15, metric="query"), "sd15", steps=2, **SIZE),
                              sample(tome(sd15), "sd15", steps=2, **SIZE), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("make", [tome, todo])
def test_the_input_model_is_left_unchanged(sd15, make):
    before = checks.snapshot(sd15)
    make(sd15)
    checks.assert_unchanged(sd15, before)


# --- batches and sizes ---------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [tome, todo])
@pytest.mark.parametrize("batch", [2, 3])
def test_each_batch_item_gets_what_it_gets_alone(sd15, make, batch):
    model = make(sd15)
    noise = comfy.sample.prepare_noise(torch.zeros(batch, 4, 24, 24), 5)
    together = sample(model, "sd15", steps=2, batch=batch, noise=noise, **prompts("sd15"), **SIZE)
    for i in range(batch):
        close(together[i:i + 1], sample(model, "sd15", steps=2, noise=noise[i:i + 1], **prompts("sd15"), **SIZE))


@pytest.mark.parametrize("make", [tome, todo])
def test_chunked_cond_and_uncond_merge_alike(sd15, tiny_model, make):
    expected = sample(make(sd15), "sd15", steps=2, **SIZE)
    close(sample(make(tiny_model("sd15", chunked=True)), "sd15", steps=2, **SIZE), expected)


@pytest.mark.parametrize("make", [tome, todo])
@pytest.mark.parametrize("size", [(13, 22), (17, 9), (3, 3)])
def test_odd_non_square_and_tiny_latents_work(sd15, make, size):
    result = sample(make(sd15), "sd15", steps=2, height=size[0], width=size[1])
    assert result.shape[-2:] == size and torch.isfinite(result).all()


def test_tome_stacks_with_todo(sd15, plain):
    result = sample(todo(tome(sd15)), "sd15", steps=2, **SIZE)
    assert torch.isfinite(result).all()


# --- bad input ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [tome, todo])
def test_a_dit_is_a_clear_error(tiny_model, make):
    with pytest.raises(RuntimeError, match="works on UNet models"):
        make(tiny_model("flux"))


def test_max_downsample_must_be_a_power_of_two(sd15):
    with pytest.raises(ValueError, match="max_downsample must be 1, 2, 4 or 8, got 3"):
        tome(sd15, max_downsample=3)
