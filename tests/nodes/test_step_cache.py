"""PatchLab_StepCache on tiny SD1.5/SDXL/Flux/SD3/Lumina 2 models: exactness, counted rows, core caches, robustness."""

import dataclasses
import logging

import comfy.sample
import pytest
import torch

from devtools import checks
from devtools.sampling import sample
from devtools.testkit import tiny_models
from devtools.testkit.counting import count_rows
from patchlab.nodes import attention_guidance as ag_nodes
from patchlab.nodes import step_cache as nodes
from patchlab.nodes import token_merging as tm_nodes
from patchlab.patches import step_cache as sc

BASE = {"indicator": "input", "threshold": 0.3, "max_consecutive": 2, "reuse": "forecast", "start_percent": 0.0,
        "end_percent": 1.0}
DEEP = {"sd15": "out", "sdxl": "out", "flux": "final_layer", "sd3": "final_layer"}
LOGGER = "patchlab.patches.step_cache"
DEFAULTS = {name: spec[1]["default"] for name, spec in nodes.StepCache.INPUT_TYPES()["required"].items()
            if name != "model"}


def cache(model, **overrides):
    return checks.run_node(nodes.StepCache, model=model, **{**BASE, **overrides})[0]


def rel(a, b):
    return float((a - b).norm() / b.norm())


runs = checks.step_cache_runs


@pytest.fixture(autouse=True)
def info_logs(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)


@pytest.fixture(scope="module")
def sd15(tiny_model):
    return tiny_model("sd15")


# --- exactness and the log ------------------------------------------------------------------------

@pytest.mark.parametrize("layout,indicator", [("sd15", "input"), ("sd15", "first block"), ("flux", "first block"),
                                              ("sdxl", "first block")])
def test_threshold_zero_equals_unpatched_exactly(tiny_model, layout, indicator):
    model = tiny_model(layout)
    expected = sample(model, layout, steps=4)
    assert torch.equal(sample(cache(model, indicator=indicator, threshold=0.0), layout, steps=4), expected)


def test_a_window_covering_no_step_equals_unpatched_exactly(sd15):
    patched = cache(sd15, threshold=5.0, start_percent=1.0, end_percent=1.0)
    assert torch.equal(sample(patched, "sd15", steps=6), sample(sd15, "sd15", steps=6))


def test_patching_leaves_the_input_model_unchanged(sd15):
    before = checks.snapshot(sd15)
    cache(sd15, indicator="first block")
    checks.assert_unchanged(sd15, before)


def test_one_info_line_per_run(sd15, caplog):
    patched = cache(sd15)
    sample(patched, "sd15", steps=6)
    sample(patched, "sd15", steps=6)
    assert len(runs(caplog)) == 2


def test_input_rows_counted_match_the_decisions_logged(sd15, caplog):
    with count_rows(sd15) as counted:
        sample(cache(sd15, threshold=0.5), "sd15", steps=12)
    (run,) = runs(caplog)
    assert run["steps"] == 12 and run["reused_steps"] > 0
    assert counted.rows == run["full_rows"] == 2 * run["full_calls"]
    assert run["full_rows"] + run["reused_rows"] == 24


@pytest.mark.parametrize("layout", ["sd15", "flux"])
def test_first_block_rows_counted_match_the_decisions_logged(tiny_model, caplog, layout):
    model = tiny_model(layout)
    with count_rows(model) as first, count_rows(model, DEEP[layout]) as deep:
        sample(cache(model, indicator="first block", threshold=0.3, max_consecutive=3), layout, steps=12)
    (run,) = runs(caplog)
    assert run["reused_steps"] > 0
    assert deep.rows == run["full_rows"]
    assert first.rows == run["full_rows"] + run["reused_rows"]  # the first block runs on every step


# --- against core EasyCache and LazyCache (20 steps) ---------------------------------------------------

