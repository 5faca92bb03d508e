"""Quality on the trained reference models: what a node does to the picture, judged by the oracle.

Small and deterministic: every "<colour> <shape>" prompt with two seeds (36 samples),
euler, 20 steps, the model's recommended CFG, through ComfyUI's own sampler. The floors are
the values measured on the committed weights (manifests' "quality") less a margin: they
guard against regressions. The bar issue 21 sets for the models themselves (90 % colour,
80 % shape) is a strict xfail until the models are trained far enough to meet it.
"""

from __future__ import annotations

import functools

import pytest

from devtools.testkit.shapes import evaluate, models, oracle
from patchlab.nodes import cfg as cfg_nodes
from patchlab.nodes import deep_cache as dc_nodes
from patchlab.nodes import guidance_skip as skip_nodes
from patchlab.nodes import step_cache as sc_nodes

PROMPTS = evaluate.prompt_grid(2)
BAR_PROMPTS = evaluate.prompt_grid(8)  # 144 samples for the models' own bar and the guidance check
SPEC_COLOUR, SPEC_SHAPE = 0.90, 0.80
# Measured with these 36 samples on the committed weights (both right, colour, shape), less 5 points.
# Measured 2026-12-06 (sd15_shapes second stage, flux_shapes third): sd15_shapes colour 100 %, shape 100 %;
# flux_shapes colour 100 %, shape 69.4 % (on 144 samples, the bar's: sd15 98.6 % / 99.3 %, flux 100 % / 80.6 %;
# 36 are too few to tell 80 % apart).
FLOORS = {"sd15_shapes": {"accuracy_colour": 0.95, "accuracy_shape": 0.95},
          "flux_shapes": {"accuracy_colour": 0.95, "accuracy_shape": 0.64}}
MEETS_SPEC = {"sd15_shapes": True, "flux_shapes": True}
# Largest drop in prompt accuracy (both right) a speed node may cost at its defaults.
ACCURACY_MARGIN = 0.05
# PSNR floors (dB) against the full-compute pictures of the same seeds: measured, less 2 dB.
# Measured: StepCache 30.4 (sd15_shapes) and 36.7 dB (flux_shapes), DeepCache 29.7 dB.
PSNR_FLOOR = {("StepCache", "sd15_shapes"): 28.4, ("StepCache", "flux_shapes"): 34.7,
              ("DeepCache", "sd15_shapes"): 27.7}
# Where a node at its defaults costs more than ACCURACY_MARGIN today (measured on these 36 samples): strict
# xfails, so the test fails the day the defaults or the models change the answer. Issue 21, item 7.
OVER_MARGIN = {
    ("AdaptiveGuidance", "sd15_shapes"): "100 % -> 91.7 %: the 0.991 threshold stops CFG too early here",
    ("RenormCFG", "flux_shapes"): "69.4 % -> 63.9 % (one sample past the margin)",
}


def over_margin(label, name):
    reason = OVER_MARGIN.get((label, name))
    return pytest.mark.xfail(strict=True, reason=f"{label} on {name}: {reason}") if reason else ()


@functools.cache
def trained(name):
    return models.load(name)


@functools.cache
def classifier():
    return oracle.load()


@functools.cache
def reference():
    return oracle.reference_set(1000)


@functools.cache
def full(name, cfg=None):
    return evaluate.sample(trained(name), PROMPTS, cfg=cfg)


def judged(name, model=None, cfg=None, against_full=True):
    samples = full(name, cfg) if model is None else evaluate.sample(trained(name), PROMPTS, model=model, cfg=cfg)
    return evaluate.judge(samples, classifier(), reference(), full(name) if against_full else None)


@pytest.mark.parametrize("name", models.IMAGE_NAMES)
def test_uncached_samples_keep_their_measured_prompt_accuracy(name):
    result = judged(name)
    for key, floor in FLOORS[name].items():
        assert result[key] >= floor, result


