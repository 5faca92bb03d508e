"""example_workflows/: generated from devtools/examples/, valid editor files, every node shown."""

import json
import sys

import pytest

from devtools import bootstrap, examples, workflows

PACK_NODES = set(sys.modules["patchlab"].NODE_CLASS_MAPPINGS)


@pytest.fixture(scope="module")
def object_info(core_nodes):
    return workflows.LocalObjectInfo()


@pytest.mark.skipif(bootstrap.comfyui_version(bootstrap.comfyui_root()) != bootstrap.BASELINE_VERSION,
                    reason=f"the files are generated against ComfyUI {bootstrap.BASELINE_VERSION}, whose core-node "
                           "schemas differ from this one's")
def test_example_files_are_generated_from_their_python_source(object_info):
    built = dict(examples.build_all(object_info))
    on_disk = {p.name: json.loads(p.read_text()) for p in workflows.example_paths()}
    assert set(on_disk) == set(built), "run scripts/build_workflows.py"
    for name, workflow in built.items():
        assert on_disk[name] == json.loads(json.dumps(workflow)), f"{name} is stale: run scripts/build_workflows.py"


def test_every_pack_node_appears_in_an_example():
    used = {node["type"] for p in workflows.example_paths() for node in workflows.load(p)["nodes"]}
    assert PACK_NODES <= used, sorted(PACK_NODES - used)


def test_ui_to_api_maps_widget_values_by_input_name(object_info):
    prompt = workflows.ui_to_api(workflows.load(workflows.EXAMPLE_DIR / "model_sampling_sd3.json"), object_info)
    sampler = next(n for n in prompt.values() if n["class_type"] == "KSampler")
    assert sampler["inputs"]["seed"] == 42 and sampler["inputs"]["steps"] == 28
    assert sampler["inputs"]["sampler_name"] == "dpmpp_2m" and sampler["inputs"]["scheduler"] == "sgm_uniform"
    assert sampler["inputs"]["cfg"] == 4.5 and sampler["inputs"]["denoise"] == 1.0
    model_id, slot = sampler["inputs"]["model"]
    assert prompt[model_id]["class_type"] == "PatchLab_ModelSamplingSD3" and slot == 0
    assert not any(n["class_type"] == "Note" for n in prompt.values())


def test_testkit_adaptation_swaps_loaders_and_shrinks_the_work(object_info):
    prompt = workflows.api_prompt_for(workflows.EXAMPLE_DIR / "model_sampling_flux.json", object_info)
    kinds = {n["class_type"] for n in prompt.values()}
    assert "CheckpointLoaderSimple" not in kinds and "PatchLabTest_TinyCheckpoint" in kinds
    loader = next(n for n in prompt.values() if n["class_type"] == "PatchLabTest_TinyCheckpoint")
    assert loader["inputs"]["layout"] == "flux"
    latent = next(n for n in prompt.values() if n["class_type"] == "EmptySD3LatentImage")
    assert (latent["inputs"]["width"], latent["inputs"]["height"]) == (128, 64)
    assert all(n["inputs"]["steps"] <= 3 for n in prompt.values() if n["class_type"] == "KSampler")


def test_testkit_provides_every_stand_in():
    from devtools.testkit.nodes import NODE_CLASS_MAPPINGS

    assert set(workflows.TESTKIT_REPLACES.values()) <= set(NODE_CLASS_MAPPINGS)


def test_use_checkpoint_points_every_loader_at_the_given_file(object_info):
    prompt = workflows.ui_to_api(workflows.load(workflows.EXAMPLE_DIR / "model_sampling_sd3.json"), object_info)
    mine = workflows.use_checkpoint(prompt, "my_model.safetensors")
    loaders = [n for n in mine.values() if n["class_type"] == "CheckpointLoaderSimple"]
    assert loaders and all(n["inputs"]["ckpt_name"] == "my_model.safetensors" for n in loaders)
    assert prompt != mine


def test_missing_choices_names_the_model_files_a_comfyui_lacks(object_info):
    prompt = workflows.ui_to_api(workflows.load(workflows.EXAMPLE_DIR / "instantid.json"), object_info)
    missing = workflows.missing_choices(prompt, object_info)
    assert "PatchLab_InstantIDModelLoader.instantid_file = 'ip-adapter.bin'" in missing
    assert not any(entry.startswith("KSampler.") for entry in missing)


