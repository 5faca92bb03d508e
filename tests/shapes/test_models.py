"""The trained reference models: committed weights, their text encoder and VAE in the test kit, the training command."""

from __future__ import annotations

import comfy.model_base
import comfy.model_patcher
import pytest
import torch

from devtools.testkit import nodes as testkit
from devtools.testkit.shapes import data, models, oracle, train

NAMES = models.IMAGE_NAMES  # the video model: test_video_model.py
BASES = {"sd15_shapes": comfy.model_base.BaseModel, "flux_shapes": comfy.model_base.Flux}


@pytest.fixture(scope="module")
def checkpoints():
    return {name: testkit.TinyCheckpoint().load(name, 0) for name in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_committed_weights_match_their_manifest(name):
    manifest = models.manifest(name)
    assert models.sha256(models.weights_path(name)) == manifest["sha256"]
    assert manifest["command"].startswith(f"python -m devtools.testkit.shapes.train {name}")
    for key in ("seed", "steps", "wall_s", "final_loss_ema100", "quality"):
        assert key in manifest


@pytest.mark.parametrize("name", NAMES)
def test_the_test_kit_serves_the_trained_model_as_a_real_comfyui_model(checkpoints, name):
    model, _clip, _vae = checkpoints[name]
    assert isinstance(model, comfy.model_patcher.ModelPatcher) and type(model.model) is BASES[name]
    assert "sd15_shapes" in testkit.TinyCheckpoint.INPUT_TYPES()["required"]["layout"][0]


def test_the_unet_has_sd15s_block_structure(checkpoints):
    network = checkpoints["sd15_shapes"][0].model.diffusion_model
    assert len(network.input_blocks) == 12 and len(network.output_blocks) == 12
    assert [len(b) for b in network.input_blocks] == [1, 2, 2, 1, 2, 2, 1, 2, 2, 1, 1, 1]
    assert type(network.middle_block[1]).__name__ == "SpatialTransformer"


def test_the_dit_has_double_and_single_stream_blocks_without_guidance_embedding(checkpoints):
    network = checkpoints["flux_shapes"][0].model.diffusion_model
    assert len(network.double_blocks) == 2 and len(network.single_blocks) == 4
    assert not network.params.guidance_embed


@pytest.mark.parametrize("name", NAMES)
def test_prompts_encode_their_known_words_in_order(checkpoints, name):
    clip = checkpoints[name][1]
    red, blue = clip.encode("red circle")[0][0], clip.encode("blue circle")[0][0]
    assert red.shape == (1, models.TOKENS, models.spec(name).context_dim)
    assert not torch.equal(red, blue)
    assert torch.equal(clip.encode("A Red, circle!")[0][0], red)
    empty = clip.encode("")[0][0]
    assert torch.equal(empty, empty[:, :1].expand_as(empty))  # all padding


def test_the_dit_gets_a_pooled_vector_and_the_unet_none(checkpoints):
    assert "pooled_output" in checkpoints["flux_shapes"][1].encode("red circle")[0][1]
    assert "pooled_output" not in checkpoints["sd15_shapes"][1].encode("red circle")[0][1]


@pytest.mark.parametrize("name", NAMES)
def test_the_vae_decodes_latents_to_their_pictures_upscaled_8x(checkpoints, name):
    vae = checkpoints[name][2]
    pictures = data.draw(3, torch.Generator().manual_seed(0)).images
    upscaled = torch.nn.functional.interpolate(pictures, scale_factor=8, mode="nearest").permute(0, 2, 3, 1)
    latent = vae.encode(upscaled)
    assert latent.shape == (3, models.spec(name).latent_channels, 16, 16)
    decoded = vae.decode(latent)
    assert decoded.shape == (3, 128, 128, 3)
    assert torch.allclose(decoded, upscaled, atol=1e-5)


def test_the_rgb_basis_is_orthonormal():
    for channels in (4, 16):
        basis = models.rgb_basis(channels)
        assert torch.allclose(basis.T @ basis, torch.eye(3), atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_the_training_command_runs_a_few_steps(tmp_path, name):
    out = tmp_path / f"{name}.safetensors"
    assert train.main([name, "--steps", "2", "--batch", "2", "--threads", "1", "--out", str(out)]) == 0
    trained = models.load(name, path=out, check=False)
    assert isinstance(trained.model, comfy.model_patcher.ModelPatcher)
    assert all(torch.isfinite(p).all() for p in trained.model.model.diffusion_model.parameters())


def test_a_flow_model_can_be_trained_with_another_draw_of_t(tmp_path, monkeypatch):
    drawn = []
    original = train.sample_sigmas
    monkeypatch.setattr(train, "sample_sigmas", lambda *a: drawn.append(a[-1]) or original(*a))
    facts = train.train("flux_shapes", 1, batch=2, flow_t="uniform")
    assert drawn == ["uniform"] and facts["flow_t"] == "uniform"


def test_the_classifier_reads_held_out_pictures_at_99_percent():
    accuracy = oracle.held_out_accuracy(oracle.load(), count=1000)
    assert accuracy["colour"] >= 0.99 and accuracy["shape"] >= 0.99


def test_fid_is_small_between_two_real_sets_and_large_against_noise():
    classifier = oracle.load()
    reference = oracle.reference_set(1000)
    real = data.held_out(500, seed=20_000).images
    noise = torch.rand(500, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert oracle.fid(classifier, real, reference) < 0.1 * oracle.fid(classifier, noise, reference)


def test_psnr_is_infinite_for_equal_pictures_and_finite_otherwise():
    a = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    values = oracle.psnr(a, torch.stack([a[0], a[1] * 0.5]))
    assert torch.isinf(values[0]) and torch.isfinite(values[1])
