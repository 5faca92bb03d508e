"""What the speed nodes saved, shown on their own node in the editor.

The example workflows run through the real server over a websocket with the prompt's client
id, as the editor runs them; ComfyUI's progress text (binary message type 3: node id length,
node id, text) carries each node's summary after each run.
"""

import re

import pytest

from devtools import workflows

pytestmark = pytest.mark.e2e
STEPS = 8
ROWS = re.compile(r"evaluated (\d+) of (\d+) rows: (\d+\.\d)x fewer")
STEP_CACHE = re.compile(r"evaluated (\d+) of (\d+) rows: \d+\.\dx fewer; (\d+) of (\d+) steps reused")
DEEP_CACHE = re.compile(r"deep blocks ran on (\d+) of (\d+) steps; (\d+) on cached features")
GUIDANCE_OFF = re.compile(r"guidance off in (\d+) of (\d+) model calls; evaluated (\d+) of (\d+) rows: "
                          r"\d+\.\dx fewer")


def watched(server, object_info, workflow, node_type, **inputs):
    """Run an example workflow at STEPS steps; the id of its ``node_type`` node and the texts it showed."""
    prompt = workflows.api_prompt_for(workflows.EXAMPLE_DIR / f"{workflow}.json", object_info)
    node_id = next(i for i, n in prompt.items() if n["class_type"] == node_type)
    prompt[node_id]["inputs"].update(inputs)
    for node in prompt.values():
        if node["class_type"] == "KSampler":
            node["inputs"]["steps"] = STEPS
    entry, texts = server.run_watched(prompt)
    assert server.output_images(entry)
    return node_id, [t.text for t in texts if t.node == node_id]


def test_step_cache_shows_the_rows_it_evaluated_on_its_node(server, object_info):
    _, shown = watched(server, object_info, "step_cache_flux", "PatchLab_StepCache", threshold=0.5)
    assert len(shown) == 1
    evaluated, total, reused, steps = map(int, STEP_CACHE.fullmatch(shown[0]).groups())
    assert (total, steps) == (STEPS, STEPS)  # Flux at CFG 1: one row a step
    assert 0 < reused and evaluated == total - reused


def test_the_speed_up_shown_is_the_ratio_of_the_rows(server, object_info):
    _, shown = watched(server, object_info, "step_cache_flux", "PatchLab_StepCache", threshold=0.5)
    evaluated, total, ratio = ROWS.match(shown[0]).groups()
    assert float(ratio) == round(int(total) / int(evaluated), 1)


def test_deep_cache_shows_on_how_many_steps_the_deep_blocks_ran(server, object_info):
    _, shown = watched(server, object_info, "deep_cache_sd15", "PatchLab_DeepCache")
    assert len(shown) == 1
    full, steps, cached = map(int, DEEP_CACHE.fullmatch(shown[0]).groups())
    assert (full, steps, cached) == (3, STEPS, STEPS - 3)  # interval 3: steps 0, 3 and 6 in full


@pytest.mark.parametrize("workflow, node_type", [
    ("guidance_interval", "PatchLab_GuidanceInterval"),
    ("adaptive_guidance", "PatchLab_AdaptiveGuidance"),
    ("renorm_cfg", "PatchLab_RenormCFG"),
])
def test_guidance_skipping_shows_the_negative_passes_it_left_out(server, object_info, workflow, node_type):
    _, shown = watched(server, object_info, workflow, node_type)
    assert len(shown) == 1
    off, calls, evaluated, total = map(int, GUIDANCE_OFF.fullmatch(shown[0]).groups())
    assert calls == STEPS and total == 2 * STEPS  # one image, positive and negative, every step
    assert evaluated == total - off  # each call with guidance off left one negative row out


def test_the_interval_and_the_truncation_turn_guidance_off_somewhere(server, object_info):
    for workflow, node_type in (("guidance_interval", "PatchLab_GuidanceInterval"),
                                ("renorm_cfg", "PatchLab_RenormCFG")):
        _, shown = watched(server, object_info, workflow, node_type)
        assert int(GUIDANCE_OFF.fullmatch(shown[0]).group(1)) > 0, workflow


def test_a_text_goes_to_its_own_node_only(server, object_info):
    prompt = workflows.api_prompt_for(workflows.EXAMPLE_DIR / "step_cache_flux.json", object_info)
    node_id = next(i for i, n in prompt.items() if n["class_type"] == "PatchLab_StepCache")
    _, texts = server.run_watched(prompt)
    assert [t.node for t in texts] == [node_id]