@functools.cache
def bar_judged(name, cfg=None):
    """The model judged on BAR_PROMPTS (more samples than the node checks: 36 are too few to tell 80 % apart)."""
    return evaluate.judge(evaluate.sample(trained(name), BAR_PROMPTS, cfg=cfg), classifier(), reference())


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if MEETS_SPEC[n] else pytest.mark.xfail(
    strict=True, reason="not trained far enough yet for issue 21's bar")) for n in models.IMAGE_NAMES])
def test_uncached_samples_draw_90_percent_of_colours_and_80_percent_of_shapes_right(name):
    result = bar_judged(name)
    assert result["accuracy_colour"] >= SPEC_COLOUR and result["accuracy_shape"] >= SPEC_SHAPE, result


@pytest.mark.parametrize("name", models.IMAGE_NAMES)
def test_guidance_matters_cfg_1_is_worse_than_the_recommended_cfg(name):
    guided, plain = bar_judged(name), bar_judged(name, cfg=1.0)
    assert plain["accuracy_both"] < guided["accuracy_both"] or plain["fid"] > guided["fid"], (plain, guided)


SPEED_NODES = [
    ("StepCache", sc_nodes.StepCache, "sd15_shapes"),
    ("StepCache", sc_nodes.StepCache, "flux_shapes"),
    ("DeepCache", dc_nodes.DeepCache, "sd15_shapes"),
]


@pytest.mark.parametrize("label,node,name", SPEED_NODES, ids=[f"{a}-{c}" for a, _, c in SPEED_NODES])
def test_step_caches_at_their_defaults_keep_psnr_above_the_measured_floor(label, node, name):
    result = judged(name, evaluate.with_defaults(node, trained(name).model))
    assert result["psnr_db"] >= PSNR_FLOOR[(label, name)], result


@pytest.mark.parametrize("label,node,name", [pytest.param(a, b, c, marks=over_margin(a, c)) for a, b, c in SPEED_NODES],
                         ids=[f"{a}-{c}" for a, _, c in SPEED_NODES])
def test_step_caches_at_their_defaults_keep_prompt_accuracy_within_5_points(label, node, name):
    base = judged(name)
    result = judged(name, evaluate.with_defaults(node, trained(name).model))
    assert result["accuracy_both"] >= base["accuracy_both"] - ACCURACY_MARGIN, (result, base)


# Issue 37: StepCache with a budget of half the evaluations keeps prompt accuracy within 3 points of full compute.
TARGET_MARGIN = 0.03


@pytest.mark.parametrize("max_consecutive", [3, 2])
@pytest.mark.parametrize("name", models.IMAGE_NAMES)
def test_step_cache_at_target_speedup_2_keeps_prompt_accuracy_within_3_points(name, max_consecutive):
    base = judged(name)
    model = evaluate.with_defaults(sc_nodes.StepCache, trained(name).model, target_speedup=2.0,
                                   max_consecutive=max_consecutive)
    result = judged(name, model)
    assert result["accuracy_both"] >= base["accuracy_both"] - TARGET_MARGIN, (result, base)


SKIP_NODES = [
    ("GuidanceInterval", skip_nodes.GuidanceInterval),
    ("AdaptiveGuidance", skip_nodes.AdaptiveGuidance),
    ("RenormCFG", cfg_nodes.RenormCFG),
]


@pytest.mark.parametrize("label,node,name", [pytest.param(a, b, n, marks=over_margin(a, n))
                                             for a, b in SKIP_NODES for n in models.IMAGE_NAMES],
                         ids=[f"{a}-{n}" for a, _ in SKIP_NODES for n in models.IMAGE_NAMES])
def test_guidance_skipping_at_its_defaults_keeps_prompt_accuracy_within_5_points(label, node, name):
    base = judged(name)
    result = judged(name, evaluate.with_defaults(node, trained(name).model))
    assert result["accuracy_both"] >= base["accuracy_both"] - ACCURACY_MARGIN, (result, base)
