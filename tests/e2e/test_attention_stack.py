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



# --- PAG + SEG + SLG on Flux and SD3.5 (tiny stand-ins) -------------------------------------------------------

DIT_STACK = ["PatchLab_PerturbedAttentionGuidance", "PatchLab_SmoothedEnergyGuidance", "PatchLab_SkipLayerGuidance"]
SHARED = "PatchLab attention guidance: PAG, SEG, SLG in one batched extra model call per step (3 rows for 1 image(s))"


@pytest.fixture(scope="module")
def flux_prompt(object_info):
    prompt = workflows.api_prompt_for(workflows.EXAMPLE_DIR / "attention_guidance_flux.json", object_info)
    for node in prompt.values():
        if node["class_type"] == "PatchLab_SkipLayerGuidance":  # all three active from the first step
            node["inputs"]["start_percent"], node["inputs"]["end_percent"] = 0.0, 0.5
    return prompt


@pytest.fixture(scope="module")
def flux_images(server, flux_prompt):
    return images(server, flux_prompt)


def test_the_flux_stack_shares_one_batched_extra_call_per_step(server, flux_prompt):
    before = server.log_tail(400).count(SHARED)
    server.run(flux_prompt)
    assert server.log_tail(400).count(SHARED) == before + 1  # one line per run
    assert server.alive()


@pytest.mark.parametrize("node_type", DIT_STACK)
def test_every_guidance_in_the_flux_stack_has_an_effect(server, flux_prompt, flux_images, node_type):
    node_id = next(i for i, n in flux_prompt.items() if n["class_type"] == node_type)
    assert images(server, workflows.bypass(flux_prompt, node_id)) != flux_images


def test_a_block_flux_lacks_is_reported_with_the_blocks_it_has(server, flux_prompt):
    prompt = {k: {**v, "inputs": dict(v["inputs"])} for k, v in flux_prompt.items()}
    node = next(n for n in prompt.values() if n["class_type"] == "PatchLab_SkipLayerGuidance")
    node["inputs"]["blocks"] = "double.40"
    entry = server.wait(server.queue(prompt))
    assert "does not exist in this model; it has double.0, single.0-1" in str(entry)
    assert server.alive()


def test_the_sd35_workflow_runs(server, object_info):
    prompt = workflows.api_prompt_for(workflows.EXAMPLE_DIR / "attention_guidance_sd35.json", object_info)
    assert images(server, prompt)
