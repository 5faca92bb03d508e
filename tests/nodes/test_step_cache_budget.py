"""PatchLab_StepCache's target_speedup: a budget of evaluations per batch item (a leaky-bucket credit), on every family.

Rows are counted at the network's first layer (indicator input) or its last (indicator first block, whose first
block runs on every step), never timed. A run of N calls at batch 1 with CFG has 2N rows; at target T the budget
allows ``1 + N/T`` evaluations of each row of a step, so at most ``total / T`` plus one step's rows.
"""

import logging
import math
import random

import comfy.sample
import comfy.samplers
import pytest
import torch

from devtools import checks
from devtools.sampling import sample
from devtools.testkit import tiny_models
from devtools.testkit.counting import count_rows
from patchlab.kernels import step_cache as kc
from patchlab.nodes import step_cache as nodes
from patchlab.patches import canvas

STEPS = 20
TOTAL = 2 * STEPS  # rows of a 20-step CFG run at batch 1
STEP_ROWS = 2      # one step's rows (cond and uncond)
LAYOUTS = ["sd15", "sdxl", "flux", "sd3", "wan21", "hunyuan_video", "zimage"]
LAST = {"sd15": "out", "flux": "final_layer", "wan21": "head"}
BASE = {"indicator": "input", "threshold": 0.3, "max_consecutive": 3, "reuse": "forecast", "start_percent": 0.0,
        "end_percent": 1.0}
DEFAULTS = {name: spec[1]["default"] for name, spec in nodes.StepCache.INPUT_TYPES()["required"].items()
            if name != "model"}
# threshold alone evaluates (nearly) every step at LOW, and at HIGH (without a cap on reuses) fewer than 40 / 3 rows
LOW = {"threshold": 0.01}
HIGH = {"threshold": 3.0, "max_consecutive": 100}

runs = checks.step_cache_runs


@pytest.fixture(autouse=True)
def info_logs(caplog):
    caplog.set_level(logging.INFO, logger="patchlab.patches.step_cache")


def cache(model, **overrides):
    return checks.run_node(nodes.StepCache, model=model, **{**BASE, **overrides})[0]


def rows(model, patched, layout, layer=None, steps=STEPS, **kwargs):
    with count_rows(model, layer) as counted:
        sample(patched, layout, steps=steps, **kwargs)
    return counted.rows


# --- the budget caps the rows and is spent, on every family ------------------------------------------------

@pytest.mark.parametrize("target", [2.0, 3.0])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_budget_caps_rows_where_the_threshold_alone_evaluates_more(tiny_model, layout, target):
    model = tiny_model(layout)
    assert rows(model, cache(model, **LOW), layout) > TOTAL / target + STEP_ROWS
    assert rows(model, cache(model, **LOW, target_speedup=target), layout) <= TOTAL / target + STEP_ROWS


@pytest.mark.parametrize("target", [2.0, 3.0])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_budget_caps_rows_where_the_threshold_alone_evaluates_fewer(tiny_model, layout, target):
    model = tiny_model(layout)
    assert rows(model, cache(model, **HIGH), layout) < TOTAL / target
    assert rows(model, cache(model, **HIGH, target_speedup=target), layout) <= TOTAL / target + STEP_ROWS


@pytest.mark.parametrize("target", [2.0, 3.0])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_budget_is_spent_at_a_tiny_threshold(tiny_model, layout, target):
    model = tiny_model(layout)
    assert rows(model, cache(model, threshold=0.001, target_speedup=target), layout) >= TOTAL / target - STEP_ROWS


@pytest.mark.parametrize("layout", sorted(LAST))
def test_first_block_budget_caps_the_rows_past_the_first_block(tiny_model, layout):
    model = tiny_model(layout)
    patched = cache(model, indicator="first block", threshold=0.01, target_speedup=2.0)
    assert rows(model, patched, layout, LAST[layout]) <= TOTAL / 2 + STEP_ROWS


# --- Wan 2.2's two experts: one budget per sampler's part of the schedule --------------------------------------

def advanced(core_nodes, model, latent, start, end, first_half):
    """One KSamplerAdvanced of Wan 2.2's two-expert workflow: 20 steps, this sampler's part start..end."""
    (out,) = checks.run_node(
        core_nodes["KSamplerAdvanced"], model=model, add_noise="enable" if first_half else "disable", noise_seed=3,
        steps=STEPS, cfg=4.0, sampler_name="euler", scheduler="simple",
        positive=tiny_models.conditioning("wan22", seed=1), negative=tiny_models.conditioning("wan22", seed=2),
        latent_image={"samples": latent}, start_at_step=start, end_at_step=end,
        return_with_leftover_noise="enable" if first_half else "disable")
    return out["samples"]


