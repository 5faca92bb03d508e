"""Node summaries in the editor are silent where no ComfyUI server runs (scripts, these in-process tests)."""

import sys

import pytest

from devtools import sampling
from patchlab.patches import canvas

pack = sys.modules["patchlab"]
NODES = pack.NODE_CLASS_MAPPINGS
SHOWING = ["PatchLab_StepCache", "PatchLab_DeepCache", "PatchLab_GuidanceInterval", "PatchLab_AdaptiveGuidance",
           "PatchLab_RenormCFG"]


def test_no_server_no_text():
    assert canvas.show("7", "evaluated 1 of 2 rows") is False


def test_no_node_id_no_text():
    assert canvas.show(None, "evaluated 1 of 2 rows") is False


@pytest.mark.parametrize("node_id", SHOWING)
def test_the_node_asks_for_its_graph_id(node_id):
    assert NODES[node_id].INPUT_TYPES()["hidden"] == {"unique_id": "UNIQUE_ID"}


@pytest.mark.parametrize("rows, evaluated, text", [(40, 18, "2.2x fewer"), (40, 40, "1.0x fewer"),
                                                  (40, 0, "none ran"), (0, 0, "nothing to run")])
def test_fewer_states_the_ratio_of_rows(rows, evaluated, text):
    assert canvas.fewer(rows, evaluated) == text


def test_a_run_in_process_samples_with_a_graph_id_and_no_server(tiny_model):
    model = tiny_model("sd15")
    patched = NODES["PatchLab_StepCache"]().patch(model, "input", 0.3, 3, "forecast", 0.0, 1.0, unique_id="7")[0]
    assert sampling.sample(patched, "sd15", steps=4).isfinite().all()
