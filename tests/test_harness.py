"""The harness itself: tiny models are real, deterministic, and can force chunked batches."""

import comfy.model_base
import comfy.model_patcher
import pytest
import torch

from devtools.sampling import sample
from devtools.testkit import tiny_models


def record_calls(model):
    calls = []

    def wrapper(apply_model, args):
        calls.append(list(args["cond_or_uncond"]))
        return apply_model(args["input"], args["timestep"], **args["c"])

    patched = model.clone()
    patched.set_model_unet_function_wrapper(wrapper)
    return patched, calls


@pytest.mark.parametrize("layout,base", [("sd15", comfy.model_base.BaseModel), ("sdxl", comfy.model_base.SDXL),
                                         ("flux", comfy.model_base.Flux)])
def test_tiny_models_are_real_comfyui_models(tiny_model, layout, base):
    model = tiny_model(layout)
    assert isinstance(model, comfy.model_patcher.ModelPatcher) and type(model.model) is base


def test_sdxl_layout_has_the_70_cross_attention_layers_of_sdxl(tiny_model):
    unet = tiny_model("sdxl").model.diffusion_model
    blocks = [m for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
    assert len(blocks) == 70


@pytest.mark.parametrize("layout", ["sd15", "sdxl", "flux"])
def test_sampling_is_deterministic_and_finite(tiny_model, layout):
    first = sample(tiny_model(layout), layout, steps=2)
    assert torch.isfinite(first).all()
    torch.testing.assert_close(sample(tiny_model(layout), layout, steps=2), first, rtol=0, atol=0)


def test_same_seed_same_weights():
    a = tiny_models.build_model("sd15", seed=3).model.state_dict()
    b = tiny_models.build_model("sd15", seed=3).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_chunked_model_runs_cond_and_uncond_in_separate_calls(tiny_model):
    plain, plain_calls = record_calls(tiny_model("sd15"))
    chunked, chunked_calls = record_calls(tiny_model("sd15", chunked=True))
    expected = sample(plain, "sd15", steps=2, batch=2)
    result = sample(chunked, "sd15", steps=2, batch=2)
    assert plain_calls == [[1, 0]] * 2
    assert sorted(map(tuple, chunked_calls)) == [(0,), (0,), (1,), (1,)]
    torch.testing.assert_close(result, expected, rtol=1e-4, atol=1e-3 * float(expected.abs().max()))
