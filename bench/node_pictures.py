"""One picture per help page: what a node does to the trained reference models' samples.

Rows: the prompts red circle, blue square, yellow triangle; seed 1, euler, 20 steps,
128 px; the same initial noise in every column. Columns per model (``sd15_shapes``, and
``flux_shapes`` where the node applies to DiTs):

* most nodes: without | with the node, both at CFG 5;
* attention guidance (PAG, SEG, SLG, TPG): CFG 5 | CFG 5 + node | CFG 1 | CFG 1 + node;
* NAG: CFG 1 | CFG 1 + NAG | CFG 5.

Writes ``web/docs/pictures/<node id>.png`` (the help pages show them).

    .venv/bin/python bench/node_pictures.py                    # every node
    .venv/bin/python bench/node_pictures.py PatchLab_StepCache # some
"""

from __future__ import annotations

import argparse
from typing import Dict, Tuple

import _common
import shapes_grid

PROMPTS = ("red circle", "blue square", "yellow triangle")
SEED = 1
OUT = _common.REPO_ROOT / "web" / "docs" / "pictures"
UNET, BOTH = ("sd15_shapes",), ("sd15_shapes", "flux_shapes")
# node id -> (short name, kind, models, inputs that differ from the node's defaults)
NODES: Dict[str, Tuple[str, str, Tuple[str, ...], Dict]] = {
    "PatchLab_StepCache": ("StepCache", "plain", BOTH, {}),
    "PatchLab_DeepCache": ("DeepCache", "plain", UNET, {}),
    "PatchLab_TokenMerging": ("ToMe 0.5", "plain", UNET, shapes_grid.TOME),
    "PatchLab_TokenDownsampling": ("ToDo", "plain", UNET, {"max_downsample": 1}),
    "PatchLab_GuidanceInterval": ("GuidanceInterval", "plain", BOTH, {}),
    "PatchLab_AdaptiveGuidance": ("AdaptiveGuidance", "plain", BOTH, {}),
    "PatchLab_RenormCFG": ("RenormCFG", "plain", BOTH,
                           {"cfg_trunc": 70.0, "renorm_cfg": 0.0, "truncate": "paper"}),
    "PatchLab_RescaleCFG": ("RescaleCFG", "plain", BOTH, {}),
    "PatchLab_CFGNorm": ("CFGNorm", "plain", BOTH, {}),
    "PatchLab_AdaptiveProjectedGuidance": ("APG", "plain", BOTH, {}),
    "PatchLab_TangentialDampingCFG": ("TCFG", "plain", BOTH, {}),
    "PatchLab_Mahiro": ("Mahiro", "plain", BOTH, {}),
    "PatchLab_CFGZeroStar": ("CFGZeroStar", "plain", BOTH, {}),
    "PatchLab_FreeU": ("FreeU", "plain", UNET, {}),
    "PatchLab_FreeU_V2": ("FreeU_V2", "plain", UNET, {}),
    "PatchLab_SelfAttentionGuidance": ("SAG", "plain", UNET, {}),
    "PatchLab_PerturbedAttentionGuidance": ("PAG", "attention", BOTH, {}),
    "PatchLab_SmoothedEnergyGuidance": ("SEG", "attention", BOTH, {}),
    "PatchLab_SkipLayerGuidance": ("SLG", "attention", BOTH, {}),
    "PatchLab_TokenPerturbationGuidance": ("TPG", "attention", BOTH, {}),
    "PatchLab_NormalizedAttentionGuidance": ("NAG", "nag", BOTH, {}),
}


def columns(node_id: str):
    """The node's columns, as shapes_grid.Column tuples."""
    name, kind, _, inputs = NODES[node_id]
    if kind == "plain":
        return (("without", None, {}, None), (f"with {name}", node_id, inputs, None))
    if kind == "attention":
        return (("CFG 5", None, {}, None), (f"CFG 5 + {name}", node_id, inputs, None),
                ("CFG 1", None, {}, 1.0), (f"CFG 1 + {name}", node_id, inputs, 1.0))
    return (("CFG 1", None, {}, 1.0), (f"CFG 1 + {name}", node_id, inputs, 1.0), ("CFG 5", None, {}, None))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("nodes", nargs="*", help="node ids (default: all)")
    args = parser.parse_args()
    unknown = set(args.nodes) - set(NODES)
    if unknown:
        parser.error(f"no picture is defined for {', '.join(sorted(unknown))}; choose from {', '.join(NODES)}")
    _common.boot(cpu=True)
    OUT.mkdir(parents=True, exist_ok=True)
    memo: Dict = {}
    for node_id in args.nodes or NODES:
        models = NODES[node_id][2]
        groups = [(model, shapes_grid.sample_columns(model, columns(node_id), PROMPTS, SEED, memo))
                  for model in models]
        path = OUT / f"{node_id}.png"
        shapes_grid.draw(groups, PROMPTS).save(path)
        print(f"{path}: {', '.join(models)}", flush=True)


if __name__ == "__main__":
    main()
