"""Guidance that saves model calls: GuidanceInterval, AdaptiveGuidance, RenormCFG truncation, on tiny real models.

Speed is tested by the batch rows the network evaluates (``count_rows``), never by time:
n steps of which k have guidance off evaluate exactly ``(2n - k) * batch`` rows.
"""

import logging

import comfy.model_sampling
import comfy.samplers
import pytest
import torch

from devtools import checks
from devtools.sampling import sample
from devtools.testkit import tiny_models
from devtools.testkit.counting import count_rows
from patchlab.kernels.guidance_skip import prediction_similarity
from patchlab.nodes import attention_guidance, blocks, cfg, guidance_skip
from patchlab.patches import cfg as cfg_patches
from patchlab.patches import guidance_skip as skip
from patchlab.patches import once
from patchlab.patches.window import SigmaWindow

STEPS = 6
FULL = {"start_percent": 0.0, "end_percent": 1.0}
WINDOW = {"start_percent": 0.3, "end_percent": 0.8}


@pytest.fixture(scope="module")
def sd15(tiny_model):
    return tiny_model("sd15")


def interval(model, start_percent=0.3, end_percent=0.8):
    (patched,) = checks.run_node(guidance_skip.GuidanceInterval, model=model, start_percent=start_percent,
                                 end_percent=end_percent)
    return patched


def adaptive(model, threshold, start_percent=0.0):
    (patched,) = checks.run_node(guidance_skip.AdaptiveGuidance, model=model, threshold=threshold,
                                 start_percent=start_percent)
    return patched


def renorm(model, cfg_trunc, truncate, renorm_cfg=1.0, window=FULL):
    (patched,) = checks.run_node(cfg.RenormCFG, model=model, cfg_trunc=cfg_trunc, renorm_cfg=renorm_cfg,
                                 truncate=truncate, **window)
    return patched


def schedule(model, steps=STEPS):
    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps)[:-1].tolist()


def outside(model, start_percent, end_percent, steps=STEPS):
    """How many steps of the schedule lie outside the percent window."""
    window = SigmaWindow.from_percents(model, start_percent, end_percent)
    return sum(not window.sigma_end <= s <= window.sigma_start for s in schedule(model, steps))


def rows(model, layout="sd15", counted=None, **kwargs):
    with count_rows(counted or model) as count:
        result = sample(model, layout, **kwargs)
    return count, result


def recorder(model, log):
    """A clone recording, per step, what the CFG step saw (a post-CFG function appended last)."""
    patched = model.clone()

    def post_cfg(args):
        log.append((float(args["sigma"].max()),
                    prediction_similarity(args["input"], args["cond_denoised"], args["uncond_denoised"]),
                    torch.equal(args["cond_denoised"], args["uncond_denoised"])))
        return args["denoised"]
    patched.set_model_sampler_post_cfg_function(post_cfg)
    return patched


# --- counting what the model evaluates ------------------------------------------------------

@pytest.mark.parametrize("chunked", [False, True], ids=["batched", "chunked"])
@pytest.mark.parametrize("batch", [1, 2])
def test_steps_outside_the_interval_evaluate_one_pass(tiny_model, chunked, batch):
    model = tiny_model("sd15", chunked=chunked)
    k = outside(model, **WINDOW)
    assert 0 < k < STEPS
    count, _ = rows(interval(model), counted=model, steps=STEPS, batch=batch)
    assert count.rows == (2 * STEPS - k) * batch


def test_chunked_skipped_steps_make_one_call(tiny_model):
    model = tiny_model("sd15", chunked=True)
    count, _ = rows(interval(model), counted=model, steps=STEPS)
    assert len(count.calls) == 2 * STEPS - outside(model, **WINDOW)


def test_the_whole_schedule_window_is_plain_cfg(sd15):
    plain_count, plain = rows(sd15, steps=STEPS)
    count, result = rows(interval(sd15, 0.0, 1.0), counted=sd15, steps=STEPS)
    assert count.rows == plain_count.rows == 2 * STEPS
    assert torch.equal(result, plain)


@pytest.mark.parametrize("chunked", [False, True], ids=["batched", "chunked"])
def test_the_installed_mechanism_changes_nothing_where_every_step_is_guided(tiny_model, chunked):
    model = tiny_model("sd15", chunked=chunked)
    plain_count, plain = rows(model, steps=STEPS, batch=2)
    patched = skip.with_rule(model, skip.IntervalRule("test", SigmaWindow(1e9, 0.0)))
    count, result = rows(patched, counted=model, steps=STEPS, batch=2)
    assert count.rows == plain_count.rows == 2 * STEPS * 2
    assert torch.equal(result, plain)