# StepCache settings that evaluate no more rows than the core node at its defaults and land closer (measured on
# the tiny models of devtools/testkit, 16x16 latent, euler/normal, cfg 5; the help page has the whole curve).
# Not in the table: EasyCache on Flux, which reuses no step at this size (it equals the uncached result, so nothing
# can land closer; see test_easycache_on_flux_reuses_nothing_where_step_cache_does).
CORE_DEFAULTS = {"reuse_threshold": 0.2, "start_percent": 0.15, "end_percent": 0.95, "verbose": False}
AGAINST_CORE = {
    ("sd15", "EasyCache"): {"threshold": 0.3, "max_consecutive": 2, "start_percent": 0.15},
    ("sdxl", "EasyCache"): {"threshold": 0.3, "max_consecutive": 3, "start_percent": 0.15},
    ("sd15", "LazyCache"): {"threshold": 0.6, "max_consecutive": 4, "start_percent": 0.15},
    ("sdxl", "LazyCache"): {"threshold": 0.6, "max_consecutive": 4, "start_percent": 0.15},
    ("flux", "LazyCache"): {"threshold": 0.1, "max_consecutive": 2},
}


@pytest.fixture(scope="module")
def uncached(tiny_model):
    results = {}

    def get(layout):
        if layout not in results:
            model = tiny_model(layout)
            with count_rows(model) as counted:
                results[layout] = (sample(model, layout, steps=20), counted.rows)
        return results[layout]

    return get


def measured(model, layout, patched):
    with count_rows(model, DEEP[layout]) as counted:
        out = sample(patched, layout, steps=20)
    return out, counted.rows


@pytest.mark.parametrize("layout,core", sorted(AGAINST_CORE))
def test_some_threshold_beats_the_core_cache_at_its_defaults(tiny_model, core_nodes, uncached, layout, core):
    model = tiny_model(layout)
    reference, _ = uncached(layout)
    theirs, their_rows = measured(model, layout, checks.run_node(core_nodes[core], model=model, **CORE_DEFAULTS)[0])
    ours, our_rows = measured(model, layout, cache(model, **AGAINST_CORE[(layout, core)]))
    assert our_rows <= their_rows
    assert rel(ours, reference) < rel(theirs, reference)


def test_easycache_on_flux_reuses_nothing_where_step_cache_does(tiny_model, core_nodes, uncached):
    model = tiny_model("flux")
    _, all_rows = uncached("flux")
    _, easy_rows = measured(model, "flux", checks.run_node(core_nodes["EasyCache"], model=model, **CORE_DEFAULTS)[0])
    _, our_rows = measured(model, "flux", checks.run_node(nodes.StepCache, model=model, **DEFAULTS)[0])
    assert easy_rows == all_rows
    assert our_rows <= 0.6 * all_rows


def test_defaults_halve_the_evaluations_within_one_percent_on_sd15_and_sdxl(tiny_model, uncached):
    for layout in ("sd15", "sdxl"):
        model = tiny_model(layout)
        reference, all_rows = uncached(layout)
        out, rows = measured(model, layout, checks.run_node(nodes.StepCache, model=model, **DEFAULTS)[0])
        assert rows <= all_rows // 2, layout
        assert rel(out, reference) < 0.01, layout


def test_forecast_lands_closer_than_plain_reuse_at_the_same_rows(sd15, uncached, caplog):
    reference, _ = uncached("sd15")
    forecast, forecast_rows = measured(sd15, "sd15", cache(sd15, threshold=0.5, reuse="forecast"))
    plain, plain_rows = measured(sd15, "sd15", cache(sd15, threshold=0.5, reuse="plain"))
    assert forecast_rows <= plain_rows
    assert rel(forecast, reference) < rel(plain, reference)


# --- robustness -----------------------------------------------------------------------------------------

