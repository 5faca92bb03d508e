"""InstantID on a tiny SDXL-layout model with real insightface/onnxruntime and tiny ONNX face models."""

import logging

import comfy.sample
import pytest
import torch

from devtools import checks
from devtools.sampling import sample
from devtools.testkit import face_models, tiny_models
from patchlab.nodes import instantid as nodes
from patchlab.patches import instantid as iid
from patchlab.patches.instantid import face_analysis as fa

pytest.importorskip("insightface", reason="insightface is installed by scripts/setup.sh")
NODE = "PatchLab_Test"
FACE = face_models.face_picture()
NO_FACE = face_models.face_picture(faces=())


def close(actual, expected, rel=1e-4):
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * float(expected.abs().max()))


@pytest.fixture(scope="module")
def sdxl(tiny_model):
    return tiny_model("sdxl")


@pytest.fixture(scope="module")
def insightface_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("insightface")
    face_models.write_antelopev2(root)
    return root


@pytest.fixture(scope="module")
def analysis(insightface_root):
    return fa.load("CPU", NODE, root=insightface_root)


@pytest.fixture(scope="module")
def weights(sdxl, tmp_path_factory):
    path = face_models.save_instantid(face_models.instantid_state_dict(sdxl),
                                      tmp_path_factory.mktemp("instantid") / "ip-adapter.bin")
    return iid.load_weights(str(path), NODE)


@pytest.fixture(scope="module")
def plain(sdxl):
    return sample(sdxl, "sdxl", steps=3)


def patch(model, weights, analysis, image=FACE, **overrides):
    inputs = {"weight": 1.0, "start_at": 0.0, "end_at": 1.0, "noise": 0.0, "face_index": 0, "on_no_face": "error",
              **overrides}
    return checks.run_node(nodes.InstantIDAttentionPatch, instantid=weights, insightface=analysis, image=image,
                           model=model, **inputs)


# --- weights files ---------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_released_shapes_load_from_both_file_formats(sdxl, tmp_path, suffix):
    state = face_models.instantid_state_dict(sdxl, dim=1280, depth=4, output_dim=2048)
    loaded = iid.load_weights(str(face_models.save_instantid(state, tmp_path / f"ip-adapter{suffix}")), NODE)
    assert len(loaded.ip_layers) == 70
    assert loaded.resampler(torch.randn(1, 512)).shape == (1, 16, 2048)


def test_a_damaged_file_is_reported_as_such(tmp_path):
    broken = tmp_path / "ip-adapter.bin"
    broken.write_bytes(b"PK\x03\x04 not really a checkpoint")
    with pytest.raises(ValueError, match="cannot read .*ip-adapter.bin.*damaged"):
        iid.load_weights(str(broken), NODE)


def test_an_sd15_shaped_file_is_reported_with_its_layer_count(sdxl, tmp_path):
    state = face_models.instantid_state_dict(sdxl, ip_layers=16)
    path = face_models.save_instantid(state, tmp_path / "ip-adapter_sd15.bin")
    with pytest.raises(ValueError, match="16 attention layers, InstantID \\(SDXL\\) has 70 \\(an IP-Adapter for SD1.5"):
        iid.load_weights(str(path), NODE)


def test_a_misshaped_resampler_names_the_key(sdxl, tmp_path):
    state = face_models.instantid_state_dict(sdxl)
    state["image_proj"]["proj_out.bias"] = torch.zeros(7)
    with pytest.raises(ValueError, match="proj_out.bias has shape \\(7,\\), expected \\(64,\\)"):
        iid.load_weights(str(face_models.save_instantid(state, tmp_path / "x.bin")), NODE)


def test_a_file_of_another_kind_is_named(tmp_path):
    path = face_models.save_instantid({"model": {"weight": torch.zeros(2)}}, tmp_path / "other.bin")
    with pytest.raises(ValueError, match="is not an InstantID file"):
        iid.load_weights(str(path), NODE)


# --- face analysis -------------------------------------------------------------------------------------

def test_real_face_analysis_finds_the_face_and_embeds_it(analysis):
    faces = fa.detect(analysis, FACE[0])
    assert len(faces) >= 1
    face = faces[0]
    assert face.embedding.shape == (512,) and face.keypoints.shape == (5, 2)
    x1, y1, x2, y2 = face.bbox
    assert 40 <= (x1 + x2) / 2 <= 216 and 40 <= (y1 + y2) / 2 <= 216


def test_no_face_in_a_dark_picture(analysis):
    assert fa.detect(analysis, NO_FACE[0]) == []


def test_faces_of_other_colours_get_other_embeddings(analysis):
    other = face_models.face_picture(faces=((64, 64, 128, (0.5, 0.9, 0.9)),))
    first, second = fa.detect(analysis, FACE[0])[0], fa.detect(analysis, other[0])[0]
    assert not torch.allclose(torch.from_numpy(first.embedding), torch.from_numpy(second.embedding))


