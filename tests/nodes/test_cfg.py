"""CFG-space and UNet-block nodes on tiny models, against ComfyUI's own nodes.

Parity where the semantics match, closed-form checks where PatchLab differs on
purpose, and the batch/chunking/window/degenerate-input behaviour core gets wrong.
"""

import comfy.sample
import pytest
import torch

from devtools import checks
from devtools.sampling import sample
from devtools.testkit import tiny_models
from patchlab.kernels import guidance
from patchlab.nodes import blocks, cfg

FULL = {"start_percent": 0.0, "end_percent": 1.0}
# One prompt pair for every item of a batch (ComfyUI repeats a batch-1 conditioning).
PROMPTS = {"positive": tiny_models.conditioning("sd15", seed=1), "negative": tiny_models.conditioning("sd15", seed=2)}
NEVER = {"start_percent": 1.0, "end_percent": 1.0}

# name: (our node, our inputs, core node id, core inputs)
PARITY = {
    "RescaleCFG": (cfg.RescaleCFG, {"multiplier": 0.7}, "RescaleCFG", {"multiplier": 0.7}),
    "RenormCFG": (cfg.RenormCFG, {"cfg_trunc": 100.0, "renorm_cfg": 1.0}, "RenormCFG",
                  {"cfg_trunc": 100.0, "renorm_cfg": 1.0}),
    "RenormCFG-truncating": (cfg.RenormCFG, {"cfg_trunc": 3.0, "renorm_cfg": 0.9}, "RenormCFG",
                             {"cfg_trunc": 3.0, "renorm_cfg": 0.9}),
    "CFGNorm": (cfg.CFGNorm, {"strength": 1.0}, "CFGNorm", {"strength": 1.0}),
    "APG": (cfg.AdaptiveProjectedGuidance, {"eta": 1.0, "norm_threshold": 5.0, "momentum": 0.0, "mode": "comfyui"},
            "APG", {"eta": 1.0, "norm_threshold": 5.0, "momentum": 0.0}),
    "APG-momentum": (cfg.AdaptiveProjectedGuidance,
                     {"eta": 0.3, "norm_threshold": 2.0, "momentum": -0.5, "mode": "comfyui"},
                     "APG", {"eta": 0.3, "norm_threshold": 2.0, "momentum": -0.5}),
    "TangentialDampingCFG": (cfg.TangentialDampingCFG, {}, "TCFG", {}),
    "Mahiro": (cfg.Mahiro, {}, "Mahiro", {}),
    "CFGZeroStar": (cfg.CFGZeroStar, {"mode": "comfyui", "zero_init_steps": 0}, "CFGZeroStar", {}),
    "FreSca": (cfg.FreSca, {"scale_low": 1.0, "scale_high": 1.25, "freq_cutoff": 20}, "FreSca",
               {"scale_low": 1.0, "scale_high": 1.25, "freq_cutoff": 20}),
    "FreSca-small-cutoff": (cfg.FreSca, {"scale_low": 1.3, "scale_high": 0.8, "freq_cutoff": 3}, "FreSca",
                            {"scale_low": 1.3, "scale_high": 0.8, "freq_cutoff": 3}),
    "FreeU": (blocks.FreeU, {"b1": 1.1, "b2": 1.2, "s1": 0.9, "s2": 0.2}, "FreeU",
              {"b1": 1.1, "b2": 1.2, "s1": 0.9, "s2": 0.2}),
    "FreeU_V2": (blocks.FreeU_V2, {"b1": 1.3, "b2": 1.4, "s1": 0.9, "s2": 0.2}, "FreeU_V2",
                 {"b1": 1.3, "b2": 1.4, "s1": 0.9, "s2": 0.2}),
}
OURS = {name: (node, inputs) for name, (node, inputs, _, _) in PARITY.items()}
OURS.update({
    "APG-paper": (cfg.AdaptiveProjectedGuidance, {"eta": 0.0, "norm_threshold": 5.0, "momentum": -0.5,
                                                  "mode": "paper"}),
    "CFGZeroStar-paper": (cfg.CFGZeroStar, {"mode": "paper", "zero_init_steps": 1}),
    # the paper's truncation of the late steps (those skip the negative pass, see test_guidance_skip.py)
    "RenormCFG-paper": (cfg.RenormCFG, {"cfg_trunc": 70.0, "renorm_cfg": 0.9, "truncate": "paper"}),
})


