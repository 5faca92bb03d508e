"""ModelSampling nodes against ComfyUI's own nodes on the same tiny models.

For every option: the sigma table, sigma(t), timestep(sigma), percent_to_sigma, the
prediction-type maps and the sampler's sigmas for every scheduler equal the core
node's to 1e-6; a short sampling run gives the same latent.
"""

import comfy.model_sampling as cms
import comfy.samplers
import pytest
import torch

from devtools import checks
from devtools.sampling import sample
from patchlab.kernels import sigma_schedules as ss
from patchlab.nodes import model_sampling as nodes

TOL = {"rtol": 1e-6, "atol": 1e-6}
COMFY_CLASSES = [
    cms.EPS, cms.V_PREDICTION, cms.EDM, cms.CONST, cms.X0, cms.IMG_TO_IMG, cms.COSMOS_RFLOW,
    cms.ModelSamplingDiscrete, cms.ModelSamplingDiscreteFlow, cms.ModelSamplingFlux,
    cms.ModelSamplingContinuousEDM, cms.ModelSamplingContinuousV, cms.ModelSamplingCosmosRFlow,
    cms.StableCascadeSampling,
]

# (our node, core id, layout, inputs)
CASES = (
    [(nodes.ModelSamplingDiscrete, "ModelSamplingDiscrete", "sd15", {"sampling": s, "zsnr": z})
     for s in ("eps", "v_prediction", "lcm", "x0", "img_to_img") for z in (False, True)]
    + [(nodes.ModelSamplingDiscrete, "ModelSamplingDiscrete", "sdxl", {"sampling": "v_prediction", "zsnr": True})]
    + [(nodes.ModelSamplingSD3, "ModelSamplingSD3", "flux", {"shift": s}) for s in (1.0, 3.0, 6.0)]
    + [(nodes.ModelSamplingAuraFlow, "ModelSamplingAuraFlow", "flux", {"shift": s}) for s in (1.0, 1.73)]
    + [(nodes.ModelSamplingFlux, "ModelSamplingFlux", "flux",
        {"max_shift": a, "base_shift": b, "width": w, "height": h})
       for a, b, w, h in ((1.15, 0.5, 1024, 1024), (1.15, 0.5, 512, 768), (2.0, 1.0, 1360, 768))]
    + [(nodes.ModelSamplingContinuousEDM, "ModelSamplingContinuousEDM", "sdxl",
        {"sampling": s, "sigma_max": 120.0, "sigma_min": 0.002})
       for s in ("v_prediction", "edm", "edm_playground_v2.5", "eps", "cosmos_rflow")]
    + [(nodes.ModelSamplingContinuousEDM, "ModelSamplingContinuousEDM", "sdxl",
        {"sampling": "edm", "sigma_max": 80.0, "sigma_min": 0.03})]
    + [(nodes.ModelSamplingContinuousV, "ModelSamplingContinuousV", "sd15",
        {"sampling": "v_prediction", "sigma_max": a, "sigma_min": b}) for a, b in ((500.0, 0.03), (120.0, 0.002))]
    + [(nodes.ModelSamplingStableCascade, "ModelSamplingStableCascade", "sd15", {"shift": s}) for s in (1.0, 2.0)]
)


def case_id(case):
    node, _, layout, inputs = case
    return f"{node.NODE_ID[9:]}-{layout}-" + "-".join(str(v) for v in inputs.values())


@pytest.fixture(scope="module", params=CASES, ids=[case_id(c) for c in CASES])
def patched_pair(request, core_nodes, tiny_model):
    """(core-patched model, PatchLab-patched model, input model, inputs) for one option."""
    node, core_id, layout, inputs = request.param
    model = tiny_model(layout)
    before = checks.snapshot(model)
    (core,) = checks.run_node(core_nodes[core_id], model=model, **inputs)
    (ours,) = checks.run_node(node, model=model, **inputs)
    checks.assert_unchanged(model, before)
    return core, ours, layout


def sampling(model):
    return model.get_model_object("model_sampling")