def test_the_paper_interval_on_a_20_step_schedule(sd15):
    model = interval(sd15, guidance_skip.INTERVAL_START, guidance_skip.INTERVAL_END)
    count, _ = rows(model, counted=sd15, steps=20, height=8, width=8)
    sigmas = schedule(sd15, 20)
    assert count.rows == 2 * 20 - sum(not 0.279 <= s <= 5.43 for s in sigmas)


def test_a_flow_model_skips_too(tiny_model):
    model = tiny_model("flux")
    count, result = rows(interval(model), "flux", counted=model, steps=STEPS)
    assert count.rows == 2 * STEPS - outside(model, **WINDOW)
    assert torch.isfinite(result).all()


def test_the_input_model_is_left_unchanged(sd15):
    before = checks.snapshot(sd15)
    interval(sd15)
    adaptive(sd15, 0.9)
    renorm(sd15, 3.0, "comfyui")
    checks.assert_unchanged(sd15, before)


# --- what a skipped step computes ---------------------------------------------------------------

def one_step(model, sigma, cfg_scale=5.0):
    sigmas = torch.tensor([sigma, sigma * 0.7])
    return sample(model, "sd15", steps=1, cfg=cfg_scale, sigmas=sigmas)


def test_a_skipped_step_equals_a_cfg_1_step(sd15):
    high = schedule(sd15)[0]
    assert torch.equal(one_step(interval(sd15), high), one_step(sd15, high, cfg_scale=1.0))


def test_a_guided_step_is_plain_cfg(sd15):
    middle = schedule(sd15)[STEPS // 2]
    assert torch.equal(one_step(interval(sd15, 0.0, 1.0), middle), one_step(sd15, middle))
    window = SigmaWindow.from_percents(sd15, **WINDOW)
    assert window.sigma_end <= middle <= window.sigma_start
    assert torch.equal(one_step(interval(sd15), middle), one_step(sd15, middle))


def test_cfg_functions_see_the_positive_as_the_negative_at_skipped_steps(sd15):
    log = []
    sample(recorder(interval(sd15), log), "sd15", steps=STEPS)
    window = SigmaWindow.from_percents(sd15, **WINDOW)
    assert [same for _, _, same in log] == [not window.sigma_end <= s <= window.sigma_start for s, _, _ in log]


# --- RenormCFG ----------------------------------------------------------------------------------------

def renorm_without_skipping(model, cfg_trunc, truncate, renorm_cfg=1.0):
    """PatchLab_RenormCFG as it was before it skipped the negative pass: the post-CFG function alone."""
    channels = cfg_patches.unet_in_channels(model, default=4)
    trunc = skip.truncation(model, truncate, cfg_trunc)
    return cfg_patches.with_post_cfg(model, cfg_patches.renorm_cfg(trunc.mask, renorm_cfg, channels,
                                                                   SigmaWindow.always()))


@pytest.mark.parametrize("truncate,cfg_trunc", [("comfyui", 3.0), ("paper", 70.0)])
@pytest.mark.parametrize("batch", [1, 2])
def test_renorm_cfg_gives_its_old_result_with_fewer_rows(sd15, truncate, cfg_trunc, batch):
    old_count, old = rows(renorm_without_skipping(sd15, cfg_trunc, truncate, 0.9), counted=sd15, steps=STEPS,
                          batch=batch)
    count, new = rows(renorm(sd15, cfg_trunc, truncate, 0.9), counted=sd15, steps=STEPS, batch=batch)
    trunc = skip.truncation(sd15, truncate, cfg_trunc)
    k = sum(trunc.covers(s) for s in schedule(sd15))
    assert 0 < k < STEPS
    assert old_count.rows == 2 * STEPS * batch and count.rows == (2 * STEPS - k) * batch
    torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-5 * float(old.abs().max()))


def test_renorm_cfg_truncates_the_early_steps_by_default_and_the_late_ones_in_paper_mode(sd15):
    early, late = [], []
    sample(recorder(renorm(sd15, 3.0, "comfyui"), early), "sd15", steps=STEPS)
    sample(recorder(renorm(sd15, 70.0, "paper"), late), "sd15", steps=STEPS)
    assert [same for s, _, same in early] == [s >= 3.0 for s, _, _ in early]
    limit = float(sd15.get_model_object("model_sampling").percent_to_sigma(0.7))
    assert [same for s, _, same in late] == [s < limit for s, _, _ in late]
    assert late[-1][2] and not late[0][2]


