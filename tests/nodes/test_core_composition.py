"""PatchLab next to ComfyUI's own newer model patches, one rule each (docs/compatibility.md, the composition table).

* ``CFGOverride`` (ComfyUI 0.24) and PatchLab's guidance skipping: a step is guided only where
  no PatchLab rule turns guidance off; where one does, the negative pass is left out whatever
  cfg CFGOverride set; where none does, CFGOverride's cfg is the scale (cfg 1 there: ComfyUI
  itself leaves the negative out).
* ``EasyCache``/``LazyCache`` and ``PatchLab_StepCache``: refused, one step cache per model.
* ``NAGuidance`` (ComfyUI 0.14) and PatchLab's PAG/SEG/SLG: the extra pass carries the negative
  rows too, so both sides of the guidance direction are NAG-guided.
* ``TorchCompileModel``: PatchLab's wrappers and patches run around and inside the compiled
  network; rows are still saved and results equal eager ones within float tolerance.

Nodes a ComfyUI version lacks are skipped with the version that added them.
"""

import comfy.samplers
import pytest
import torch

from devtools import bootstrap, checks
from devtools.sampling import sample
from devtools.testkit.counting import count_rows
from patchlab.nodes import attention_guidance as ag_nodes
from patchlab.nodes import guidance_skip, step_cache
from patchlab.patches.window import SigmaWindow

STEPS = 8
VERSION = bootstrap.comfyui_version(bootstrap.comfyui_root())


def core(core_nodes, node_id: str, since: str):
    if node_id not in core_nodes:
        pytest.skip(f"ComfyUI {VERSION} has no {node_id} (added in ComfyUI {since})")
    return core_nodes[node_id]


@pytest.fixture(scope="module")
def sd15(tiny_model):
    return tiny_model("sd15")


def schedule(model, steps=STEPS):
    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps)[:-1].tolist()


def inside(model, start_percent, end_percent, sigma):
    window = SigmaWindow.from_percents(model, start_percent, end_percent)
    return window.sigma_end <= sigma <= window.sigma_start


def interval(model, start_percent, end_percent):
    return checks.run_node(guidance_skip.GuidanceInterval, model=model, start_percent=start_percent,
                           end_percent=end_percent)[0]


def override(core_nodes, model, cfg, start_percent=0.0, end_percent=1.0):
    node = core(core_nodes, "CFGOverride", "0.24")
    return checks.run_node(node, model=model, cfg=cfg, start_percent=start_percent, end_percent=end_percent)[0]


def with_cfg_per_sigma(model, scale_at):
    """Reference: plain CFG whose scale is ``scale_at(sigma)``, through ComfyUI's sampler CFG function slot."""
    patched = model.clone()

    def cfg_function(args):
        scale = scale_at(float(args["sigma"].flatten()[0]))
        return args["uncond"] + (args["cond"] - args["uncond"]) * scale

    patched.set_model_sampler_cfg_function(cfg_function)
    return patched


# --- CFGOverride ---------------------------------------------------------------------------------

def test_guidance_interval_turns_guidance_off_whatever_cfg_override_set(sd15, core_nodes):
    patched = override(core_nodes, interval(sd15, 0.4, 1.0), cfg=3.0)
    sigmas = schedule(sd15)
    guided = [inside(sd15, 0.4, 1.0, s) for s in sigmas]
    assert 0 < sum(guided) < STEPS
    with count_rows(sd15) as counted:
        out = sample(patched, "sd15", steps=STEPS, cfg=5.0)
    assert counted.rows == STEPS + sum(guided)
    expected = sample(with_cfg_per_sigma(sd15, lambda s: 3.0 if inside(sd15, 0.4, 1.0, s) else 1.0), "sd15",
                      steps=STEPS, cfg=5.0)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_cfg_override_to_one_leaves_the_negative_out_where_guidance_interval_guides(sd15, core_nodes):
    patched = override(core_nodes, interval(sd15, 0.0, 0.5), cfg=1.0, start_percent=0.0, end_percent=0.25)
    sigmas = schedule(sd15)
    guided = [inside(sd15, 0.0, 0.5, s) and not inside(sd15, 0.0, 0.25, s) for s in sigmas]
    assert 0 < sum(guided) < sum(inside(sd15, 0.0, 0.5, s) for s in sigmas)
    with count_rows(sd15) as counted:
        sample(patched, "sd15", steps=STEPS, cfg=5.0)
    assert counted.rows == STEPS + sum(guided)


def test_guidance_interval_and_cfg_override_give_the_same_result_in_either_order(sd15, core_nodes):
    first = sample(override(core_nodes, interval(sd15, 0.4, 1.0), cfg=3.0, end_percent=0.7), "sd15", steps=STEPS)
    second = sample(interval(override(core_nodes, sd15, cfg=3.0, end_percent=0.7), 0.4, 1.0), "sd15", steps=STEPS)
    assert torch.equal(first, second)


# --- EasyCache / LazyCache -------------------------------------------------------------------------

CORE_CACHE_INPUTS = {"reuse_threshold": 0.2, "start_percent": 0.15, "end_percent": 0.95, "verbose": False}
STEP_CACHE = {"indicator": "input", "threshold": 0.3, "max_consecutive": 2, "reuse": "forecast",
              "start_percent": 0.15, "end_percent": 1.0}


@pytest.mark.parametrize("cache", ["EasyCache", "LazyCache"])
def test_step_cache_refuses_a_model_that_already_has_a_core_cache(sd15, core_nodes, cache):
    cached = checks.run_node(core_nodes[cache], model=sd15, **CORE_CACHE_INPUTS)[0]
    with pytest.raises(RuntimeError, match=f"also has ComfyUI's {cache}.*Keep one"):
        checks.run_node(step_cache.StepCache, model=cached, **STEP_CACHE)