def test_batch_of_two_reuses_and_matches_the_rows_logged(sd15, caplog):
    with count_rows(sd15) as counted:
        out = sample(cache(sd15, threshold=0.5), "sd15", steps=6, batch=2)
    (run,) = runs(caplog)
    assert out.shape[0] == 2 and torch.isfinite(out).all()
    assert run["reused_steps"] > 0 and counted.rows == run["full_rows"]
    assert run["full_rows"] + run["reused_rows"] == 4 * 6


def alone_and_together(model, layout, prompts, img2img=False, **settings):
    """(each item alone, both as one batch, rows alone, rows together): :func:`devtools.checks.alone_and_together`
    with StepCache at ``settings``."""
    return checks.alone_and_together(lambda: cache(model, **settings), model, layout, prompts, img2img)


# the items of these runs decide differently on some steps (found by trying thresholds on the tiny models)
DIVERGING = [("zimage", False, {"threshold": 0.2, "max_consecutive": 4}),
             ("sdxl", True, {"threshold": 0.2, "max_consecutive": 2})]


@pytest.mark.parametrize("layout,img2img,settings", DIVERGING, ids=[case[0] for case in DIVERGING])
def test_with_the_input_indicator_each_batch_item_gets_what_it_gets_alone(tiny_model, layout, img2img, settings,
                                                                           caplog):
    """Each item decides on its own; a step where only some reuse evaluates the others in a smaller call."""
    model = tiny_model(layout)
    prompts = {"positive": tiny_models.conditioning(layout, 1, batch=2),
               "negative": tiny_models.conditioning(layout, 2, batch=2)}
    alone, together, rows_alone, rows_together = alone_and_together(model, layout, prompts, img2img, **settings)
    assert rows_alone[0] != rows_alone[1]  # the two items decide differently: some calls are partial
    assert rows_together == sum(rows_alone)
    for i in range(2):
        torch.testing.assert_close(together[i:i + 1], alone[i], rtol=1e-4, atol=1e-4 * float(alone[i].abs().max()))
    assert runs(caplog)[-1]["partly"] > 0


def test_a_partial_call_cuts_the_controlnet_outputs_to_its_rows(tiny_model):
    import nodes as comfy_nodes

    model = tiny_model("sdxl")
    hint = torch.rand(1, 128, 128, 3, generator=torch.Generator().manual_seed(0))
    positive, negative = comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(
        tiny_models.conditioning("sdxl", 1, batch=2), tiny_models.conditioning("sdxl", 2, batch=2),
        tiny_models.build_controlnet("sdxl"), hint, 0.8, 0.0, 1.0)
    alone, together, rows_alone, rows_together = alone_and_together(
        model, "sdxl", {"positive": positive, "negative": negative}, True, threshold=0.2, max_consecutive=2)
    assert rows_alone[0] != rows_alone[1] and rows_together == sum(rows_alone)
    for i in range(2):
        torch.testing.assert_close(together[i:i + 1], alone[i], rtol=1e-4, atol=1e-4 * float(alone[i].abs().max()))


@pytest.mark.parametrize("indicator", ["input", "first block"])
def test_a_latent_size_change_between_runs_starts_fresh(sd15, indicator):
    patched = cache(sd15, indicator=indicator, threshold=0.5)
    sample(patched, "sd15", steps=6, height=16, width=16)
    after = sample(patched, "sd15", steps=6, height=24, width=16)
    assert torch.equal(after, sample(cache(sd15, indicator=indicator, threshold=0.5), "sd15", steps=6, height=24,
                                     width=16))


def test_a_steps_and_sampler_change_between_runs_starts_fresh(sd15):
    patched = cache(sd15, threshold=0.5)
    sample(patched, "sd15", steps=8)
    after = sample(patched, "sd15", steps=5, sampler="dpmpp_2m", scheduler="karras")
    fresh = sample(cache(sd15, threshold=0.5), "sd15", steps=5, sampler="dpmpp_2m", scheduler="karras")
    assert torch.equal(after, fresh)


