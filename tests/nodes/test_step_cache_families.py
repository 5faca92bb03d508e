"""PatchLab_StepCache on the families people run now: Wan 2.1/2.2, HunyuanVideo, Z-Image, Flux.2, Chroma, Qwen-Image
(and AuraFlow).

Exactness at threshold 0, rows counted at the first layer (and at the last, where the first
block runs on every step) against the decisions the run logs, the clear error where a family
has no first-block hook, and a change of frame count and size between runs of one patched
video model.
"""

import logging

import comfy.samplers
import pytest
import torch

from devtools import checks
from devtools.sampling import sample
from devtools.testkit import tiny_models
from devtools.testkit.counting import count_rows
from patchlab.nodes import step_cache as nodes

LAYOUTS = ["wan21", "wan22", "hunyuan_video", "zimage", "flux2", "chroma", "qwen_image", "auraflow"]
FIRST_BLOCK = ["wan21", "wan22", "hunyuan_video", "flux2", "chroma", "qwen_image", "auraflow"]
VIDEO = ["wan21", "wan22", "hunyuan_video"]
LAST = {"wan21": "head", "wan22": "head", "hunyuan_video": "final_layer", "zimage": "final_layer",
        "flux2": "final_layer", "chroma": "final_layer", "qwen_image": "proj_out", "auraflow": "final_linear"}
BASE = {"indicator": "input", "threshold": 0.5, "max_consecutive": 2, "reuse": "forecast", "start_percent": 0.0,
        "end_percent": 1.0}


@pytest.fixture(autouse=True)
def info_logs(caplog):
    caplog.set_level(logging.INFO, logger="patchlab.patches.step_cache")


def cache(model, **overrides):
    return checks.run_node(nodes.StepCache, model=model, **{**BASE, **overrides})[0]


def logged_run(caplog):
    (run,) = checks.step_cache_runs(caplog)
    return run


@pytest.mark.parametrize("layout,indicator", [(layout, "input") for layout in LAYOUTS] +
                         [(layout, "first block") for layout in FIRST_BLOCK])
def test_threshold_zero_equals_unpatched_exactly(tiny_model, layout, indicator):
    model = tiny_model(layout)
    expected = sample(model, layout, steps=6)
    assert torch.equal(sample(cache(model, indicator=indicator, threshold=0.0), layout, steps=6), expected)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_input_indicator_rows_counted_match_the_decisions_logged(tiny_model, caplog, layout):
    model = tiny_model(layout)
    with count_rows(model) as counted:
        sample(cache(model), layout, steps=10)
    run = logged_run(caplog)
    assert run["reused_steps"] > 0
    assert counted.rows == run["full_rows"] and run["full_rows"] + run["reused_rows"] == 20


@pytest.mark.parametrize("layout", FIRST_BLOCK)
def test_first_block_rows_counted_match_the_decisions_logged(tiny_model, caplog, layout):
    model = tiny_model(layout)
    with count_rows(model) as first, count_rows(model, LAST[layout]) as last:
        sample(cache(model, indicator="first block", threshold=2.0, max_consecutive=3), layout, steps=10)
    run = logged_run(caplog)
    assert run["reused_steps"] > 0
    assert last.rows == run["full_rows"]
    assert first.rows == run["full_rows"] + run["reused_rows"]  # the first block runs on every step


def test_first_block_on_zimage_names_the_families_that_have_the_hook(tiny_model):
    with pytest.raises(RuntimeError, match=r"first block.*NextDiT.*Wan 2.1/2.2, HunyuanVideo, AuraFlow \(tested\); "
                                           r"Wan VACE / camera / HuMo, LTX-Video, Mochi \(same hook, untested\)"
                                           r".*indicator 'input'"):
        cache(tiny_model("zimage"), indicator="first block")


@pytest.mark.parametrize("indicator", ["input", "first block"])
@pytest.mark.parametrize("layout", VIDEO)
def test_frame_count_and_size_changes_between_runs_start_fresh(tiny_model, layout, indicator):
    model = tiny_model(layout)
    works = [(3, 8, 8), (5, 6, 10), (3, 8, 8)]
    patched = cache(model, indicator=indicator, threshold=2.0 if indicator == "first block" else 0.5)
    for frames, height, width in works:
        latent = tiny_models.empty_latent(layout, height, width, frames=frames)
        fresh = cache(model, indicator=indicator, threshold=2.0 if indicator == "first block" else 0.5)
        expected = sample(fresh, layout, steps=6, latent=latent)
        assert torch.equal(sample(patched, layout, steps=6, latent=latent), expected), (frames, height, width)


# --- Wan 2.2's two experts ---------------------------------------------------------------------------------

def advanced(core_nodes, model, latent, start, end, first_half):
    """One KSamplerAdvanced of Wan 2.2's two-expert workflow: 10 steps, this sampler's part start..end."""
    (out,) = checks.run_node(
        core_nodes["KSamplerAdvanced"], model=model, add_noise="enable" if first_half else "disable", noise_seed=3,
        steps=10, cfg=4.0, sampler_name="euler", scheduler="simple", positive=tiny_models.conditioning("wan22", seed=1),
        negative=tiny_models.conditioning("wan22", seed=2), latent_image={"samples": latent}, start_at_step=start,
        end_at_step=end, return_with_leftover_noise="enable" if first_half else "disable")
    return out["samples"]


def test_wan22_two_experts_each_cache_as_its_half_alone_and_never_across_the_switch(core_nodes, tiny_model, caplog):
    """High-noise expert on steps 0-5, low-noise expert on 5-10, a StepCache on each (Wan 2.2's workflow): each
    sampler's run decides as that half run alone, and the low-noise expert evaluates its first step in full
    (nothing of the high-noise expert's is reused after the switch)."""
    high, low = tiny_model("wan22", seed=0), tiny_model("wan22", seed=1)
    latent = tiny_models.empty_latent("wan22")
    full_steps = []
    handle = low.model.diffusion_model.register_forward_pre_hook(lambda _m, args: full_steps.append(float(args[1][0])))
    try:
        middle = advanced(core_nodes, cache(high), latent, 0, 5, first_half=True)
        result = advanced(core_nodes, cache(low), middle, 5, 10, first_half=False)
    finally:
        handle.remove()
    together = checks.step_cache_runs(caplog)
    sampling = low.model.model_sampling
    switch = comfy.samplers.calculate_sigmas(sampling, "simple", 10)[5]  # the low-noise expert's first sigma
    assert full_steps[0] == pytest.approx(float(sampling.timestep(switch)))
    assert [run["steps"] for run in together] == [5, 5] and all(run["reused_steps"] > 0 for run in together)
    alone_middle = advanced(core_nodes, cache(high), latent, 0, 5, first_half=True)
    (alone_first,) = checks.step_cache_runs(caplog)
    alone_result = advanced(core_nodes, cache(low), alone_middle, 5, 10, first_half=False)
    (alone_second,) = checks.step_cache_runs(caplog)
    assert torch.equal(middle, alone_middle) and torch.equal(result, alone_result)
    assert together == [alone_first, alone_second]
