"""Guidance skipping through the real server: the stack of guidance_skip_stack.json, the saved evaluations logged."""

import re

import pytest
from PIL import Image

from devtools import workflows
from devtools.server import PromptRejected

pytestmark = pytest.mark.e2e
STACK = ["PatchLab_FreeU_V2", "PatchLab_GuidanceInterval", "PatchLab_SelfAttentionGuidance",
         "PatchLab_PerturbedAttentionGuidance", "PatchLab_AdaptiveProjectedGuidance", "PatchLab_AdaptiveGuidance",
         "PatchLab_RescaleCFG", "RescaleCFG"]
SAVED = re.compile(r"PatchLab guidance skipping: negative prompt left out of (\d+) of (\d+) model calls")


@pytest.fixture(scope="module")
def stack_prompt(object_info):
    return workflows.api_prompt_for(workflows.EXAMPLE_DIR / "guidance_skip_stack.json", object_info)


def images(server, prompt):
    return sorted(Image.open(p).tobytes() for p in server.output_images(server.run(prompt)))


def saved_lines(server):
    return [tuple(map(int, m.groups())) for m in SAVED.finditer(server.log_tail(400))]


@pytest.fixture(scope="module")
def stack_images(server, stack_prompt):
    return images(server, stack_prompt)


def test_the_stack_holds_every_patch(stack_prompt):
    assert sorted(n["class_type"] for n in stack_prompt.values() if n["class_type"] in STACK) == sorted(STACK)


def test_the_stack_runs_and_is_deterministic(server, stack_prompt, stack_images):
    assert stack_images and images(server, stack_prompt) == stack_images


def test_the_run_logs_the_negative_passes_it_left_out(server, stack_prompt, stack_images):
    skipped, calls = saved_lines(server)[-1]
    assert calls == 3 and 1 <= skipped < calls  # 3 test steps; the first (sigma 14.6) lies outside the interval


def test_bypassing_the_interval_changes_the_image(server, stack_prompt, stack_images):
    node_id = next(i for i, n in stack_prompt.items() if n["class_type"] == "PatchLab_GuidanceInterval")
    assert images(server, workflows.bypass(stack_prompt, node_id)) != stack_images


@pytest.mark.parametrize("name", ["guidance_interval", "adaptive_guidance", "renorm_cfg"])
def test_the_single_node_examples_run(server, object_info, name):
    prompt = workflows.api_prompt_for(workflows.EXAMPLE_DIR / f"{name}.json", object_info)
    assert images(server, prompt)


def test_a_threshold_above_one_is_rejected_and_the_server_stays_up(server, stack_prompt):
    prompt = {k: {**v, "inputs": dict(v["inputs"])} for k, v in stack_prompt.items()}
    node = next(n for n in prompt.values() if n["class_type"] == "PatchLab_AdaptiveGuidance")
    node["inputs"]["threshold"] = 1.5
    with pytest.raises(PromptRejected) as rejected:
        server.queue(prompt)
    assert "threshold is 1.5, above its maximum 1.0" in str(rejected.value)
    assert server.alive()
