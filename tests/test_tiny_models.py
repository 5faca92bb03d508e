"""The DiT layouts of the test kit: real models of each family that sample like KSampler.

SD3 MMDiT, Lumina 2 NextDiT, Qwen-Image, Wan 2.1 and 2.2 (video), HunyuanVideo (video), Z-Image,
Flux.2 and Chroma.
"""

from __future__ import annotations

import comfy.ldm.chroma.model
import comfy.ldm.flux.model
import comfy.ldm.hunyuan_video.model
import comfy.ldm.lumina.model
import comfy.ldm.modules.diffusionmodules.mmdit
import comfy.ldm.qwen_image.model
import comfy.ldm.wan.model
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
    ("wan21", comfy.model_base.WAN21, comfy.ldm.wan.model.WanModel, "patch_embedding"),
    ("wan22", comfy.model_base.WAN22, comfy.ldm.wan.model.WanModel, "patch_embedding"),
    ("hunyuan_video", comfy.model_base.HunyuanVideo, comfy.ldm.hunyuan_video.model.HunyuanVideo, "img_in"),
    ("zimage", comfy.model_base.Lumina2, comfy.ldm.lumina.model.NextDiT, "x_embedder"),
    ("flux2", comfy.model_base.Flux2, comfy.ldm.flux.model.Flux, "img_in"),
    ("chroma", comfy.model_base.Chroma, comfy.ldm.chroma.model.Chroma, "img_in"),
]
NAMES = [entry[0] for entry in DIT_LAYOUTS]
# Qwen-Image, Flux.2 and Chroma are FLUX-type models (flow with a resolution-dependent shift); the rest
# discrete flow with a fixed shift.
FLUX_TYPE = {"qwen_image", "flux2", "chroma"}
CHANNELS = {"wan22": 48, "flux2": 128}
# Latent frames: Qwen-Image has a frame axis of one; the video layouts sample three latent frames.
FRAMES = {"qwen_image": (1,), "wan21": (3,), "wan22": (3,), "hunyuan_video": (3,)}


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
def test_dit_layout_is_a_flow_model_with_its_family_latent(tiny_model, layout):
    model = tiny_model(layout)
    assert model.model.latent_format.latent_channels == CHANNELS.get(layout, 16)
    sampling = comfy.model_sampling.ModelSamplingFlux if layout in FLUX_TYPE else \
        comfy.model_sampling.ModelSamplingDiscreteFlow
    assert isinstance(model.model.model_sampling, sampling)


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


@pytest.mark.parametrize("layout", ["wan21", "wan22"])
def test_wan_layouts_have_blocks_with_self_and_cross_attention_over_3d_patches(tiny_model, layout):
    network = tiny_model(layout).model.diffusion_model
    assert len(network.blocks) == 2
    assert all(hasattr(block, "self_attn") and hasattr(block, "cross_attn") for block in network.blocks)
    assert network.patch_embedding.kernel_size == (1, 2, 2)
    assert network.text_embedding[0].in_features == tiny_models.layout(layout).context_dim


def test_hunyuan_video_layout_has_double_and_single_stream_blocks_and_a_token_refiner(tiny_model):
    network = tiny_model("hunyuan_video").model.diffusion_model
    assert (len(network.double_blocks), len(network.single_blocks)) == (1, 2)
    assert hasattr(network.txt_in, "individual_token_refiner")
    assert network.vector_in.in_layer.in_features == tiny_models.layout("hunyuan_video").pooled_dim


def test_zimage_layout_is_nextdit_with_z_image_modulation_at_width_256(tiny_model):
    network = tiny_model("zimage").model.diffusion_model
    assert network.dim == 256
    assert network.layers[0].adaLN_modulation[0].in_features == 256  # Z-Image's 256-wide time embedding
    assert (len(network.context_refiner), len(network.noise_refiner), len(network.layers)) == (1, 1, 2)


def test_flux2_layout_shares_its_modulation_across_blocks_and_takes_no_vector(tiny_model):
    network = tiny_model("flux2").model.diffusion_model
    assert hasattr(network, "double_stream_modulation_img") and hasattr(network, "single_stream_modulation")
    assert network.vector_in is None
    assert network.patch_size == 1 and network.img_in.in_features == 128


def test_chroma_layout_computes_its_modulation_with_the_approximator(tiny_model):
    network = tiny_model("chroma").model.diffusion_model
    assert hasattr(network, "distilled_guidance_layer")
    assert not hasattr(network, "vector_in") and not hasattr(network, "guidance_in")
    assert (len(network.double_blocks), len(network.single_blocks)) == (1, 2)


@pytest.mark.parametrize("layout", NAMES)
def test_dit_layout_samples_finite_latents_of_the_latent_shape(tiny_model, layout):
    result = sample(tiny_model(layout, chunked=True), layout, steps=4, cfg=5.0, height=10, width=14, batch=2)
    assert result.shape == (2, CHANNELS.get(layout, 16), *FRAMES.get(layout, ()), 10, 14)
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