def test_an_interrupted_run_leaves_nothing_behind(sd15, caplog):
    patched = cache(sd15, threshold=0.5)
    latent = tiny_models.empty_latent("sd15")
    noise = comfy.sample.prepare_noise(latent, 0)

    def interrupt(step, *_):
        if step == 3:
            raise KeyboardInterrupt("stop")

    with pytest.raises(KeyboardInterrupt):
        comfy.sample.sample(patched, noise, 8, 5.0, "euler", "normal", tiny_models.conditioning("sd15", seed=1),
                            tiny_models.conditioning("sd15", seed=2), latent, callback=interrupt, disable_pbar=True,
                            seed=0)
    assert runs(caplog)  # the interrupted run still logged and cleared its state
    after = sample(patched, "sd15", steps=8)
    assert torch.equal(after, sample(cache(sd15, threshold=0.5), "sd15", steps=8))


def test_fp16_model_reuses_and_stays_finite(tiny_model, caplog):
    model = tiny_model("sd15", dtype=torch.float16)
    out = sample(cache(model, indicator="first block", threshold=0.3, max_consecutive=3), "sd15", steps=10)
    (run,) = runs(caplog)
    assert torch.isfinite(out).all() and run["reused_steps"] > 0


def test_chunked_cond_uncond_gives_the_unchunked_decisions(tiny_model, caplog):
    plain = sample(cache(tiny_model("sd15"), threshold=0.5), "sd15", steps=10)
    (together,) = runs(caplog)
    chunked = sample(cache(tiny_model("sd15", chunked=True), threshold=0.5), "sd15", steps=10)
    (apart,) = runs(caplog)
    assert apart["full_calls"] == 2 * together["full_calls"] and apart["reused_steps"] == together["reused_steps"]
    torch.testing.assert_close(chunked, plain, rtol=1e-4, atol=1e-5 * float(plain.abs().max()))


@pytest.mark.parametrize("case", [
    {"denoise": 0.6},
    {"noise_mask": "half"},
    {"sampler": "euler_ancestral"},
    {"sampler": "dpmpp_2m_sde", "scheduler": "karras"},
    {"sampler": "dpmpp_2m", "scheduler": "karras"},
    {"sampler": "heun"},
], ids=["img2img", "inpaint", "ancestral", "sde", "multistep", "second-order"])
def test_samplers_and_modes_reuse_and_count_right(sd15, caplog, case):
    kwargs = dict(case)
    latent = None
    if kwargs.get("noise_mask") == "half":
        kwargs["noise_mask"] = torch.zeros(1, 1, 128, 128)
        kwargs["noise_mask"][..., 64:] = 1.0
    if "denoise" in kwargs or "noise_mask" in kwargs:
        latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    with count_rows(sd15) as counted:
        out = sample(cache(sd15, threshold=0.5), "sd15", steps=6, latent=latent, **kwargs)
    (run,) = runs(caplog)
    assert torch.isfinite(out).all() and run["reused_calls"] > 0
    assert counted.rows == run["full_rows"] + run["extra_rows"]


def test_core_pag_extra_pass_is_never_reused(sd15, core_nodes, caplog):
    pag = checks.run_node(core_nodes["PerturbedAttentionGuidance"], model=sd15, scale=3.0)[0]
    with count_rows(sd15) as counted:
        sample(cache(pag, threshold=10.0, max_consecutive=100), "sd15", steps=8)
    (run,) = runs(caplog)
    assert run["reused_steps"] >= 4  # main passes are reused ...
    assert run["extra_rows"] == 8  # ... the perturbed positive row of every step never is
    assert counted.rows == run["full_rows"] + run["extra_rows"]


