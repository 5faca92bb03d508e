"""The negative prompt's text stream on joint-attention DiTs (Flux, Flux.2, Chroma, HunyuanVideo, SD3/SD3.5,
Qwen-Image, Z-Image / Lumina 2).

These networks have no cross-attention: text and image tokens attend to each other in one joint call
per block. Z- needs the negative prompt's own text tokens as they would be at that block, so the
negative gets a **text stream of its own** (each family module carries it block by block with the
block's text-side weights), but never an image stream: in every block its keys and values sit next
to the image keys and values the positive pass has just computed (after RoPE), and

* the image queries attend once more, to ``[K-text; K-image]`` -> Z-; the image rows of the joint
  attention output become ``NAG(Z+, Z-)`` before the output projection;
* the negative text queries attend to the same keys -> their update, as the block would compute it
  for a text stream beside this image stream.

Per block: the text-side linear layers on the negative's tokens and two attention calls of their
size. The stream lives in the model call's :class:`~.core.NagCall` (``state``) and dies with it.
"""

from __future__ import annotations

from typing import List, Optional

import comfy.utils
import torch

from ...kernels import attention as ka
from .. import block_forward
from .core import MARK

STATE_TEXT = "text"            # the negative text stream [R, T-, C]
STATE_PE = "pe"                # its rotary embedding


def rows_of(t: torch.Tensor, parts: List[slice]) -> torch.Tensor:
    """The rows of ``t`` in ``parts``, in order (dim 0)."""
    return torch.cat([t[part] for part in parts]) if len(parts) > 1 else t[parts[0]]


class Negative:
    """The negative text stream's pieces for one block call: its q/k/v, and its attention output once the override
    has run."""

    def __init__(self, q, k, v):
        self.q, self.k, self.v = q, k, v
        self.text_out: Optional[torch.Tensor] = None


def make_override(previous, call, parts: List[slice], negative: Negative, image_range, token_dim: int = 2,
                  which: int = 1):
    """``optimized_attention_override`` for one block call of a joint-attention DiT: in the block's ``which``-th
    attention call, NAG on the image rows of the cond ``parts``, and the negative text queries' attention recorded
    for the stream update. ``token_dim``: the token axis of q/k/v (2 for [B, H, N, D], 1 for [B, N, H*D]); the
    output is [B, N, H*D] either way."""
    seen = [0]

    def override(func, *args, **kwargs):
        out = block_forward.attend(previous, func, *args, **kwargs)
        seen[0] += 1
        if seen[0] != which:
            return out
        q, k, v = args[:3]
        sub = dict(kwargs)
        sub.pop("mask", None)
        heads = args[3] if len(args) > 3 else sub.pop("heads")
        start, stop = image_range(q.shape[token_dim])
        mask = None  # over [negative text; image] keys: the negative's text mask, the image all attended
        if call.mask is not None:
            rows = sum(part.stop - part.start for part in parts)
            text_mask = comfy.utils.repeat_to_batch_size(call.mask, rows).to(q.dtype)
            mask = torch.cat([text_mask, text_mask.new_zeros(rows, stop - start)], dim=1).view(rows, 1, 1, -1)
        if len(args) > 4:
            rest = (mask, *args[5:])
        else:
            rest = ()
            if mask is not None:
                sub["mask"] = mask
        q_img, k_img, v_img = (rows_of(t, parts).narrow(token_dim, start, stop - start) for t in (q, k, v))
        k_neg = torch.cat([negative.k.to(k_img.dtype), k_img], dim=token_dim)
        v_neg = torch.cat([negative.v.to(v_img.dtype), v_img], dim=token_dim)
        z_neg = func(q_img, k_neg, v_neg, heads, *rest, **sub)
        negative.text_out = func(negative.q.to(q_img.dtype), k_neg, v_neg, heads, *rest, **sub)
        out = out.clone()
        offset = 0
        for part in parts:
            rows = part.stop - part.start
            out[part, start:stop] = ka.normalized_attention_guidance(
                out[part, start:stop], z_neg[offset:offset + rows], call.spec.scale, call.spec.tau, call.spec.alpha)
            offset += rows
        return out

    setattr(override, MARK, True)
    return override


def stream(call, parts: List[slice], rope=None) -> torch.Tensor:
    """The negative text stream [R, T-, C] for this call's cond rows, created at the first block from the call's
    negative (``rope(tokens, device)``: its rotary embedding, kept in the call's state as ``STATE_PE``)."""
    text = call.state.get(STATE_TEXT)
    if text is None:
        rows = sum(part.stop - part.start for part in parts)
        text = comfy.utils.repeat_to_batch_size(call.context, rows)
        call.state[STATE_TEXT] = text
        if rope is not None:
            call.state[STATE_PE] = rope(text.shape[1], text.device)
    return text