def close(actual, expected, rel=1e-4):
    """Equal up to float noise of batched/chunked evaluation (relative to the latent's scale)."""
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * float(expected.abs().max()))


def patch(model, name, window=FULL):
    node, inputs = OURS[name]
    (patched,) = checks.run_node(node, model=model, **inputs, **window)
    return patched


@pytest.fixture(scope="module")
def sd15(tiny_model):
    return tiny_model("sd15")


@pytest.fixture(scope="module")
def plain(sd15):
    return sample(sd15, "sd15", steps=3)


# --- parity with ComfyUI's nodes -------------------------------------------------------

@pytest.mark.parametrize("name", list(PARITY))
def test_same_sampled_latent_as_the_core_node(core_nodes, sd15, name):
    _, _, core_id, core_inputs = PARITY[name]
    (core,) = checks.run_node(core_nodes[core_id], model=sd15, **core_inputs)
    close(sample(patch(sd15, name), "sd15", steps=3), sample(core, "sd15", steps=3), rel=1e-5)


def test_differential_diffusion_matches_core(core_nodes, sd15):
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    mask = torch.linspace(0, 1, 16).view(1, 1, 1, 16).expand(1, 1, 16, 16).contiguous()
    (core,) = checks.run_node(core_nodes["DifferentialDiffusion"], model=sd15, strength=1.0)
    (ours,) = checks.run_node(cfg_nodes_inpaint().DifferentialDiffusion, model=sd15, strength=1.0)
    expected = sample(core, "sd15", steps=4, latent=latent, noise_mask=mask)
    close(sample(ours, "sd15", steps=4, latent=latent, noise_mask=mask), expected, rel=1e-5)


def cfg_nodes_inpaint():
    from patchlab.nodes import inpaint

    return inpaint


# --- every node ---------------------------------------------------------------------------

