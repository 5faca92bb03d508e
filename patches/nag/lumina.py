"""Normalized Attention Guidance on Z-Image and Lumina 2 (NextDiT): single-stream layers over [caption; image].

As on Flux (:mod:`.flux`, the stream of :mod:`.joint`), the negative prompt gets a text stream of
its own and never an image stream. NextDiT first refines the caption alone (``context_refiner``,
text-only blocks without modulation), then runs its main layers over the joined [caption; image]
tokens. So the negative goes through ``cap_embedder``, Z-Image's caption padding (``cap_pad_token``
up to a multiple of ``pad_tokens_multiple``) and the context refiner with the caption's rotary
positions (1, 2, ... on the first axis) once per model call; then in every main layer it runs the
layer's own code on its tokens: modulation (the layer's ``adaLN_modulation`` of the positive rows'
time embedding), norms, qkv with grouped-query heads, q/k norm, rotary embedding; the layer's
attention call is overridden (the image queries attend to [negative caption keys; image keys] -> Z-,
the negative's queries to the same keys), then the gated output and feed-forward.

0.3.75's NextDiT has no block replace: a DIFFUSION_MODEL wrapper wraps the main layers' ``forward``
for the length of the call (:mod:`.block_forward`, nesting with the attention-guidance nodes'
wrapper). The image tokens keep the rotary position the positive caption's length gives them (the
negative is not a pass of its own). Newer ComfyUI's Z-Image edit mode (reference latents) is not
guided: a warning, and the layers run plain.
"""

from __future__ import annotations

import logging
from typing import Dict, Optional

import comfy.patcher_extension
import comfy.utils
import torch
from comfy.ldm.flux.math import apply_rope

from .. import block_forward, once
from .core import CALL_KEY, NODE_ID, call_parts
from .joint import STATE_PE, STATE_TEXT, Negative, make_override, rows_of, stream

log = logging.getLogger(__name__)

WRAPPER_KEY = "patchlab_nag_lumina"
STATE_CAPTION = "caption"    # the positive caption's (padded) length: where the image tokens start


def _padded(net, feats: torch.Tensor) -> torch.Tensor:
    multiple = getattr(net, "pad_tokens_multiple", None)
    if not multiple:
        return feats
    extra = (-feats.shape[1]) % multiple
    pad = net.cap_pad_token.to(device=feats.device, dtype=feats.dtype, copy=True)
    return torch.cat((feats, pad.unsqueeze(0).repeat(feats.shape[0], extra, 1)), dim=1)


def caption_rope(net, tokens: int, device) -> torch.Tensor:
    """The rotary embedding of ``tokens`` caption positions as NextDiT numbers them (1, 2, ... on the first
    axis)."""
    ids = torch.zeros(1, tokens, 3, dtype=torch.float32, device=device)
    ids[:, :, 0] = torch.arange(tokens, dtype=torch.float32, device=device) + 1.0
    return net.rope_embedder(ids).movedim(1, 2)


def network_text(base, negative: torch.Tensor, t: torch.Tensor, options: Dict,
                 mask: Optional[torch.Tensor]) -> torch.Tensor:
    """The negative prompt as NextDiT's main layers read a caption [1, T-, C]: embedded, padded, refined."""
    net = base.diffusion_model
    text = _padded(net, net.cap_embedder(negative))
    rope = caption_rope(net, text.shape[1], text.device)
    for layer in net.context_refiner:
        text = layer(text, None, rope, transformer_options={})
    return text


def _clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(x, nan=0.0, posinf=65504, neginf=-65504) if x.dtype == torch.float16 else x


def _negative_qkv(attention, hidden: torch.Tensor, rope: torch.Tensor) -> Negative:
    """The layer's q/k/v of the negative's tokens [R, H, T-, D] (grouped-query k/v repeated to the query heads)."""
    rows, tokens, _ = hidden.shape
    heads, kv_heads, dim = attention.n_local_heads, attention.n_local_kv_heads, attention.head_dim
    q, k, v = torch.split(attention.qkv(hidden), [heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    q = attention.q_norm(q.view(rows, tokens, heads, dim))
    k = attention.k_norm(k.view(rows, tokens, kv_heads, dim))
    v = v.view(rows, tokens, kv_heads, dim)
    q, k = apply_rope(q, k, rope)
    repeat = heads // kv_heads
    k = k.unsqueeze(3).repeat(1, 1, 1, repeat, 1).flatten(2, 3)
    v = v.unsqueeze(3).repeat(1, 1, 1, repeat, 1).flatten(2, 3)
    return Negative(q.movedim(1, 2), k.movedim(1, 2), v.movedim(1, 2))


def _layer_forward(layer, inner):
    """A main layer's forward with NAG in its attention and the negative stream advanced."""
    def forward(x, x_mask, freqs_cis, adaln_input=None, *args, transformer_options=None, **kwargs):
        options = transformer_options or {}
        call, parts = call_parts(options, x.shape[0])
        if not parts or adaln_input is None or kwargs.get("timestep_zero_index") is not None:
            return inner(x, x_mask, freqs_cis, adaln_input, *args, transformer_options=transformer_options, **kwargs)
        text = stream(call, parts, lambda tokens, device: caption_rope(call.network, tokens, device))
        scale_msa, gate_msa, scale_mlp, gate_mlp = layer.adaLN_modulation(rows_of(adaln_input, parts)).chunk(4, dim=1)
        negative = _negative_qkv(layer.attention, layer.attention_norm1(text) * (1 + scale_msa.unsqueeze(1)),
                                 call.state[STATE_PE])
        n_txt = call.state[STATE_CAPTION]
        inner_options = block_forward.override_options(
            options, lambda previous: make_override(previous, call, parts, negative, lambda n: (n_txt, n)))
        out = inner(x, x_mask, freqs_cis, adaln_input, *args, transformer_options=inner_options, **kwargs)
        if negative.text_out is not None:
            attended = _clamp_fp16(layer.attention.out(negative.text_out))
            text = text + gate_msa.unsqueeze(1).tanh() * layer.attention_norm2(attended)
            fed = _clamp_fp16(layer.feed_forward(layer.ffn_norm1(text) * (1 + scale_mlp.unsqueeze(1))))
            call.state[STATE_TEXT] = text + gate_mlp.unsqueeze(1).tanh() * layer.ffn_norm2(fed)
        return out

    return forward


def diffusion_model_wrapper(executor, x, timesteps, context, *args, **kwargs):
    """DIFFUSION_MODEL wrapper: in calls NAG guides, every main layer's forward is wrapped for the call."""
    options = kwargs.get("transformer_options") or {}
    call = options.get(CALL_KEY)
    if call is None or context is None:
        return executor(x, timesteps, context, *args, **kwargs)
    if kwargs.get("ref_latents"):
        once.warn_once(log, f"{NODE_ID}: Z-Image's edit mode (reference latents) is not guided; the layers run plain")
        return executor(x, timesteps, context, *args, **kwargs)
    net = executor.class_obj
    call.state[STATE_CAPTION] = context.shape[1] + (-context.shape[1]) % (getattr(net, "pad_tokens_multiple", 0) or 1)
    undo = []
    try:
        for layer in net.layers:
            undo.append(block_forward.wrap(layer, lambda inner, layer=layer: _layer_forward(layer, inner)))
        return executor(x, timesteps, context, *args, **kwargs)
    finally:
        for step in reversed(undo):
            step()


def install(patched) -> None:
    """The DIFFUSION_MODEL wrapper (once)."""
    wrappers = patched.get_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY)
    if not wrappers:
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY,
                                     diffusion_model_wrapper)
