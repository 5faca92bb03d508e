"""The DiT layouts of the test kit (SD3 MMDiT, Lumina 2 NextDiT, Qwen-Image): real models that sample like KSampler."""

from __future__ import annotations

import comfy.ldm.lumina.model
import comfy.ldm.modules.diffusionmodules.mmdit
import comfy.ldm.qwen_image.model
import comfy.model_base
import comfy.model_patcher
import comfy.model_sampling
import pytest
import torch

from devtools import workflows
from devtools.sampling import sample
from devtools.testkit import tiny_models
from devtools.testkit.counting import count_rows, first_layer_name

DIT_LAYOUTS = [
    ("sd3", comfy.model_base.SD3, comfy.ldm.modules.diffusionmodules.mmdit.MMDiT, "x_embedder"),
    ("lumina2", comfy.model_base.Lumina2, comfy.ldm.lumina.model.NextDiT, "x_embedder"),
    ("qwen_image", comfy.model_base.QwenImage, comfy.ldm.qwen_image.model.QwenImageTransformer2DModel, "img_in"),
]
NAMES = [entry[0] for entry in DIT_LAYOUTS]
# Qwen-Image is a FLUX-type model (flow with a resolution-independent shift) with a frame axis in its latent.
SAMPLING = {"sd3": comfy.model_sampling.ModelSamplingDiscreteFlow,
            "lumina2": comfy.model_sampling.ModelSamplingDiscreteFlow,
            "qwen_image": comfy.model_sampling.ModelSamplingFlux}
FRAMES = {"qwen_image": (1,)}


def record_calls(model):
    calls = []

    def wrapper(apply_model, args):
        calls.append(list(args["cond_or_uncond"]))
        return apply_model(args["input"], args["timestep"], **args["c"])

    patched = model.clone()
    patched.set_model_unet_function_wrapper(wrapper)
    return patched, calls


@pytest.mark.parametrize("layout,base,network,_first", DIT_LAYOUTS)
def test_dit_layout_is_a_real_comfyui_model_of_its_family(tiny_model, layout, base, network, _first):
    model = tiny_model(layout)
    assert isinstance(model, comfy.model_patcher.ModelPatcher) and type(model.model) is base
    assert isinstance(model.model.diffusion_model, network)


@pytest.mark.parametrize("layout", NAMES)
def test_dit_layout_is_a_16_channel_flow_model(tiny_model, layout):
    model = tiny_model(layout)
    assert model.model.latent_format.latent_channels == 16
    assert isinstance(model.model.model_sampling, SAMPLING[layout])


def test_sd3_layout_has_joint_blocks_with_sd35_dual_attention_in_the_first(tiny_model):
    network = tiny_model("sd3").model.diffusion_model
    assert len(network.joint_blocks) == 3
    assert [block.x_block.x_block_self_attn for block in network.joint_blocks] == [True, False, False]
    assert network.joint_blocks[-1].context_block.pre_only


def test_sd3_layout_takes_the_pooled_output_and_context_of_its_conditioning(tiny_model):
    network = tiny_model("sd3").model.diffusion_model
    context, extras = tiny_models.conditioning("sd3")[0]
    assert network.y_embedder.mlp[0].in_features == extras["pooled_output"].shape[-1]
    assert network.context_embedder.in_features == context.shape[-1]


def test_lumina2_layout_has_refiners_before_its_single_stream_layers(tiny_model):
    network = tiny_model("lumina2").model.diffusion_model
    assert (len(network.context_refiner), len(network.noise_refiner), len(network.layers)) == (1, 1, 2)
    assert network.cap_embedder[1].in_features == tiny_models.layout("lumina2").context_dim


def test_qwen_image_layout_has_only_double_stream_blocks_taking_the_conditioning_context(tiny_model):
    network = tiny_model("qwen_image").model.diffusion_model
    assert len(network.transformer_blocks) == 3
    assert not hasattr(network, "single_blocks")
    assert network.txt_in.in_features == tiny_models.layout("qwen_image").context_dim
    assert network.img_in.in_features == 16 * 2 * 2


@pytest.mark.parametrize("layout", NAMES)
def test_dit_layout_samples_finite_latents_of_the_latent_shape(tiny_model, layout):
    result = sample(tiny_model(layout, chunked=True), layout, steps=4, cfg=5.0, height=10, width=14, batch=2)
    assert result.shape == (2, 16, *FRAMES.get(layout, ()), 10, 14)
    assert torch.isfinite(result).all()


@pytest.mark.parametrize("layout", NAMES)
def test_dit_layout_sampling_is_deterministic(tiny_model, layout):
    first = sample(tiny_model(layout), layout, steps=2)
    torch.testing.assert_close(sample(tiny_model(layout), layout, steps=2), first, rtol=0, atol=0)


@pytest.mark.parametrize("layout", NAMES)
def test_dit_layout_prompt_changes_the_result(tiny_model, layout):
    first = sample(tiny_model(layout), layout, steps=2, positive=tiny_models.conditioning(layout, seed=5))
    second = sample(tiny_model(layout), layout, steps=2, positive=tiny_models.conditioning(layout, seed=6))
    assert not torch.allclose(first, second)


@pytest.mark.parametrize("layout", NAMES)
def test_chunked_dit_layout_runs_cond_and_uncond_in_separate_calls(tiny_model, layout):
    plain, plain_calls = record_calls(tiny_model(layout))
    chunked, chunked_calls = record_calls(tiny_model(layout, chunked=True))
    expected = sample(plain, layout, steps=2, cfg=5.0, batch=2)
    result = sample(chunked, layout, steps=2, cfg=5.0, batch=2)
    assert plain_calls == [[1, 0]] * 2
    assert sorted(map(tuple, chunked_calls)) == [(0,), (0,), (1,), (1,)]
    torch.testing.assert_close(result, expected, rtol=1e-4, atol=1e-3 * float(expected.abs().max()))


@pytest.mark.parametrize("layout,_base,_network,first", DIT_LAYOUTS)
def test_count_rows_finds_the_first_layer_of_the_dit_layout(tiny_model, layout, _base, _network, first):
    model = tiny_model(layout, chunked=True)
    assert first_layer_name(model) == first
    with count_rows(model) as count:
        sample(model, layout, steps=4, cfg=5.0)
    assert count.calls == [1] * 8


@pytest.mark.parametrize("layout", NAMES)
def test_dit_layout_runs_in_half_precision(layout):
    model = tiny_models.build_model(layout, dtype=torch.bfloat16)
    assert torch.isfinite(sample(model, layout, steps=2)).all()


@pytest.mark.parametrize("name,layout", [
    ("sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors", "sd3"),
    ("sd3_medium.safetensors", "sd3"),
    ("lumina_2.safetensors", "lumina2"),
    ("flux1-schnell.safetensors", "flux"),
    ("qwen_image_fp8_e4m3fn.safetensors", "qwen_image"),
    ("Qwen-Image-Edit-2509.safetensors", "qwen_image"),
])
def test_checkpoint_names_map_to_their_family_layout(name, layout):
    assert workflows.layout_for_checkpoint(name) == layout