def test_the_demo_runs_sd15_and_flux_workflows_on_the_trained_models_with_a_shapes_prompt(object_info):
    for name, layout in (("token_merging_sd15.json", "sd15_shapes"), ("step_cache_flux.json", "flux_shapes")):
        prompt = workflows.ui_to_api(workflows.load(workflows.EXAMPLE_DIR / name), object_info)
        prompt = workflows.use_testkit(prompt, trained=True)
        loader = next(n for n in prompt.values() if n["class_type"] == "PatchLabTest_TinyCheckpoint")
        assert loader["inputs"]["layout"] == layout
        sampler = next(n for n in prompt.values() if n["class_type"] == "KSampler")
        assert sampler["inputs"]["steps"] == 20
        positive, negative = (prompt[sampler["inputs"][role][0]] for role in ("positive", "negative"))
        assert positive["inputs"]["text"] == workflows.SHAPES_PROMPT and negative["inputs"]["text"] == ""


def test_the_demo_keeps_random_weight_layouts_where_no_trained_model_fits(object_info):
    prompt = workflows.ui_to_api(workflows.load(workflows.EXAMPLE_DIR / "token_merging_sdxl.json"), object_info)
    prompt = workflows.use_testkit(prompt, trained=True)
    loader = next(n for n in prompt.values() if n["class_type"] == "PatchLabTest_TinyCheckpoint")
    assert loader["inputs"]["layout"] == "sdxl"
    assert all(n["inputs"]["steps"] <= 3 for n in prompt.values() if n["class_type"] == "KSampler")


@pytest.fixture
def wan_shapes_weights(tmp_path, monkeypatch):
    """As if wan_shapes were trained: its weights file (empty here) where the demo's rule looks for it."""
    (tmp_path / "wan_shapes.safetensors").write_bytes(b"")
    monkeypatch.setattr(workflows, "TRAINED_WEIGHTS", tmp_path)


def demo_prompt(object_info, name):
    prompt = workflows.ui_to_api(workflows.load(workflows.EXAMPLE_DIR / f"{name}.json"), object_info)
    return workflows.use_testkit(prompt, trained=True)


def by_kind(prompt, kind):
    return [n for n in prompt.values() if n["class_type"] == kind]


def test_the_demo_runs_the_wan21_video_workflow_on_wan_shapes_once_it_is_trained(object_info, wan_shapes_weights):
    prompt = demo_prompt(object_info, "step_cache_wan21")
    for loader in ("TinyDiffusionModel", "TinyTextEncoder", "TinyVAELoader"):
        assert [n["inputs"]["layout"] for n in by_kind(prompt, f"PatchLabTest_{loader}")] == ["wan_shapes"]
    (latent,) = by_kind(prompt, "EmptyHunyuanLatentVideo")
    assert latent["inputs"] == {"width": 128, "height": 128, "length": 13, "batch_size": 1}  # the trained clip
    (sampler,) = by_kind(prompt, "KSampler")
    assert sampler["inputs"]["steps"] == 20
    positive, negative = (prompt[sampler["inputs"][role][0]] for role in ("positive", "negative"))
    assert positive["inputs"]["text"] == "red circle moving right" and negative["inputs"]["text"] == ""
    assert by_kind(prompt, "SaveAnimatedWEBP") and by_kind(prompt, "PatchLab_StepCache")


def test_the_demo_keeps_the_wan21_video_workflow_on_random_weights_until_wan_shapes_is_trained(object_info,
                                                                                              tmp_path, monkeypatch):
    monkeypatch.setattr(workflows, "TRAINED_WEIGHTS", tmp_path)  # no weights there
    prompt = demo_prompt(object_info, "step_cache_wan21")
    assert [n["inputs"]["layout"] for n in by_kind(prompt, "PatchLabTest_TinyDiffusionModel")] == ["wan21"]
    (latent,) = by_kind(prompt, "EmptyHunyuanLatentVideo")
    assert latent["inputs"] == {"width": 128, "height": 64, "length": 9, "batch_size": 1}  # 832x480, 13 shrunk
    assert by_kind(prompt, "KSampler")[0]["inputs"]["steps"] == 3


def test_the_wan22_experts_stay_on_random_weights_beside_a_trained_wan_shapes(object_info, wan_shapes_weights):
    prompt = demo_prompt(object_info, "step_cache_wan22_experts")
    assert {n["inputs"]["layout"] for n in by_kind(prompt, "PatchLabTest_TinyDiffusionModel")} == {"wan21"}
    assert {n["inputs"]["layout"] for n in by_kind(prompt, "PatchLabTest_TinyTextEncoder")} == {"wan21"}
    assert all(n["inputs"]["steps"] <= 3 for n in by_kind(prompt, "KSamplerAdvanced"))