def test_patchlab_pag_extra_pass_is_never_reused(sd15, caplog):
    pag = checks.run_node(ag_nodes.PerturbedAttentionGuidance, model=sd15, scale=3.0, blocks="middle", rescale=0.0,
                          start_percent=0.0, end_percent=1.0)[0]
    with count_rows(sd15) as counted:
        sample(cache(pag, indicator="first block", threshold=5.0, max_consecutive=100), "sd15", steps=8)
    (run,) = runs(caplog)
    assert run["reused_steps"] == 7 and run["extra_rows"] == 8
    assert counted.rows == run["full_rows"] + run["reused_rows"] + run["extra_rows"]


def test_composes_with_token_merging(sd15, caplog):
    tome = checks.run_node(tm_nodes.TokenMerging, model=sd15, ratio=0.5, max_downsample=1, stride_x=2, stride_y=2,
                           destinations="random", seed=0, metric="input", merge="queries, keys and values",
                           start_percent=0.0, end_percent=1.0)[0]
    with count_rows(sd15, "out") as counted:
        out = sample(cache(tome, indicator="first block", threshold=0.3, max_consecutive=3), "sd15", steps=10)
    (run,) = runs(caplog)
    assert torch.isfinite(out).all() and run["reused_steps"] > 0 and counted.rows == run["full_rows"]


def test_a_second_step_cache_replaces_the_first(sd15, caplog):
    twice = cache(cache(sd15, threshold=0.5), indicator="first block", threshold=0.0)
    assert torch.equal(sample(twice, "sd15", steps=6), sample(sd15, "sd15", steps=6))
    assert len(runs(caplog)) == 1


# --- families ---------------------------------------------------------------------------------------------

def test_first_block_works_on_sd3_whose_network_runs_no_diffusion_model_wrapper(tiny_model, caplog):
    model = tiny_model("sd3")
    with count_rows(model, DEEP["sd3"]) as deep:
        # the tiny random SD3's first block changes 60-130 % per step, hence the high threshold
        sample(cache(model, indicator="first block", threshold=2.0, max_consecutive=3), "sd3", steps=6)
    (run,) = runs(caplog)
    assert run["reused_steps"] > 0 and deep.rows == run["full_rows"]


def test_first_block_on_a_model_without_the_hook_names_the_supported_families(tiny_model):
    with pytest.raises(RuntimeError, match="Supported: SD1.x/SD2.x/SDXL UNets, Flux.*Use indicator 'input'"):
        cache(tiny_model("lumina2"), indicator="first block")


def test_input_indicator_works_on_any_model(tiny_model, caplog):
    out = sample(cache(tiny_model("lumina2"), threshold=0.5), "lumina2", steps=8)
    (run,) = runs(caplog)
    assert torch.isfinite(out).all() and run["reused_steps"] > 0


# --- validation --------------------------------------------------------------------------------------------

def test_validation_rejects_start_after_end():
    assert "swap" in nodes.StepCache.VALIDATE_INPUTS(start_percent=0.8, end_percent=0.2)


def test_validation_rejects_a_negative_threshold():
    assert "below its minimum" in nodes.StepCache.VALIDATE_INPUTS(threshold=-0.1)


def test_the_forecast_gain_is_a_field_of_the_spec_and_gain_zero_is_plain_reuse(tiny_model):
    model = tiny_model("sd15")
    inputs = {"indicator": "input", "threshold": 0.5, "max_consecutive": 3, "start_percent": 0.0, "end_percent": 1.0}
    forecast = nodes.StepCache.spec(model, reuse="forecast", **inputs)
    plain = sc.with_step_cache(model, nodes.StepCache.spec(model, reuse="plain", **inputs))
    gain_zero = sc.with_step_cache(model, dataclasses.replace(forecast, forecast_gain=0.0))
    default_gain = sc.with_step_cache(model, forecast)
    assert forecast.forecast_gain == 0.5
    assert torch.equal(sample(gain_zero, "sd15", steps=8), sample(plain, "sd15", steps=8))
    assert not torch.equal(sample(default_gain, "sd15", steps=8), sample(plain, "sd15", steps=8))
