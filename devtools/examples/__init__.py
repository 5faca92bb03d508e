"""The example workflows in example_workflows/, written as Python, one module per node family.

``scripts/build_workflows.py`` turns each registered function into an editor-format
JSON file; a test checks the files are up to date. Checkpoint names are the usual file
names of the models each workflow is meant for; the test kit maps them to tiny models.
To add a family: a module here whose functions use ``@example("file_stem")``, listed
in FAMILIES.
"""

from __future__ import annotations

import importlib
from typing import Dict, List, Tuple

from ._common import EXAMPLES
from .builder import Builder

FAMILIES = ["model_sampling", "cfg", "guidance_skip", "attention_guidance", "nag", "token_merging", "step_cache",
            "deep_cache", "instantid"]


def build_all(object_info: Dict) -> List[Tuple[str, Dict]]:
    """(file name, UI workflow) for every example."""
    for family in FAMILIES:
        importlib.import_module(f"{__name__}.{family}")
    out = []
    for name, fn in sorted(EXAMPLES.items()):
        wf = Builder(object_info)
        fn(wf)
        out.append((f"{name}.json", wf.to_ui()))
    return out
