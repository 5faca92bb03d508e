"""NAG on UNets (SD1.x, SD2.x, SDXL): an attn2 replace at every transformer.

Each replace projects the negative's keys and values with that transformer's own ``attn2.to_k`` /
``to_v`` and lets the same queries attend to them (Z-), then combines Z+ and Z- in the positive rows.
A replace another pack put at the transformer is chained.
"""

from __future__ import annotations

from typing import Dict, Optional

import comfy.utils
import torch

from .. import unet
from .core import MARK, NODE_ID, call_parts, guide_rows


def network_text(base, negative: torch.Tensor, t: torch.Tensor, options: Dict,
                 mask: Optional[torch.Tensor]) -> torch.Tensor:
    """The negative as a UNet's cross-attention reads it: the text encoder's output as it is."""
    return negative


def cross_attention(net, extra) -> torch.nn.Module:
    """The ``attn2`` of the transformer an attn2 replace is called for (``block``, ``block_index``)."""
    block = unet.transformer_block(net, unet.key_of(extra))
    if block is None:
        stage, block_id = extra["block"]
        raise RuntimeError(f"{NODE_ID}: found no transformer at {stage}.{block_id} of this UNet")
    return block.attn2


def make_replace(previous=None):
    """The attn2 replace at one transformer key (``previous``: a replace another pack put there, chained)."""
    def attn2_replace(q, k, v, extra_options):
        out = unet.attend(q, k, v, extra_options, previous)
        call, parts = call_parts(extra_options, q.shape[0])
        if not parts:
            return out
        attn2 = cross_attention(call.network, extra_options)
        k_neg = comfy.utils.repeat_to_batch_size(attn2.to_k(call.context), q.shape[0])
        v_neg = comfy.utils.repeat_to_batch_size(attn2.to_v(call.context), q.shape[0])
        out = out.clone()
        if previous is not None:  # the chained replace sees the whole call, as it expects
            z_neg = unet.attend(q, k_neg, v_neg, extra_options, previous)
            for part in parts:
                guide_rows(out, z_neg[part], part, call.spec)
            return out
        for part in parts:
            guide_rows(out, unet.attend(q[part], k_neg[part], v_neg[part], extra_options), part, call.spec)
        return out

    setattr(attn2_replace, MARK, True)
    return attn2_replace


def install(patched) -> None:
    """A NAG attn2 replace at every transformer (once; another replace there is chained)."""
    for key in unet.transformer_keys(patched):
        existing = unet.existing_replace(patched.model_options, "attn2", key)
        if existing is not None and getattr(existing, MARK, False):
            continue
        patched.set_model_attn2_replace(make_replace(existing), key[0], key[1], key[2])