@pytest.mark.parametrize("target", [2.0, 3.0])
def test_wan22_each_expert_spends_its_own_budget_over_its_part(core_nodes, tiny_model, caplog, target):
    high, low = tiny_model("wan22", seed=0), tiny_model("wan22", seed=1)
    latent = tiny_models.empty_latent("wan22")
    with count_rows(high) as high_rows, count_rows(low) as low_rows:
        middle = advanced(core_nodes, cache(high, threshold=0.001, target_speedup=target), latent, 0, 10, True)
        advanced(core_nodes, cache(low, threshold=0.001, target_speedup=target), middle, 10, 20, False)
    part = TOTAL / 2  # each expert's 10 steps
    assert [run["steps"] for run in runs(caplog)] == [10, 10]
    for counted in (high_rows, low_rows):
        assert part / target - STEP_ROWS <= counted.rows <= part / target + STEP_ROWS


# --- batch items, the default, windows, max_consecutive -------------------------------------------------------

def item(conditioning, i):
    """Batch item ``i`` of a one-entry conditioning (its tensors and any per-item extras)."""
    tensor, extras = conditioning[0]
    return [[tensor[i:i + 1], {k: v[i:i + 1] if torch.is_tensor(v) and v.shape[:1] == tensor.shape[:1] else v
                               for k, v in extras.items()}]]


def test_batch_of_two_gives_each_item_what_it_gets_alone(tiny_model, caplog):
    """Item 1 starts from a strong picture (img2img), so its input changes less than item 0's and the two items
    spend their budgets on different steps."""
    model = tiny_model("sdxl")
    settings = {"threshold": 0.3, "max_consecutive": 3, "target_speedup": 2.0}
    latent = comfy.sample.fix_empty_latent_channels(model, tiny_models.empty_latent("sdxl", batch=2))
    latent[1] = 40.0 * torch.randn(latent[1].shape, generator=torch.Generator().manual_seed(3))
    noise = comfy.sample.prepare_noise(latent, 7)
    prompts = {"positive": tiny_models.conditioning("sdxl", 1, batch=2),
               "negative": tiny_models.conditioning("sdxl", 2, batch=2)}
    common = {"steps": 12, "denoise": 0.6}
    alone, rows_alone = [], []
    for i in range(2):
        with count_rows(model) as counted:
            alone.append(sample(cache(model, **settings), "sdxl", noise=noise[i:i + 1], latent=latent[i:i + 1],
                                **common, **{name: item(cond, i) for name, cond in prompts.items()}))
        rows_alone.append(counted.rows)
    runs(caplog)
    with count_rows(model) as counted:
        together = sample(cache(model, **settings), "sdxl", noise=noise, latent=latent, **common, **prompts)
    assert counted.rows == sum(rows_alone)
    assert runs(caplog)[-1]["partly"] > 0  # on some steps one item reused and the other was evaluated
    for i in range(2):
        torch.testing.assert_close(together[i:i + 1], alone[i], rtol=1e-4, atol=1e-4 * float(alone[i].abs().max()))


def test_target_zero_is_the_node_without_the_input_bit_for_bit(tiny_model, caplog):
    model = tiny_model("sd15")
    before = sample(checks.run_node(nodes.StepCache, model=model, **DEFAULTS)[0], "sd15", steps=STEPS)
    (without,) = runs(caplog)
    after = sample(checks.run_node(nodes.StepCache, model=model, **DEFAULTS, target_speedup=0.0)[0], "sd15",
                   steps=STEPS)
    (with_zero,) = runs(caplog)
    assert torch.equal(after, before) and with_zero == without
    assert without["reused_steps"] > 0


def test_steps_outside_the_window_are_evaluated_and_the_budget_still_holds(tiny_model):
    model = tiny_model("sd15")
    network = model.model.diffusion_model
    evaluated = []
    handle = network.register_forward_pre_hook(lambda _m, args: evaluated.append(round(float(args[1][0]), 2)))
    try:
        counted = rows(model, cache(model, threshold=0.001, start_percent=0.2, end_percent=0.8, target_speedup=2.0),
                       "sd15")
    finally:
        handle.remove()
    sampling = model.get_model_object("model_sampling")
    start, end = float(sampling.percent_to_sigma(0.2)), float(sampling.percent_to_sigma(0.8))
    outside = [round(float(sampling.timestep(s)), 2) for s in comfy.samplers.calculate_sigmas(
        sampling, "normal", STEPS)[:-1] if not end <= float(s) <= start]
    assert len(outside) >= 4 and set(outside) <= set(evaluated)
    assert counted <= TOTAL / 2 + STEP_ROWS


