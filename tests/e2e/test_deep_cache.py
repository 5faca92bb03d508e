"""DeepCache through the real server: one patched model feeding two KSamplers at different sizes (hires fix)."""

import copy

import pytest
from PIL import Image

from devtools import workflows

pytestmark = pytest.mark.e2e
EXAMPLE = workflows.EXAMPLE_DIR / "deep_cache_sdxl_hires.json"


@pytest.fixture(scope="module")
def hires_prompt(object_info):
    prompt = workflows.api_prompt_for(EXAMPLE, object_info)
    for node in prompt.values():
        if node["class_type"] == "KSampler":
            node["inputs"]["steps"] = 6  # cached steps inside both runs (the test kit caps steps at 3)
    return prompt


def images(server, prompt):
    return sorted(Image.open(p).tobytes() for p in server.output_images(server.run(prompt)))


def with_own_deep_cache_per_sampler(prompt):
    """The same workflow where the second KSampler gets a fresh DeepCache node of its own."""
    prompt = copy.deepcopy(prompt)
    cache_id = next(i for i, n in prompt.items() if n["class_type"] == "PatchLab_DeepCache")
    samplers = sorted(i for i, n in prompt.items() if n["class_type"] == "KSampler")
    fresh = str(max(int(i) for i in prompt) + 1)
    prompt[fresh] = copy.deepcopy(prompt[cache_id])
    prompt[samplers[-1]]["inputs"]["model"] = [fresh, 0]
    return prompt


def test_two_samplers_at_two_sizes_share_one_patched_model_safely(server, hires_prompt):
    shared = images(server, hires_prompt)
    assert shared
    assert images(server, with_own_deep_cache_per_sampler(hires_prompt)) == shared


def test_the_server_log_has_one_line_per_run(server, hires_prompt):
    before = server.log_tail(10**7).count("PatchLab_DeepCache:")
    images(server, hires_prompt)
    assert server.log_tail(10**7).count("PatchLab_DeepCache:") - before == 2