# FreSca's default cutoff (20) counts every frequency of a 16x16 latent as low: no change there.
@pytest.mark.parametrize("name", [n for n in OURS if n != "FreSca"])
def test_the_patch_changes_the_result(sd15, plain, name):
    assert not torch.allclose(sample(patch(sd15, name), "sd15", steps=3), plain, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", list(OURS))
def test_outside_the_window_the_result_is_plain_cfg_exactly(sd15, plain, name):
    assert torch.equal(sample(patch(sd15, name, NEVER), "sd15", steps=3), plain)


@pytest.mark.parametrize("name", list(OURS))
def test_each_batch_item_gets_what_it_gets_alone(sd15, name):
    model = patch(sd15, name)
    noise = comfy.sample.prepare_noise(torch.zeros(2, 4, 16, 16), 11)
    both = sample(model, "sd15", steps=3, batch=2, noise=noise, **PROMPTS)
    for i in range(2):
        close(both[i:i + 1], sample(model, "sd15", steps=3, batch=1, noise=noise[i:i + 1], **PROMPTS))


# A window that is not the whole run: the per-sample window masks meet cond and uncond stacked in one network
# call (FreeU's output-block patch sees 2B rows and B sigmas); found by the soak.
@pytest.mark.parametrize("name", list(OURS))
def test_each_batch_item_gets_what_it_gets_alone_with_a_partial_window(sd15, name):
    model = patch(sd15, name, {"start_percent": 0.0, "end_percent": 0.6})
    noise = comfy.sample.prepare_noise(torch.zeros(2, 4, 16, 16), 11)
    both = sample(model, "sd15", steps=3, batch=2, noise=noise, **PROMPTS)
    for i in range(2):
        close(both[i:i + 1], sample(model, "sd15", steps=3, batch=1, noise=noise[i:i + 1], **PROMPTS))


@pytest.mark.parametrize("name", list(OURS))
def test_chunked_cond_and_uncond_give_the_unchunked_result(sd15, tiny_model, name):
    expected = sample(patch(sd15, name), "sd15", steps=3)
    close(sample(patch(tiny_model("sd15", chunked=True), name), "sd15", steps=3), expected)


@pytest.mark.parametrize("name", list(OURS))
def test_cfg_one_gives_a_finite_result(sd15, name):
    assert torch.isfinite(sample(patch(sd15, name), "sd15", steps=3, cfg=1.0)).all()


@pytest.mark.parametrize("name", list(OURS))
def test_the_input_model_is_left_unchanged(sd15, name):
    before = checks.snapshot(sd15)
    patch(sd15, name)
    checks.assert_unchanged(sd15, before)


def hook_functions(model):
    options = model.model_options
    return options.get("sampler_pre_cfg_function", []), options.get("sampler_post_cfg_function", [])


@pytest.mark.parametrize("name", [n for n in OURS if not n.startswith("FreeU")])
@pytest.mark.parametrize("fill", ["zeros", "constant"])
def test_degenerate_predictions_give_finite_guidance(sd15, name, fill):
    value = 0.0 if fill == "zeros" else 0.25
    shape = (2, 4, 8, 8)
    x, cond, uncond = torch.full(shape, value), torch.full(shape, value), torch.full(shape, value)
    sigma = torch.tensor([1.0, 1.0])
    pre, post = hook_functions(patch(sd15, name))
    options = {"transformer_options": {"sample_sigmas": torch.tensor([14.6, 1.0, 0.0])}}
    for fn in pre:
        cond, uncond = fn({"conds": [[], []], "conds_out": [cond, uncond], "cond_scale": 5.0, "timestep": sigma,
                           "input": x, "sigma": sigma, "model": sd15.model, "model_options": options})[:2]
    denoised = guidance.cfg(cond, uncond, 5.0)
    for fn in post:
        denoised = fn({"denoised": denoised, "cond": [], "uncond": [], "cond_scale": 5.0, "model": sd15.model,
                       "uncond_denoised": uncond, "cond_denoised": cond, "sigma": sigma, "model_options": options,
                       "input": x})
    assert torch.isfinite(denoised).all() and torch.isfinite(cond).all() and torch.isfinite(uncond).all()


# --- the fixes, shown against core ---------------------------------------------------------------

def test_core_renorm_cfg_fails_at_batch_two_and_ours_does_not(core_nodes, sd15):
    (core,) = checks.run_node(core_nodes["RenormCFG"], model=sd15, cfg_trunc=100.0, renorm_cfg=1.0)
    with pytest.raises(RuntimeError):
        sample(core, "sd15", steps=2, batch=2)
    assert torch.isfinite(sample(patch(sd15, "RenormCFG"), "sd15", steps=2, batch=2)).all()


def test_core_mahiro_lets_batch_items_change_each_other(core_nodes, sd15):
    (core,) = checks.run_node(core_nodes["Mahiro"], model=sd15)
    noise = comfy.sample.prepare_noise(torch.zeros(2, 4, 16, 16), 11)
    both = sample(core, "sd15", steps=3, batch=2, noise=noise, **PROMPTS)
    alone = sample(core, "sd15", steps=3, batch=1, noise=noise[1:], **PROMPTS)
    assert not torch.allclose(both[1:], alone, rtol=1e-3, atol=1e-3 * float(alone.abs().max()))


def apg_once(model, cond, uncond, scale, x=None):
    (pre,), _ = hook_functions(model)
    x = torch.zeros_like(cond) if x is None else x
    return pre({"conds": [[], []], "conds_out": [cond, uncond], "cond_scale": scale, "timestep": torch.ones(1),
                "input": x, "sigma": torch.ones(1), "model": None, "model_options": {}})[0]


def test_apg_paper_mode_is_one_cfg_step_weaker_than_comfyui_mode(sd15):
    cond, uncond = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    inputs = {"eta": 0.5, "norm_threshold": 0.0, "momentum": 0.0, **FULL}
    (paper,) = checks.run_node(cfg.AdaptiveProjectedGuidance, model=sd15, mode="paper", **inputs)
    (comfy_mode,) = checks.run_node(cfg.AdaptiveProjectedGuidance, model=sd15, mode="comfyui", **inputs)
    update = guidance.apg_update(cond - uncond, cond, 0.5, 0.0)
    paper_result = guidance.cfg(apg_once(paper, cond, uncond, 4.0), uncond, 4.0)
    comfy_result = guidance.cfg(apg_once(comfy_mode, cond, uncond, 4.0), uncond, 4.0)
    torch.testing.assert_close(paper_result, cond + 3.0 * update, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(comfy_result, cond + 4.0 * update, rtol=1e-5, atol=1e-5)


def test_apg_paper_mode_without_damping_is_plain_cfg(sd15, plain):
    (model,) = checks.run_node(cfg.AdaptiveProjectedGuidance, model=sd15, eta=1.0, norm_threshold=0.0,
                               momentum=0.0, mode="paper", **FULL)
    close(sample(model, "sd15", steps=3), plain, rel=1e-5)


def test_apg_momentum_restarts_with_every_run(sd15):
    model = patch(sd15, "APG-paper")
    assert torch.equal(sample(model, "sd15", steps=3), sample(model, "sd15", steps=3))


def test_cfg_zero_star_paper_mode_differs_from_core_by_the_known_term(sd15):
    x, cond, uncond = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    scale = 4.0
    results = {}
    for mode in ("paper", "comfyui"):
        (model,) = checks.run_node(cfg.CFGZeroStar, model=sd15, mode=mode, zero_init_steps=0, **FULL)
        _, (post,) = hook_functions(model)
        results[mode] = post({"denoised": guidance.cfg(cond, uncond, scale), "cond_denoised": cond,
                              "uncond_denoised": uncond, "cond_scale": scale, "input": x, "sigma": torch.ones(1),
                              "model_options": {}})
    alpha = guidance.zero_star_alpha(x - cond, x - uncond)
    torch.testing.assert_close(results["paper"] - results["comfyui"], x * (1 - alpha) * (1 - scale),
                               rtol=1e-4, atol=1e-4)


def test_cfg_zero_star_zero_init_holds_the_sample_still_on_the_first_steps(sd15):
    (model,) = checks.run_node(cfg.CFGZeroStar, model=sd15, mode="paper", zero_init_steps=2, **FULL)
    _, (post,) = hook_functions(model)
    schedule = torch.tensor([14.6, 5.0, 1.0, 0.3, 0.0])
    x, cond, uncond = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    outputs = []
    for sigma in schedule[:-1]:
        outputs.append(post({"denoised": guidance.cfg(cond, uncond, 4.0), "cond_denoised": cond,
                             "uncond_denoised": uncond, "cond_scale": 4.0, "input": x, "sigma": sigma.view(1),
                             "model_options": {"transformer_options": {"sample_sigmas": schedule}}}))
    assert torch.equal(outputs[0], x) and torch.equal(outputs[1], x)
    assert not torch.equal(outputs[2], x)


def test_cfg_norm_strength_zero_disables_it(sd15, plain):
    (model,) = checks.run_node(cfg.CFGNorm, model=sd15, strength=0.0, **FULL)
    assert torch.equal(sample(model, "sd15", steps=3), plain)


def test_rescale_cfg_stacks_with_a_node_holding_the_cfg_function_slot(core_nodes, sd15):
    (slot_holder,) = checks.run_node(core_nodes["RenormCFG"], model=sd15, cfg_trunc=100.0, renorm_cfg=0.5)
    (stacked,) = checks.run_node(cfg.RescaleCFG, model=slot_holder, multiplier=0.7, **FULL)
    assert stacked.model_options["sampler_cfg_function"] is slot_holder.model_options["sampler_cfg_function"]
    result = sample(stacked, "sd15", steps=3)
    assert not torch.allclose(result, sample(slot_holder, "sd15", steps=3), rtol=1e-3, atol=1e-3)
    assert not torch.allclose(result, sample(patch(sd15, "RescaleCFG"), "sd15", steps=3), rtol=1e-3, atol=1e-3)


def test_rescale_cfg_on_a_flow_model_rescales_the_velocity(tiny_model):
    model = tiny_model("flux")
    (patched,) = checks.run_node(cfg.RescaleCFG, model=model, multiplier=1.0, **FULL)
    _, (post,) = hook_functions(patched)
    x, cond, uncond = torch.randn(1, 16, 8, 8), torch.randn(1, 16, 8, 8), torch.randn(1, 16, 8, 8)
    sigma = torch.tensor([0.6])
    out = post({"denoised": guidance.cfg(cond, uncond, 3.0), "cond_denoised": cond, "uncond_denoised": uncond,
                "cond_scale": 3.0, "input": x, "sigma": sigma, "model": model.model, "model_options": {}})
    velocity = (x - out) / 0.6
    torch.testing.assert_close(velocity.std(), ((x - cond) / 0.6).std(), rtol=1e-4, atol=1e-5)
    assert torch.isfinite(sample(patched, "flux", steps=3)).all()


@pytest.mark.parametrize("node", [blocks.FreeU, blocks.FreeU_V2])
def test_freeu_on_a_dit_is_a_clear_error(tiny_model, node):
    with pytest.raises(RuntimeError, match="works on UNet models .* has no UNet output blocks"):
        checks.run_node(node, model=tiny_model("flux"), b1=1.1, b2=1.2, s1=0.9, s2=0.2, **FULL)


def test_freeu_v2_on_a_flat_feature_map_is_finite(sd15):
    (model,) = checks.run_node(blocks.FreeU_V2, model=sd15, b1=1.3, b2=1.4, s1=0.9, s2=0.2, **FULL)
    patch_fn = model.model_options["transformer_options"]["patches"]["output_block_patch"][0]
    h, hsp = torch.ones(1, 128, 4, 4), torch.ones(1, 128, 4, 4)
    new_h, new_hsp = patch_fn(h, hsp, {"sigmas": torch.ones(1)})
    assert torch.isfinite(new_h).all() and torch.isfinite(new_hsp).all()
    torch.testing.assert_close(new_h[:, :64], torch.full((1, 64, 4, 4), 1.3))


def test_freeu_handles_sdxl_and_odd_latents(tiny_model):
    model = tiny_model("sdxl")
    (patched,) = checks.run_node(blocks.FreeU_V2, model=model, b1=1.3, b2=1.4, s1=0.9, s2=0.2, **FULL)
    result = sample(patched, "sdxl", steps=2, height=13, width=22)
    assert torch.isfinite(result).all()
    assert not torch.allclose(result, sample(model, "sdxl", steps=2, height=13, width=22), rtol=1e-3, atol=1e-3)


def test_fresca_on_a_video_latent_leaves_the_time_axis_alone(sd15):
    (model,) = checks.run_node(cfg.FreSca, model=sd15, scale_low=1.0, scale_high=1.5, freq_cutoff=2, **FULL)
    (pre,), _ = hook_functions(model)
    cond, uncond = torch.randn(1, 4, 5, 8, 8), torch.randn(1, 4, 5, 8, 8)
    args = {"conds": [[], []], "conds_out": [cond, uncond], "cond_scale": 5.0, "sigma": torch.ones(1),
            "input": torch.zeros_like(cond), "model_options": {}}
    filtered = pre(args)[0]
    for t in range(5):
        frame = pre({**args, "conds_out": [cond[:, :, t], uncond[:, :, t]]})[0]
        torch.testing.assert_close(filtered[:, :, t], frame, rtol=1e-5, atol=1e-5)


def test_window_switches_guidance_on_only_for_its_sigmas(sd15):
    (model,) = checks.run_node(cfg.RescaleCFG, model=sd15, multiplier=1.0, start_percent=0.5, end_percent=1.0)
    _, (post,) = hook_functions(model)
    start = sd15.get_model_object("model_sampling").percent_to_sigma(0.5)
    x, cond, uncond = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    args = {"denoised": guidance.cfg(cond, uncond, 5.0), "cond_denoised": cond, "uncond_denoised": uncond,
            "cond_scale": 5.0, "input": x, "model": sd15.model, "model_options": {}}
    assert torch.equal(post({**args, "sigma": torch.tensor([start * 1.5])}), args["denoised"])
    assert not torch.equal(post({**args, "sigma": torch.tensor([start * 0.5])}), args["denoised"])


@pytest.mark.parametrize("node", [cfg.RescaleCFG, blocks.FreeU])
def test_inverted_percents_are_flagged_before_the_run(node):
    assert "swap them" in node.VALIDATE_INPUTS(start_percent=0.7, end_percent=0.2)
    assert node.VALIDATE_INPUTS(start_percent=0.2, end_percent=0.7) is True
