"""RescaleCFG + APG + FreeU_V2 + FreSca + DifferentialDiffusion chained in one workflow on the real server."""

import pytest
from PIL import Image

from devtools import workflows

pytestmark = pytest.mark.e2e
STACK = ["PatchLab_RescaleCFG", "PatchLab_AdaptiveProjectedGuidance", "PatchLab_FreeU_V2", "PatchLab_FreSca",
         "PatchLab_DifferentialDiffusion"]


@pytest.fixture(scope="module")
def stack_prompt(object_info):
    prompt = workflows.api_prompt_for(workflows.EXAMPLE_DIR / "guidance_stack.json", object_info)
    for node in prompt.values():
        if node["class_type"] == "PatchLab_FreSca":  # cutoff 20 counts all of a 16x16 test latent as low
            node["inputs"]["freq_cutoff"] = 4
    return prompt


def images(server, prompt):
    return sorted(Image.open(p).tobytes() for p in server.output_images(server.run(prompt)))


@pytest.fixture(scope="module")
def stack_images(server, stack_prompt):
    return images(server, stack_prompt)


def test_the_stack_holds_every_patch(stack_prompt):
    assert sorted(n["class_type"] for n in stack_prompt.values() if n["class_type"] in STACK) == sorted(STACK)


def test_the_stack_runs_and_is_deterministic(server, stack_prompt, stack_images):
    assert stack_images and images(server, stack_prompt) == stack_images


@pytest.mark.parametrize("node_type", STACK)
def test_every_patch_in_the_stack_has_an_effect(server, stack_prompt, stack_images, node_type):
    node_id = next(i for i, n in stack_prompt.items() if n["class_type"] == node_type)
    assert images(server, workflows.bypass(stack_prompt, node_id)) != stack_images