def make_face(side):
    import numpy as np

    return fa.Face(np.array([0, 0, side, side], np.float32), np.zeros((5, 2), np.float32), np.zeros(512, np.float32))


def test_pick_takes_the_largest_first_and_reports_a_missing_index():
    faces = sorted([make_face(10), make_face(30), make_face(20)], key=lambda f: -f.area)
    assert fa.pick(faces, 0, 0, NODE).area == 900 and fa.pick(faces, 2, 0, NODE).area == 100
    assert fa.pick([], 0, 3, NODE) is None
    with pytest.raises(ValueError, match="face_index 3 .* image 1, which has 3"):
        fa.pick(faces, 3, 1, NODE)


def test_preflight_explains_a_nested_folder(tmp_path):
    face_models.write_antelopev2(tmp_path / "wrong")
    nested = tmp_path / "models" / "antelopev2" / "antelopev2"
    nested.parent.mkdir(parents=True)
    (tmp_path / "wrong" / "models" / "antelopev2").rename(nested)
    with pytest.raises(RuntimeError, match="one folder too deep"):
        fa.load("CPU", NODE, root=tmp_path)


def test_preflight_explains_a_missing_recognition_model(tmp_path):
    folder = face_models.write_antelopev2(tmp_path)
    (folder / face_models.RECOGNIZER).unlink()
    with pytest.raises(RuntimeError, match="recognition model glintr100.onnx is missing"):
        fa.load("CPU", NODE, root=tmp_path)


def test_preflight_explains_the_buffalo_pack(tmp_path):
    folder = tmp_path / "models" / "antelopev2"
    face_models.write_detector(folder / "det_10g.onnx")
    face_models.write_recognizer(folder / "w600k_r50.onnx")
    with pytest.raises(RuntimeError, match="buffalo_l face pack"):
        fa.load("CPU", NODE, root=tmp_path)


def test_preflight_explains_a_missing_folder(tmp_path):
    with pytest.raises(RuntimeError, match="does not exist"):
        fa.load("CPU", NODE, root=tmp_path)


def test_an_unavailable_provider_is_a_clear_error(insightface_root):
    with pytest.raises(RuntimeError, match="no ROCm support"):
        fa.load("ROCm", NODE, root=insightface_root)


# --- the attention patch ---------------------------------------------------------------------------------

def test_the_patch_changes_the_result(sdxl, weights, analysis, plain):
    model, tokens = patch(sdxl, weights, analysis)
    assert tokens.cond.shape == (1, 16, 64)  # the tiny model's context width (SDXL: 2048)
    assert not torch.allclose(sample(model, "sdxl", steps=3), plain, rtol=1e-3, atol=1e-3)


def test_weight_zero_is_exactly_unpatched(sdxl, weights, analysis, plain):
    model, _ = patch(sdxl, weights, analysis, weight=0.0)
    assert torch.equal(sample(model, "sdxl", steps=3), plain)


def test_outside_start_end_is_exactly_unpatched(sdxl, weights, analysis, plain):
    model, _ = patch(sdxl, weights, analysis, start_at=1.0, end_at=1.0)
    assert torch.equal(sample(model, "sdxl", steps=3), plain)


def test_a_zero_mask_is_exactly_unpatched(sdxl, weights, analysis, plain):
    model, _ = patch(sdxl, weights, analysis, mask=torch.zeros(1, 128, 128))
    assert torch.equal(sample(model, "sdxl", steps=3), plain)


def test_the_mask_scales_only_the_face_attention_per_token(sdxl, weights, analysis):
    half = torch.zeros(1, 64, 64)
    half[:, :, :32] = 1  # left half of the picture
    model, _ = patch(sdxl, weights, analysis, mask=half)
    plain_model, _ = patch(sdxl, weights, analysis, weight=0.0)
    replace = model.model_options["transformer_options"]["patches_replace"]["attn2"][("input", 4, 0)]
    width = weights.ip_layers[0][0].shape[0]
    q = torch.randn(2, 8 * 8, width)
    k, v = torch.randn(2, 5, width), torch.randn(2, 5, width)
    extra = {"n_heads": width // 16, "cond_or_uncond": [1, 0], "original_shape": [1, 4, 16, 16],
             "sigmas": torch.tensor([1.0])}
    from comfy.ldm.modules.attention import optimized_attention
    text_only = optimized_attention(q, k, v, extra["n_heads"])
    out = replace(q, k, v, extra).reshape(2, 8, 8, width)
    text_only = text_only.reshape(2, 8, 8, width)
    torch.testing.assert_close(out[:, :, 4:], text_only[:, :, 4:])
    assert not torch.allclose(out[:, :, :4], text_only[:, :, :4])
    assert ("input", 4, 0) not in plain_model.model_options.get("transformer_options", {}).get("patches_replace",
                                                                                               {}).get("attn2", {})