def test_budget_wins_over_max_consecutive_one(tiny_model):
    model = tiny_model("sd15")
    assert rows(model, cache(model, max_consecutive=1), "sd15") >= TOTAL / 2  # alone: every other step at most
    assert rows(model, cache(model, max_consecutive=1, target_speedup=3.0), "sd15") <= TOTAL / 3 + STEP_ROWS


# --- what the node says ------------------------------------------------------------------------------------------

def test_canvas_line_states_the_speedup_reached_and_the_target(tiny_model, caplog, monkeypatch):
    shown = []
    monkeypatch.setattr(canvas, "show", lambda node, text: shown.append((node, text)))
    model = tiny_model("sd15")
    patched = checks.run_node(nodes.StepCache, model=model, **{**BASE, "threshold": 0.001}, target_speedup=2.0,
                              unique_id="5")[0]
    sample(patched, "sd15", steps=STEPS)
    (run,) = runs(caplog)
    fewer = f"{TOTAL / run['full_rows']:.1f}x fewer (target 2x)"
    assert shown == [("5", f"evaluated {run['full_rows']} of {TOTAL} rows: {fewer}; {run['reused_steps']} of "
                           f"{STEPS} steps reused")]


def test_log_line_states_the_speedup_reached_and_the_target(tiny_model, caplog):
    model = tiny_model("sd15")
    sample(cache(model, threshold=0.001, target_speedup=2.5), "sd15", steps=STEPS)
    (line,) = [r.getMessage() for r in caplog.records if "PatchLab_StepCache: reused" in r.getMessage()]
    (run,) = runs(caplog)
    assert f"in extra passes; {TOTAL / run['full_rows']:.1f}x fewer (target 2.5x)" in line


@pytest.mark.parametrize("value", [-1.0, 0.5, math.nan, math.inf])
def test_bad_targets_are_refused_when_the_node_runs_with_what_to_do(tiny_model, value):
    with pytest.raises(ValueError, match=r"target_speedup is .*Set 0 to turn it off, or e\.g\. 2"):
        cache(tiny_model("sd15"), target_speedup=value)


@pytest.mark.parametrize("value,says", [(-1.0, "Set 0 to turn it off"), (0.5, "Set 0 to turn it off"),
                                        (11.0, "above its maximum"), (math.nan, "Give a number between"),
                                        (math.inf, "Give a number between")])
def test_bad_targets_are_refused_before_a_run_with_what_to_do(value, says):
    message = nodes.StepCache.VALIDATE_INPUTS(target_speedup=value)
    assert isinstance(message, str) and "target_speedup" in message and says in message


@pytest.mark.parametrize("value", [0.0, 1.0, 2.0, 10.0])
def test_good_targets_pass_validation(value):
    assert nodes.StepCache.VALIDATE_INPUTS(target_speedup=value) is True


# --- the credit rule itself (pure) -------------------------------------------------------------------------------

@pytest.mark.parametrize("target", [1.5, 2.0, 3.0, 4.0])
def test_the_rule_evaluates_at_most_one_plus_calls_over_target(target):
    """Random changes, thresholds and max_consecutive: never more than ``1 + calls / target`` evaluations."""
    chance = random.Random(int(target * 10))
    for _ in range(200):
        calls = chance.randint(1, 60)
        threshold, max_consecutive = chance.choice([0.0, 0.01, 0.3, 5.0]), chance.randint(1, 5)
        credit, reused, evaluations = 1.0, 0, 1  # the first call is always evaluated
        credit = kc.credit_after(credit, True, target)
        for k in range(1, calls):
            remaining = float(calls - 1 - k)
            evaluate = kc.budget_evaluates(chance.random(), credit, reused, threshold, max_consecutive, target,
                                           remaining)
            credit, reused = kc.credit_after(credit, evaluate, target), 0 if evaluate else reused + 1
            evaluations += evaluate
        assert evaluations <= 1 + calls / target + 1e-9


def test_the_remaining_calls_count_the_steps_left_and_those_outside_the_window():
    schedule = [10.0, 8.0, 6.0, 4.0, 2.0, 0.0]  # five steps
    assert kc.remaining_calls(schedule, 8.0, 2) == (3.0, 0.0)
    assert kc.remaining_calls(schedule, 8.0, 4, window=(9.0, 5.0)) == (6.0, 4.0)  # two calls a step so far
