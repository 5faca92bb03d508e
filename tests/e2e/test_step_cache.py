"""StepCache through the real server: one patched model feeding two KSamplers at different sizes (hires fix)."""

import re

import pytest

from devtools import workflows

pytestmark = pytest.mark.e2e
LOG = re.compile(r"PatchLab_StepCache: reused (\d+) of (\d+) steps")


@pytest.fixture(scope="module")
def hires_prompt(object_info):
    prompt = workflows.api_prompt_for(workflows.EXAMPLE_DIR / "step_cache_sdxl_hires.json", object_info)
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "PatchLab_StepCache":
            inputs["threshold"] = 0.5
        if node["class_type"] == "KSampler":
            inputs["steps"] = 8
        if node["class_type"] == "EmptyLatentImage":
            inputs["width"], inputs["height"] = 128, 96
    return prompt


def test_the_hires_workflow_holds_two_samplers_on_one_step_cache(hires_prompt):
    kinds = [n["class_type"] for n in hires_prompt.values()]
    assert kinds.count("KSampler") == 2 and kinds.count("PatchLab_StepCache") == 1


def test_two_samplers_at_different_sizes_each_reuse_steps(server, hires_prompt):
    before = len(LOG.findall(server.log_tail(400)))
    entry = server.run(hires_prompt)
    assert server.output_images(entry)
    lines = LOG.findall(server.log_tail(400))[before:]
    assert len(lines) == 2  # one line per run
    assert all(int(reused) > 0 for reused, _ in lines)
    assert server.alive()
