"""PatchLab's ComfyUI nodes (V1 node API), collected from one module per family."""

from __future__ import annotations

from . import (
    _common,
    attention_guidance,
    blocks,
    cfg,
    deep_cache,
    guidance_skip,
    inpaint,
    instantid,
    model_sampling,
    nag,
    schedule_preview,
    step_cache,
    token_merging,
)

ALL_NODES = [
    *model_sampling.NODES,
    *schedule_preview.NODES,
    *cfg.NODES,
    *guidance_skip.NODES,
    *blocks.NODES,
    *inpaint.NODES,
    *attention_guidance.NODES,
    *nag.NODES,
    *token_merging.NODES,
    *step_cache.NODES,
    *deep_cache.NODES,
    *instantid.NODES,
]

# Every node's FLOAT inputs reject NaN and infinities before a run (see _common.guard_inputs).
for _node in ALL_NODES:
    _common.guard_inputs(_node)

NODE_CLASS_MAPPINGS = {node.NODE_ID: node for node in ALL_NODES}
NODE_DISPLAY_NAME_MAPPINGS = {node.NODE_ID: node.DISPLAY_NAME for node in ALL_NODES}