@pytest.mark.parametrize("cache", ["EasyCache", "LazyCache"])
def test_a_core_cache_applied_after_step_cache_stops_sampling_with_the_same_message(sd15, core_nodes, cache):
    ours = checks.run_node(step_cache.StepCache, model=sd15, **STEP_CACHE)[0]
    both = checks.run_node(core_nodes[cache], model=ours, **CORE_CACHE_INPUTS)[0]
    with pytest.raises(RuntimeError, match=f"also has ComfyUI's {cache}.*Keep one"):
        sample(both, "sd15", steps=STEPS)


def test_a_core_cache_alone_is_left_to_work(sd15, core_nodes):
    cached = checks.run_node(core_nodes["EasyCache"], model=sd15, **CORE_CACHE_INPUTS)[0]
    assert torch.isfinite(sample(cached, "sd15", steps=STEPS)).all()


# --- NAGuidance ----------------------------------------------------------------------------------

NAG_INPUTS = {"nag_scale": 5.0, "nag_alpha": 0.5, "nag_tau": 1.5}


def nag(core_nodes, model):
    return checks.run_node(core(core_nodes, "NAGuidance", "0.14"), model=model, **NAG_INPUTS)[0]


def seg(model, scale=3.0, blur_sigma=10.0):
    return checks.run_node(ag_nodes.SmoothedEnergyGuidance, model=model, scale=scale, blur_sigma=blur_sigma,
                           blocks="auto", start_percent=0.0, end_percent=1.0)[0]


def pag(model, scale=3.0):
    return checks.run_node(ag_nodes.PerturbedAttentionGuidance, model=model, scale=scale, blocks="auto",
                           rescale=0.0, start_percent=0.0, end_percent=1.0)[0]


@pytest.mark.parametrize("cfg", [1.0, 5.0])
def test_under_nag_the_extra_pass_carries_the_negative_rows(sd15, core_nodes, cfg):
    with count_rows(sd15) as counted:
        sample(pag(nag(core_nodes, sd15)), "sd15", steps=4, cfg=cfg)
    assert counted.calls == [2, 2] * 4  # NAG keeps the negative at cfg 1; the PAG pass holds both prompts


def test_without_nag_the_extra_pass_holds_the_positive_only(sd15):
    with count_rows(sd15) as counted:
        sample(pag(sd15), "sd15", steps=4)
    assert counted.calls == [2, 1] * 4


@pytest.mark.parametrize("layout", ["sd15", "flux"])
@pytest.mark.parametrize("order", ["nag first", "seg first"])
def test_a_perturbation_that_changes_nothing_adds_nothing_to_nag(tiny_model, core_nodes, layout, order):
    """SEG with blur 0 perturbs nothing: its direction must be zero, not NAG's own change times the scale.

    On the SD1.5 model NAG moves the result by up to 40; a perturbed pass without the negative rows
    would add SEG's scale times that (119); what remains is attention on a sub-batch in float32 (4e-4).
    """
    model = tiny_model(layout)
    alone = sample(nag(core_nodes, model), layout, steps=4, cfg=1.0)
    both = seg(nag(core_nodes, model), blur_sigma=0.0) if order == "nag first" else \
        nag(core_nodes, seg(model, blur_sigma=0.0))
    assert not torch.allclose(alone, sample(model, layout, steps=4, cfg=1.0), atol=1e-2)  # NAG does act
    torch.testing.assert_close(sample(both, layout, steps=4, cfg=1.0), alone, rtol=1e-3, atol=1e-3)


def test_seg_still_guides_under_nag(sd15, core_nodes):
    alone = sample(nag(core_nodes, sd15), "sd15", steps=4, cfg=1.0)
    assert not torch.allclose(sample(seg(nag(core_nodes, sd15)), "sd15", steps=4, cfg=1.0), alone, atol=1e-3)


# --- TorchCompileModel ---------------------------------------------------------------------------
# TorchCompileModel calls comfy_api.torch_helpers.set_torch_compile_wrapper(model, backend); the tests call it with
# the "aot_eager" backend (dynamo's graph capture with its graph breaks, no C++ code generation: a minute per
# model on the 2-core machine instead of five). Inductor itself was checked by hand (docs/compatibility.md,
# composition table).

COMPILED_STEP_CACHE = {**STEP_CACHE, "indicator": "first block", "start_percent": 0.0}


def compiled(model):
    from comfy_api.torch_helpers import set_torch_compile_wrapper

    patched = model.clone()
    set_torch_compile_wrapper(model=patched, backend="aot_eager")
    return patched


def deep_rows_and_result(model, patched, steps=12):
    with count_rows(model, "out") as counted:
        out = sample(patched, "sd15", steps=steps)
    return counted.rows, out


@pytest.mark.slow
def test_step_cache_saves_the_same_rows_on_a_compiled_model(sd15):
    eager_rows, eager = deep_rows_and_result(sd15, checks.run_node(step_cache.StepCache, model=sd15,
                                                                    **COMPILED_STEP_CACHE)[0])
    rows, out = deep_rows_and_result(sd15, checks.run_node(step_cache.StepCache, model=compiled(sd15),
                                                           **COMPILED_STEP_CACHE)[0])
    assert eager_rows < 24
    assert rows == eager_rows
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_guidance_interval_saves_the_same_rows_on_a_compiled_model(sd15):
    eager_rows, eager = deep_rows_and_result(sd15, interval(sd15, 0.0, 0.5))
    rows, out = deep_rows_and_result(sd15, interval(compiled(sd15), 0.0, 0.5))
    assert eager_rows < 24
    assert rows == eager_rows
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)