@pytest.mark.parametrize("truncate", ["comfyui", "paper"])
def test_renorm_cfg_that_never_truncates_installs_no_skipping(sd15, truncate):
    model = renorm(sd15, 100.0, truncate)
    assert skip.rules_of(model) == ()
    count, _ = rows(model, counted=sd15, steps=3)
    assert count.rows == 6


def test_renorm_cfg_rejects_an_unknown_truncate_mode():
    assert "expected one of comfyui, paper" in cfg.RenormCFG.VALIDATE_INPUTS(truncate="late")


# --- AdaptiveGuidance ------------------------------------------------------------------------------

def test_threshold_one_is_plain_cfg(sd15):
    plain_count, plain = rows(sd15, steps=STEPS)
    count, result = rows(adaptive(sd15, 1.0), counted=sd15, steps=STEPS)
    assert count.rows == plain_count.rows and torch.equal(result, plain)


def plain_similarities(model, batch=1):
    log = []
    sample(recorder(model, log), "sd15", steps=STEPS, batch=batch)
    return [sim for _, sim, _ in log]


def first_exceeding(similarities, threshold):
    return next(i for i, sim in enumerate(similarities) if bool((sim > threshold).all()))


@pytest.mark.parametrize("batch", [1, 2])
def test_guidance_stops_after_the_first_step_above_the_threshold(sd15, batch):
    similarities = plain_similarities(sd15, batch)
    per_step = [float(s.min()) for s in similarities]
    threshold = sorted(per_step)[len(per_step) // 2] - 1e-6  # some steps below, some above
    stop = first_exceeding(similarities, threshold)
    assert 0 < stop < STEPS - 1
    log = []
    count, _ = rows(recorder(adaptive(sd15, threshold), log), counted=sd15, steps=STEPS, batch=batch)
    assert [same for _, _, same in log] == [i > stop for i in range(STEPS)]
    for i in range(stop + 1):  # identical run up to the stop: the same similarities
        torch.testing.assert_close(log[i][1], similarities[i])
    assert count.rows == (2 * STEPS - (STEPS - 1 - stop)) * batch


def test_every_batch_item_has_to_exceed_the_threshold(sd15):
    similarities = plain_similarities(sd15, batch=2)
    lows = [float(s.min()) for s in similarities]
    highs = [float(s.max()) for s in similarities]
    # a threshold only one item exceeds at some step: guidance stops only once both do
    step = next((i for i in range(STEPS - 1) if highs[i] > max(lows[:i + 1])), None)
    if step is None:
        pytest.skip("the two items' similarities never separate on this model")
    threshold = max(lows[:step + 1])
    stop = first_exceeding(similarities, threshold) if any(lo > threshold for lo in lows) else STEPS
    count, _ = rows(adaptive(sd15, threshold), counted=sd15, steps=STEPS, batch=2)
    assert stop > step
    assert count.rows == (2 * STEPS - max(STEPS - 1 - stop, 0)) * 2


def test_guidance_does_not_stop_before_start_percent(sd15):
    model = adaptive(sd15, 0.0, start_percent=0.5)  # any similarity exceeds 0: stops at the first checked step
    sigma_start = float(sd15.get_model_object("model_sampling").percent_to_sigma(0.5))
    first_checked = next(i for i, s in enumerate(schedule(sd15)) if s <= sigma_start)
    log = []
    sample(recorder(model, log), "sd15", steps=STEPS)
    assert [same for _, _, same in log] == [i > first_checked for i in range(STEPS)]


def test_the_stop_does_not_leak_into_the_next_run(sd15):
    model = adaptive(sd15, 0.0)
    first, _ = rows(model, counted=sd15, steps=STEPS)
    second, _ = rows(model, counted=sd15, steps=STEPS, batch=2)
    third, _ = rows(model, counted=sd15, steps=STEPS)
    assert first.rows == third.rows == STEPS + 1 and second.rows == 2 * (STEPS + 1)


def test_an_interrupted_run_leaves_nothing_behind(sd15):
    model = adaptive(sd15, 0.0)
    calls = []

    def stop_after_two(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        noise = torch.zeros(1, 4, 16, 16)
        comfy_sample_with_callback(model, noise, stop_after_two)
    count, _ = rows(model, counted=sd15, steps=STEPS)
    assert count.rows == STEPS + 1
    assert skip.STATE_KEY not in model.model_options
    assert skip.STATE_KEY not in model.model_options.get("transformer_options", {})


def comfy_sample_with_callback(model, noise, callback):
    import comfy.sample

    positive, negative = tiny_models.conditioning("sd15", seed=1), tiny_models.conditioning("sd15", seed=2)
    return comfy.sample.sample(model, noise, STEPS, 5.0, "euler", "normal", positive, negative, noise,
                               callback=callback, disable_pbar=True, seed=0)


def test_one_info_line_per_run_says_what_was_saved(sd15, caplog):
    model = adaptive(interval(sd15), 0.0)
    with caplog.at_level(logging.INFO, logger="patchlab.patches.guidance_skip"):
        sample(model, "sd15", steps=STEPS)
    lines = [r.getMessage() for r in caplog.records if r.name == "patchlab.patches.guidance_skip"]
    assert len(lines) == 1
    assert "left out of" in lines[0] and "PatchLab_AdaptiveGuidance" in lines[0]
    assert "PatchLab_GuidanceInterval" in lines[0]


# --- composition ------------------------------------------------------------------------------------

def test_chained_nodes_turn_guidance_off_wherever_any_of_them_does(sd15):
    renorm_model = renorm(interval(sd15), 3.0, "comfyui")
    log = []
    count, _ = rows(recorder(renorm_model, log), counted=sd15, steps=STEPS)
    window = SigmaWindow.from_percents(sd15, **WINDOW)
    expected = [s >= 3.0 or not window.sigma_end <= s <= window.sigma_start for s, _, _ in log]
    assert [same for _, _, same in log] == expected
    assert count.rows == 2 * STEPS - sum(expected)
    assert len(skip.rules_of(renorm_model)) == 2
    wrappers = renorm_model.get_wrappers(skip.CALC, skip.WRAPPER_KEY)
    assert len(wrappers) == 1


def test_the_order_of_cfg_space_nodes_does_not_matter(sd15):
    def rescale(model):
        return checks.run_node(cfg.RescaleCFG, model=model, multiplier=0.7, **FULL)[0]

    def apg(model):
        return checks.run_node(cfg.AdaptiveProjectedGuidance, model=model, eta=0.5, norm_threshold=5.0,
                               momentum=0.0, mode="paper", **FULL)[0]

    a = sample(apg(rescale(interval(sd15))), "sd15", steps=STEPS)
    b = sample(interval(apg(rescale(sd15))), "sd15", steps=STEPS)
    assert torch.equal(a, b)


def sag(model, **window):
    (patched,) = checks.run_node(attention_guidance.SelfAttentionGuidance, model=model, scale=0.5, blur_sigma=2.0,
                                 threshold=1.0, block="middle.0.0", **(window or FULL))
    return patched


def pag(model):
    (patched,) = checks.run_node(attention_guidance.PerturbedAttentionGuidance, model=model, scale=3.0,
                                 blocks="auto", rescale=0.0, **FULL)
    return patched


def test_sag_keeps_the_negative_pass_at_its_steps(sd15):
    sag_window = {"start_percent": 0.0, "end_percent": 0.5}
    model = sag(interval(sd15), **sag_window)
    count, result = rows(model, counted=sd15, steps=STEPS)
    sigmas = schedule(sd15)
    window = SigmaWindow.from_percents(sd15, **WINDOW)
    sag_on = SigmaWindow.from_percents(sd15, **sag_window)
    guided = [window.sigma_end <= s <= window.sigma_start or sag_on.sigma_end <= s <= sag_on.sigma_start
              for s in sigmas]
    sag_steps = sum(sag_on.sigma_end <= s <= sag_on.sigma_start for s in sigmas)
    assert count.rows == STEPS + sum(guided) + sag_steps
    assert torch.isfinite(result).all()


def test_pag_extra_passes_are_left_alone(sd15):
    count, _ = rows(pag(interval(sd15)), counted=sd15, steps=STEPS)
    assert count.rows == 2 * STEPS - outside(sd15, **WINDOW) + STEPS


def test_core_sag_keeps_every_negative_pass(core_nodes, sd15):
    (core_sag,) = checks.run_node(core_nodes["SelfAttentionGuidance"], model=interval(sd15), scale=0.5,
                                  blur_sigma=2.0)
    count, _ = rows(core_sag, counted=sd15, steps=STEPS)
    assert count.rows == 3 * STEPS


def test_core_rescale_cfg_in_the_cfg_function_slot_still_skips(core_nodes, sd15):
    (core,) = checks.run_node(core_nodes["RescaleCFG"], model=interval(sd15), multiplier=0.7)
    count, result = rows(core, counted=sd15, steps=STEPS)
    assert count.rows == 2 * STEPS - outside(sd15, **WINDOW)
    assert torch.isfinite(result).all()


def test_freeu_composes(sd15):
    (freeu,) = checks.run_node(blocks.FreeU_V2, model=interval(sd15), b1=1.3, b2=1.4, s1=0.9, s2=0.2, **FULL)
    count, result = rows(freeu, counted=sd15, steps=STEPS)
    assert count.rows == 2 * STEPS - outside(sd15, **WINDOW) and torch.isfinite(result).all()


# --- another node's calc-cond-batch function ---------------------------------------------------------

def with_slot(model, calls, own_batching):
    """A clone holding a calc-cond-batch function, as another pack would set it."""
    patched = model.clone()

    def calc(args):
        calls.append(args["conds"][1] is None)
        if own_batching:  # computes the predictions without comfy.samplers.calc_cond_batch (no wrappers run)
            return comfy.samplers._calc_cond_batch(args["model"], args["conds"], args["input"], args["sigma"],
                                                   args["model_options"])
        return comfy.samplers.calc_cond_batch(args["model"], args["conds"], args["input"], args["sigma"],
                                              args["model_options"])
    patched.set_model_sampler_calc_cond_batch_function(calc)
    return patched, calc


@pytest.mark.parametrize("own_batching", [False, True], ids=["calls-calc-cond-batch", "own-batching"])
def test_chaining_after_an_existing_calc_cond_batch_function(sd15, own_batching):
    calls = []
    holder, calc = with_slot(sd15, calls, own_batching)
    model = interval(holder)
    assert model.model_options["sampler_calc_cond_batch_function"].previous is calc
    count, _ = rows(model, counted=sd15, steps=STEPS)
    k = outside(sd15, **WINDOW)
    assert count.rows == 2 * STEPS - k
    assert len(calls) == STEPS and sum(calls) == k  # the other function ran at every step


def test_a_later_calc_cond_batch_function_that_calls_comfy_keeps_the_skipping(sd15):
    calls = []
    model, _ = with_slot(interval(sd15), calls, own_batching=False)
    count, _ = rows(model, counted=sd15, steps=STEPS)
    assert count.rows == 2 * STEPS - outside(sd15, **WINDOW) and len(calls) == STEPS


def test_a_later_function_that_bypasses_comfy_is_reported(sd15, caplog):
    calls = []
    model, _ = with_slot(interval(sd15), calls, own_batching=True)
    once._warned.clear()
    with caplog.at_level(logging.WARNING, logger="patchlab.patches.guidance_skip"):
        count, _ = rows(model, counted=sd15, steps=3)
    assert count.rows == 6
    assert any("apply the PatchLab node after that node" in r.getMessage() for r in caplog.records)


def test_a_second_skip_node_does_not_chain_the_slot_twice(sd15):
    holder, calc = with_slot(sd15, [], own_batching=True)
    model = adaptive(interval(holder), 0.9)
    assert model.model_options["sampler_calc_cond_batch_function"].previous is calc


# --- inputs ---------------------------------------------------------------------------------------------

def test_guidance_interval_rejects_a_reversed_window():
    assert "swap them" in guidance_skip.GuidanceInterval.VALIDATE_INPUTS(start_percent=0.8, end_percent=0.2)


def test_adaptive_guidance_rejects_a_threshold_above_one():
    assert "above its maximum" in guidance_skip.AdaptiveGuidance.VALIDATE_INPUTS(threshold=1.5, start_percent=0.0)


def test_the_default_interval_is_the_papers_sdxl_interval_on_the_sd_schedule():
    sampling = comfy.model_sampling.ModelSamplingDiscrete()
    assert abs(float(sampling.percent_to_sigma(guidance_skip.INTERVAL_START)) - 5.42) < 0.05
    assert abs(float(sampling.percent_to_sigma(guidance_skip.INTERVAL_END)) - 0.28) < 0.005
