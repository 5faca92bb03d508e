"""PatchLab inside a real ComfyUI server: registration, example workflows, bad input."""

import sys
import urllib.request

import pytest
from PIL import Image

from devtools import workflows
from devtools.server import PromptRejected

pytestmark = pytest.mark.e2e
PACK_NODES = sorted(sys.modules["patchlab"].NODE_CLASS_MAPPINGS)


def test_the_server_loads_the_pack_without_import_errors(server, object_info):
    log = server.log_tail(400)
    assert "IMPORT FAILED" not in "\n".join(line for line in log.splitlines() if "PatchLab" in line)
    assert PACK_NODES and set(PACK_NODES) <= set(object_info)


@pytest.mark.parametrize("node_id", PACK_NODES)
def test_object_info_lists_the_node_with_tooltips(object_info, node_id):
    info = object_info[node_id]
    assert info["category"].startswith("PatchLab/")
    assert info["description"]
    for group, inputs in info["input"].items():
        if group == "hidden":  # UNIQUE_ID and the like: no widget, nothing to explain
            continue
        for name, spec in inputs.items():
            assert spec[1].get("tooltip"), f"{node_id}.{name}"
    assert len(info["output_tooltips"]) == len(info["output"])


def test_help_pages_are_served(server):
    with urllib.request.urlopen(f"{server.url}/extensions/PatchLab/docs/PatchLab_ModelSamplingFlux.md") as page:
        assert page.read().decode().startswith("# ModelSampling Flux")


@pytest.mark.parametrize("path", workflows.example_paths(), ids=lambda p: p.stem)
def test_example_workflow_runs_and_saves_images(server, object_info, path):
    prompt = workflows.api_prompt_for(path, object_info, testkit=True)
    entry = server.run(prompt, timeout=600)
    images = server.output_images(entry)
    assert images, "the workflow saved no image"
    for image in images:
        with Image.open(image) as png:
            assert png.size[0] >= 16 and png.size[1] >= 16


def test_example_workflow_is_deterministic(server, object_info):
    path = workflows.EXAMPLE_DIR / "model_sampling_sd3.json"
    prompt = workflows.api_prompt_for(path, object_info, testkit=True)
    first = sorted(Image.open(p).tobytes() for p in server.output_images(server.run(prompt)))
    second = sorted(Image.open(p).tobytes() for p in server.output_images(server.run(prompt)))
    assert first == second


def test_an_inverted_sigma_range_is_rejected_and_the_server_stays_up(server, object_info):
    path = workflows.EXAMPLE_DIR / "model_sampling_continuous_v.json"
    prompt = workflows.api_prompt_for(path, object_info, testkit=True)
    node = next(n for n in prompt.values() if n["class_type"] == "PatchLab_ModelSamplingContinuousV")
    node["inputs"].update(sigma_max=0.5, sigma_min=2.0)
    with pytest.raises(PromptRejected) as rejected:
        server.queue(prompt)
    assert "must be larger than sigma_min" in str(rejected.value)
    assert server.alive()
    assert "PatchLab_SigmaSchedulePreview" in server.get("/object_info/PatchLab_SigmaSchedulePreview")