def test_all_70_cross_attention_layers_are_patched_middle_included(sdxl, weights, analysis):
    model, _ = patch(sdxl, weights, analysis)
    keys = set(model.model_options["transformer_options"]["patches_replace"]["attn2"])
    assert len(keys) == 70
    assert {("middle", 0, i) for i in range(10)} <= keys
    assert {("input", 4, 0), ("input", 8, 9), ("output", 0, 9), ("output", 5, 1)} <= keys


def test_batch_items_and_chunked_calls_match_batch_one(tiny_model, weights, analysis):
    prompts = {"positive": tiny_models.conditioning("sdxl", seed=1), "negative": tiny_models.conditioning("sdxl", 2)}
    noise = comfy.sample.prepare_noise(torch.zeros(2, 4, 16, 16), 3)
    alone = [sample(patch(tiny_model("sdxl"), weights, analysis)[0], "sdxl", steps=2, noise=noise[i:i + 1],
                    **prompts) for i in range(2)]
    for base in (tiny_model("sdxl"), tiny_model("sdxl", chunked=True)):
        together = sample(patch(base, weights, analysis)[0], "sdxl", steps=2, batch=2, noise=noise, **prompts)
        for i in range(2):
            close(together[i:i + 1], alone[i])


def test_a_half_precision_model_works(tiny_model, weights, analysis):
    model = tiny_model("sdxl", dtype=torch.float16)
    patched, _ = patch(model, weights, analysis)
    result = sample(patched, "sdxl", steps=2)
    assert torch.isfinite(result).all()


def test_an_sd15_model_is_a_clear_error(tiny_model, weights, analysis):
    with pytest.raises(RuntimeError, match="InstantID needs an SDXL model"):
        patch(tiny_model("sd15"), weights, analysis)


def test_no_face_is_an_error_naming_the_image(sdxl, weights, analysis):
    images = torch.cat([FACE, NO_FACE])
    with pytest.raises(ValueError, match="no face found in reference image 1 \\(of 2\\)"):
        patch(sdxl, weights, analysis, image=images)


def test_pass_through_returns_the_model_unpatched_with_a_warning(sdxl, weights, analysis, caplog):
    with caplog.at_level(logging.WARNING):
        model, tokens = patch(sdxl, weights, analysis, image=NO_FACE, on_no_face="pass through")
    assert model is sdxl and tokens is None
    assert any("no reference image has a face" in r.getMessage() for r in caplog.records)


def test_an_existing_attn2_replace_is_chained(sdxl, weights, analysis):
    calls = []

    def other_pack(q, k, v, extra_options):
        calls.append(extra_options["block"])
        from comfy.ldm.modules.attention import optimized_attention
        return optimized_attention(q, k, v, extra_options["n_heads"])

    other = sdxl.clone()
    other.set_model_attn2_replace(other_pack, "input", 4)
    model, _ = patch(other, weights, analysis)
    sample(model, "sdxl", steps=1)
    assert calls and set(calls) == {("input", 4)}
    assert other.model_options["transformer_options"]["patches_replace"]["attn2"][("input", 4)] is other_pack


def test_the_input_model_is_left_unchanged(sdxl, weights, analysis):
    before = checks.snapshot(sdxl)
    patch(sdxl, weights, analysis)
    checks.assert_unchanged(sdxl, before)


def test_norm_average_normalises_each_embedding():
    embeds = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    combined = iid.combine_embeddings(embeds, "norm average")
    torch.testing.assert_close(combined, torch.tensor([[2 ** -0.5, 2 ** -0.5]]) * 2.0)
    torch.testing.assert_close(iid.combine_embeddings(embeds, "average"), torch.tensor([[1.5, 0.5]]))
    assert iid.combine_embeddings(embeds, "concat").shape == (2, 2)


# --- with the ControlNet -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def controlnet():
    return tiny_models.build_controlnet("sdxl")


def test_apply_instantid_adds_the_controlnet_with_face_tokens(sdxl, weights, analysis, controlnet, plain):
    positive, negative = tiny_models.conditioning("sdxl", seed=1), tiny_models.conditioning("sdxl", seed=2)
    model, pos, neg = checks.run_node(
        nodes.ApplyInstantID, instantid=weights, insightface=analysis, control_net=controlnet, image=FACE,
        model=sdxl, positive=positive, negative=negative, weight=0.8, start_at=0.0, end_at=1.0, face_index=0,
        on_no_face="error")
    assert pos[0][1]["cross_attn_controlnet"].shape == (1, 16, 64) and "control" in neg[0][1]
    assert "control" not in positive[0][1]
    result = sample(model, "sdxl", steps=2, positive=pos, negative=neg)
    assert torch.isfinite(result).all()
    assert not torch.allclose(result, sample(model, "sdxl", steps=2), rtol=1e-3, atol=1e-3)


def test_face_keypoints_draws_the_five_points(analysis):
    (drawing,) = checks.run_node(nodes.FaceKeypoints, faceanalysis=analysis, image=FACE, face_index=0)
    assert drawing.shape == FACE.shape and float(drawing.max()) > 0.9
    assert float(drawing[0, :20, :20].max()) == 0.0
