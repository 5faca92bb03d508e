"""SAG + PAG + SEG on one model through the real server: each keeps its effect."""

import pytest
from PIL import Image

from devtools import workflows
from devtools.server import PromptRejected

pytestmark = pytest.mark.e2e
STACK = ["PatchLab_SelfAttentionGuidance", "PatchLab_PerturbedAttentionGuidance", "PatchLab_SmoothedEnergyGuidance"]


@pytest.fixture(scope="module")
def stack_prompt(object_info):
    return workflows.api_prompt_for(workflows.EXAMPLE_DIR / "attention_guidance_stack.json", object_info)


def images(server, prompt):
    return sorted(Image.open(p).tobytes() for p in server.output_images(server.run(prompt)))


@pytest.fixture(scope="module")
def stack_images(server, stack_prompt):
    return images(server, stack_prompt)


def test_the_stack_runs_and_is_deterministic(server, stack_prompt, stack_images):
    assert stack_images and images(server, stack_prompt) == stack_images


@pytest.mark.parametrize("node_type", STACK)
def test_every_guidance_in_the_stack_has_an_effect(server, stack_prompt, stack_images, node_type):
    node_id = next(i for i, n in stack_prompt.items() if n["class_type"] == node_type)
    assert images(server, workflows.bypass(stack_prompt, node_id)) != stack_images


def test_a_bad_block_is_rejected_before_the_run(server, stack_prompt):
    prompt = {k: {**v, "inputs": dict(v["inputs"])} for k, v in stack_prompt.items()}
    node = next(n for n in prompt.values() if n["class_type"] == "PatchLab_PerturbedAttentionGuidance")
    node["inputs"]["blocks"] = "the middle one"
    with pytest.raises(PromptRejected) as rejected:
        server.queue(prompt)
    assert "cannot read block" in str(rejected.value)

