"""PatchLab_SigmaSchedulePreview: the sigmas KSampler uses, and a chart of them."""

import comfy.samplers
import pytest
import torch

from devtools import checks
from patchlab.nodes import model_sampling as ms_nodes
from patchlab.nodes.schedule_preview import SigmaSchedulePreview
from patchlab.viz import sigma_plot


def ksampler_sigmas(model, scheduler, steps, denoise):
    return comfy.samplers.KSampler(model, steps=steps, device="cpu", sampler="euler", scheduler=scheduler,
                                   denoise=denoise, model_options=model.model_options).sigmas


@pytest.mark.parametrize("scheduler,steps,denoise", [
    ("normal", 20, 1.0), ("karras", 9, 1.0), ("simple", 12, 0.6), ("beta", 5, 0.35), ("sgm_uniform", 1, 1.0),
])
def test_sigmas_are_the_ones_ksampler_uses(tiny_model, scheduler, steps, denoise):
    model = tiny_model("sd15")
    _, sigmas = checks.run_node(SigmaSchedulePreview, model=model, scheduler=scheduler, steps=steps,
                                denoise=denoise, log_scale=False)
    torch.testing.assert_close(sigmas, ksampler_sigmas(model, scheduler, steps, denoise))


def test_sigmas_follow_a_model_sampling_patch(tiny_model):
    model = tiny_model("flux")
    (shifted,) = checks.run_node(ms_nodes.ModelSamplingSD3, model=model, shift=6.0)
    _, plain = checks.run_node(SigmaSchedulePreview, model=model, scheduler="simple", steps=10, denoise=1.0,
                               log_scale=False)
    _, after = checks.run_node(SigmaSchedulePreview, model=shifted, scheduler="simple", steps=10, denoise=1.0,
                               log_scale=False)
    assert torch.all(after[1:-1] > plain[1:-1])


def test_plot_is_a_comfyui_image(tiny_model):
    plot, _ = checks.run_node(SigmaSchedulePreview, model=tiny_model("sd15"), scheduler="karras", steps=8,
                              denoise=1.0, log_scale=True)
    assert plot.shape == (1, 512, 768, 3) and plot.dtype == torch.float32
    assert 0.0 <= float(plot.min()) and float(plot.max()) <= 1.0


def colour_pixels(image, rgb):
    target = torch.tensor(rgb, dtype=torch.float32) / 255
    return int(((image[0] - target).abs().sum(-1) < 0.02).sum())


def test_compare_model_adds_a_second_curve(tiny_model):
    model = tiny_model("sd15")
    (zsnr,) = checks.run_node(ms_nodes.ModelSamplingDiscrete, model=model, sampling="v_prediction", zsnr=True)
    single, _ = checks.run_node(SigmaSchedulePreview, model=zsnr, scheduler="normal", steps=10, denoise=1.0,
                                log_scale=True)
    both, _ = checks.run_node(SigmaSchedulePreview, model=zsnr, scheduler="normal", steps=10, denoise=1.0,
                              log_scale=True, compare_model=model)
    second = sigma_plot.PALETTE[1]
    assert colour_pixels(single, second) == 0
    assert colour_pixels(both, second) > 100


def test_zero_denoise_gives_an_empty_schedule_and_still_a_chart(tiny_model):
    plot, sigmas = checks.run_node(SigmaSchedulePreview, model=tiny_model("sd15"), scheduler="normal", steps=10,
                                   denoise=0.0, log_scale=False)
    assert sigmas.numel() == 0
    assert plot.shape == (1, 512, 768, 3)


def test_unknown_scheduler_is_a_clear_error(tiny_model):
    with pytest.raises(ValueError, match="unknown scheduler 'fancy'"):
        checks.run_node(SigmaSchedulePreview, model=tiny_model("sd15"), scheduler="fancy", steps=10, denoise=1.0,
                        log_scale=False)


def test_preview_leaves_the_model_unchanged(tiny_model):
    model = tiny_model("sd15")
    before = checks.snapshot(model)
    checks.run_node(SigmaSchedulePreview, model=model, scheduler="normal", steps=10, denoise=1.0, log_scale=False)
    checks.assert_unchanged(model, before)