def time_grid(ms):
    """Timesteps covering the schedule: at table entries and half-way between them."""
    t = ms.timestep(ms.sigmas.float()).double()
    mids = (t[:-1] + t[1:]) / 2
    return torch.cat([t, mids])[:: max(1, (2 * len(t)) // 400)].float()


def sigma_grid(ms):
    """Sigmas at table entries and at the geometric means between them."""
    sigmas = ms.sigmas.float()
    mids = (sigmas[:-1] * sigmas[1:]).sqrt()
    return torch.cat([sigmas, mids])[:: max(1, (2 * len(sigmas)) // 400)]


def test_the_input_model_keeps_its_sampling(patched_pair, tiny_model):
    core, ours, layout = patched_pair
    assert sampling(ours) is not sampling(tiny_model(layout))
    assert "model_sampling" not in tiny_model(layout).object_patches


def test_same_comfyui_classes_so_isinstance_checks_agree(patched_pair):
    core, ours, _ = patched_pair
    for cls in COMFY_CLASSES:
        assert isinstance(sampling(ours), cls) == isinstance(sampling(core), cls), cls.__name__


def test_same_sigma_table(patched_pair):
    core, ours, _ = patched_pair
    torch.testing.assert_close(sampling(ours).sigmas, sampling(core).sigmas, **TOL)
    torch.testing.assert_close(sampling(ours).sigma_min, sampling(core).sigma_min, **TOL)
    torch.testing.assert_close(sampling(ours).sigma_max, sampling(core).sigma_max, **TOL)


def elementwise(fn, values):
    """fn over a 1-D tensor; core's Cosmos rflow sigma(t) takes one timestep at a time."""
    try:
        return fn(values)
    except RuntimeError:
        return torch.stack([torch.as_tensor(fn(v)) for v in values])


def test_same_sigma_of_timestep(patched_pair):
    core, ours, _ = patched_pair
    t = time_grid(sampling(core))
    torch.testing.assert_close(sampling(ours).sigma(t), elementwise(sampling(core).sigma, t), **TOL)


def test_same_timestep_of_sigma(patched_pair):
    core, ours, _ = patched_pair
    sigmas = sigma_grid(sampling(core))
    expected = sampling(core).timestep(sigmas)
    torch.testing.assert_close(sampling(ours).timestep(sigmas).to(expected.dtype), expected, **TOL)


@pytest.mark.parametrize("percent", [0.0, 0.001, 0.1, 0.5, 0.9, 0.999, 1.0])
def test_same_percent_to_sigma(patched_pair, percent):
    core, ours, _ = patched_pair
    assert sampling(ours).percent_to_sigma(percent) == pytest.approx(
        float(sampling(core).percent_to_sigma(percent)), rel=1e-6, abs=1e-6)


def test_same_prediction_maps(patched_pair):
    core, ours, _ = patched_pair
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    output = torch.randn(2, 4, 8, 8, generator=generator)
    table = sampling(core).sigmas
    sigma = torch.stack([table[len(table) // 3], table[-1]]).float()
    for name in ("calculate_input", "inverse_noise_scaling"):
        args = (sigma, x)
        torch.testing.assert_close(getattr(sampling(ours), name)(*args), getattr(sampling(core), name)(*args), **TOL)
    torch.testing.assert_close(sampling(ours).calculate_denoised(sigma, output, x),
                               sampling(core).calculate_denoised(sigma, output, x), **TOL)
    torch.testing.assert_close(sampling(ours).noise_scaling(sigma, output.clone(), x),
                               sampling(core).noise_scaling(sigma, output.clone(), x), **TOL)


@pytest.mark.parametrize("scheduler", comfy.samplers.SCHEDULER_NAMES)
def test_same_sampler_sigmas_for_every_scheduler(patched_pair, scheduler):
    core, ours, _ = patched_pair
    for steps in (1, 7, 20):
        expected = comfy.samplers.calculate_sigmas(sampling(core), scheduler, steps)
        actual = comfy.samplers.calculate_sigmas(sampling(ours), scheduler, steps)
        torch.testing.assert_close(actual, expected, equal_nan=True, **TOL)  # core's kl_optimal: nan at 1 step


def test_same_sampled_latent(patched_pair):
    core, ours, layout = patched_pair
    expected = sample(core, layout, steps=3)
    torch.testing.assert_close(sample(ours, layout, steps=3), expected, rtol=1e-5, atol=1e-5)


# --- beyond core -------------------------------------------------------------------

def test_zsnr_gives_zero_terminal_snr(tiny_model):
    model = tiny_model("sd15")
    (plain,) = checks.run_node(nodes.ModelSamplingDiscrete, model=model, sampling="v_prediction", zsnr=False)
    (zsnr,) = checks.run_node(nodes.ModelSamplingDiscrete, model=model, sampling="v_prediction", zsnr=True)
    assert float(ss.snr(sampling(plain).sigma_max)) > 4e-3
    assert float(ss.snr(sampling(zsnr).sigma_max)) < 1e-7
    assert float(sampling(zsnr).sigma_min) == pytest.approx(float(sampling(plain).sigma_min), rel=1e-6)


def test_sd3_table_follows_the_closed_form_shift(tiny_model):
    (patched,) = checks.run_node(nodes.ModelSamplingSD3, model=tiny_model("flux"), shift=3.0)
    t = torch.arange(1, 1001, dtype=torch.float64) / 1000
    torch.testing.assert_close(sampling(patched).sigmas.double(), 3 * t / (1 + 2 * t), rtol=1e-6, atol=1e-7)
    assert float(sampling(patched).sigma(torch.tensor(500.0))) == pytest.approx(0.75, rel=1e-6)


@pytest.mark.parametrize("latent_hw,pixels_hw", [((128, 128), (1024, 1024)), ((96, 170), (768, 1360))])
def test_flux_shift_from_the_latent_matches_the_pixel_size(core_nodes, tiny_model, latent_hw, pixels_hw):
    model = tiny_model("flux")
    latent = {"samples": torch.zeros(1, 16, *latent_hw)}
    (from_latent,) = checks.run_node(nodes.ModelSamplingFlux, model=model, max_shift=1.15, base_shift=0.5,
                                     width=16, height=16, latent=latent)
    (core,) = checks.run_node(core_nodes["ModelSamplingFlux"], model=model, max_shift=1.15, base_shift=0.5,
                              width=pixels_hw[1], height=pixels_hw[0])
    assert sampling(from_latent).shift == pytest.approx(sampling(core).shift, rel=1e-9)


def test_flux_shift_from_an_odd_latent_counts_the_padded_patches(tiny_model):
    model = tiny_model("flux")
    latent = {"samples": torch.zeros(1, 16, 33, 47)}
    (patched,) = checks.run_node(nodes.ModelSamplingFlux, model=model, max_shift=1.15, base_shift=0.5,
                                 width=1024, height=1024, latent=latent)
    assert sampling(patched).shift == pytest.approx(ss.flux_mu(17 * 24, 0.5, 1.15), rel=1e-12)


def test_lcm_uses_the_50_step_distilled_table(tiny_model):
    (patched,) = checks.run_node(nodes.ModelSamplingDiscrete, model=tiny_model("sd15"), sampling="lcm", zsnr=False)
    assert sampling(patched).sigmas.shape == (50,)
    assert int(sampling(patched).timestep(sampling(patched).sigmas[0:1])) == 19


@pytest.mark.parametrize("node", [nodes.ModelSamplingContinuousEDM, nodes.ModelSamplingContinuousV])
def test_continuous_nodes_reject_an_inverted_sigma_range(tiny_model, node):
    assert "must be larger than sigma_min" in node.VALIDATE_INPUTS(sigma_max=0.5, sigma_min=1.0)
    assert "must be above 0" in node.VALIDATE_INPUTS(sigma_max=10.0, sigma_min=0.0)
    assert node.VALIDATE_INPUTS(sigma_max=10.0, sigma_min=0.1) is True
    with pytest.raises(ValueError, match="sigma_max .* must be larger than sigma_min"):
        checks.run_node(node, model=tiny_model("sd15"), sampling=node.SAMPLINGS[0], sigma_max=0.5, sigma_min=1.0)


def test_continuous_validation_still_checks_the_declared_range():
    message = nodes.ModelSamplingContinuousEDM.VALIDATE_INPUTS(sigma_max=5000.0, sigma_min=0.1)
    assert "above its maximum" in message


# --- the tables are no buffers (ComfyUI issue 16490, dynamic VRAM) ------------------------------------------

def test_the_schedule_keeps_its_tables_out_of_the_module_buffers(patched_pair):
    _, ours, _ = patched_pair
    schedule = ours.get_model_object("model_sampling")
    assert torch.is_tensor(schedule.sigmas)
    assert not {"sigmas", "log_sigmas"} & {name for name, _ in schedule.named_buffers()}


def test_the_patched_model_holds_no_model_sampling_buffer_a_loader_would_back_up(patched_pair):
    _, ours, _ = patched_pair
    ours.patch_model()
    try:
        names = [name for name, _ in ours.model.named_buffers()]
    finally:
        ours.unpatch_model()
    assert not [name for name in names if name.startswith("model_sampling.")]


def test_a_buffer_written_back_by_path_leaves_the_schedule_as_it_was(patched_pair):
    _, ours, _ = patched_pair
    schedule = ours.get_model_object("model_sampling")
    before = schedule.sigmas.clone()
    schedule.register_buffer("sigmas", torch.zeros(3))  # what the dynamic loader's restore does
    assert torch.equal(schedule.sigmas, before)


def test_moving_the_schedule_moves_its_tables(tiny_model):
    (ours,) = checks.run_node(nodes.ModelSamplingSD3, model=tiny_model("flux"), shift=3.0)
    schedule = ours.get_model_object("model_sampling")
    moved = schedule.to(torch.float64)
    assert moved.sigmas.dtype == torch.float64
