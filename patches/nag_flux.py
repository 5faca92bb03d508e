"""Normalized Attention Guidance on Flux-layout DiTs (Flux.1, Flux.2, Chroma, HunyuanVideo): joint attention.

Flux has no cross-attention: text and image tokens attend to each other in one joint call per
block. Z- needs the negative prompt's own text tokens as they would be at that block, so the
negative gets a **text stream of its own** (its ``txt_in`` embedding, carried block by block with
each block's text-side weights: modulation, norm, qkv, q/k norm, projection, MLP), but never an
image stream: in every block its keys and values sit next to the image keys and values the
positive pass has just computed (after RoPE), and

* the image queries attend once more, to ``[K-text; K-image]`` -> Z-; the image rows of the
  joint attention output become ``NAG(Z+, Z-)`` before the output projection;
* the negative text queries attend to the same keys -> their update, as the block would
  compute it for a text stream beside this image stream.

Per block: the text-side linear layers on the negative's tokens and two attention calls of
their size (image queries x (text + image) keys, text queries x the same keys). No second image
stream (a CFG pass would run the whole network again). The negative text stream lives in the
model call's :class:`~.nag.NagCall` (``state``) and dies with it.

Hooks: a ``double_block`` / ``single_block`` replace on every block (chaining one already there)
computes the negative's q/k/v before the block and installs an ``optimized_attention_override``
for the block's one attention call; after the block, it advances the negative text stream.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import comfy.utils
import torch
from comfy.ldm.flux.math import apply_rope

from ..kernels import attention as ka
from .block_forward import run_block
from .nag import call_parts, cond_parts, install_block_replaces

STATE_TEXT = "text"            # the negative text stream [R, T-, C]
STATE_PE = "pe"                # its rotary embedding
STATE_TEXT_TOKENS = "tokens"   # the positive prompt's text length (Flux single blocks: [text; image])
STATE_IMAGE_TOKENS = "image"   # the image stream's length (HunyuanVideo single blocks: [image; text])
STATE_TEXT_LAST = "text_last"  # whether the double blocks put the text last (HunyuanVideo)


def network_text(base, negative: torch.Tensor, t: torch.Tensor, options: Dict,
                 mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The negative prompt in the network's text-stream space [R, T-, C] (``txt_in``; HunyuanVideo's token refiner
    reads each row's timestep, so it gets one row per positive row of the call, and the negative's text mask, an
    additive bias [1, T-])."""
    net = base.diffusion_model
    if type(net).__module__.startswith("comfy.ldm.hunyuan_video"):
        parts = cond_parts(options.get("cond_or_uncond", []), t.shape[0])
        if not parts:
            return negative
        rows = sum(part.stop - part.start for part in parts)
        repeated = comfy.utils.repeat_to_batch_size(negative, rows)
        timesteps = base.model_sampling.timestep(rows_of(t, parts)).float()
        rows_mask = comfy.utils.repeat_to_batch_size(mask, rows) if mask is not None else None
        text = net.txt_in(repeated, timesteps, rows_mask, transformer_options=options)
        embed = getattr(net, "cond_type_embedding", None)
        if embed is not None:
            text = text + embed(torch.zeros_like(text[:, :, 0], dtype=torch.long)).to(text.dtype)
        return text
    return net.txt_in(negative)


def text_rope(net, tokens: int, device) -> torch.Tensor:
    """The rotary embedding of ``tokens`` text positions as the network's forward builds them (zeros; Flux.2 counts
    positions on its fourth axis)."""
    axes = len(net.params.axes_dim)
    ids = torch.zeros((1, tokens, axes), device=device, dtype=torch.float32)
    if axes == 4:
        ids[:, :, 3] = torch.linspace(0, tokens - 1, steps=tokens, device=device, dtype=torch.float32)
    return net.pe_embedder(ids)


def _heads(qkv: torch.Tensor, heads: int):
    q, k, v = qkv.view(qkv.shape[0], qkv.shape[1], 3, heads, -1).permute(2, 0, 3, 1, 4)
    return q, k, v


def rows_of(t: torch.Tensor, parts: List[slice]) -> torch.Tensor:
    """The rows of ``t`` in ``parts``, in order (dim 0)."""
    return torch.cat([t[part] for part in parts]) if len(parts) > 1 else t[parts[0]]


def _mod_rows(mod, parts: List[slice]):
    """A ModulationOut whose tensors are cut to the rows of ``parts`` (rows of 1 broadcast)."""
    fields = {}
    for name in ("shift", "scale", "gate"):
        t = getattr(mod, name)
        fields[name] = t if t.shape[0] == 1 else rows_of(t, parts)
    return type(mod)(**fields)


def _apply(tensor, mult, add=None):
    return torch.addcmul(add, tensor, mult) if add is not None else tensor * mult


def _double_text_mods(block, vec):
    txt_mod = getattr(block, "txt_mod", None)
    if getattr(block, "modulation", False) and txt_mod is not None:
        return txt_mod(vec)
    return vec[1]


def _single_mod(block, vec):
    modulation = getattr(block, "modulation", None)
    if isinstance(modulation, torch.nn.Module):
        return modulation(vec)[0]
    return vec


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
        out = previous(func, *args, **kwargs) if previous is not None else func(*args, **kwargs)
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

    override.patchlab_nag = True
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


def _flux_rope(call):
    return lambda tokens, device: text_rope(call.network, tokens, device)


def make_double_replace(index: int, previous=None):
    """The ``double_block`` replace of Flux block ``index``: NAG in its joint attention, the negative stream
    advanced."""
    def block_replace(args, extra):
        options = args.get("transformer_options") or {}
        call, parts = call_parts(options, args["img"].shape[0])
        if not parts:
            return run_block(previous, args, extra)
        block = call.network.double_blocks[index]
        text = stream(call, parts, _flux_rope(call))
        mod1, mod2 = (_mod_rows(m, parts) for m in _double_text_mods(block, args["vec"]))
        modulated = _apply(block.txt_norm1(text), 1 + mod1.scale, mod1.shift)
        q, k, v = _heads(block.txt_attn.qkv(modulated), block.num_heads)
        q, k = block.txt_attn.norm(q, k, v)
        q, k = apply_rope(q, k, call.state[STATE_PE])
        negative = Negative(q, k, v)
        n_img, n_txt = args["img"].shape[1], args["txt"].shape[1]
        flipped = getattr(block, "flipped_img_txt", False)
        call.state.update({STATE_TEXT_TOKENS: n_txt, STATE_IMAGE_TOKENS: n_img, STATE_TEXT_LAST: flipped})

        def image_range(n):
            return (0, n_img) if flipped else (n_txt, n_txt + n_img)

        inner = dict(options)
        inner["optimized_attention_override"] = make_override(
            options.get("optimized_attention_override"), call, parts, negative, image_range)
        out = run_block(previous, {**args, "transformer_options": inner}, extra)
        if negative.text_out is not None:
            text = text + _apply(block.txt_attn.proj(negative.text_out), mod1.gate)
            text = text + _apply(block.txt_mlp(_apply(block.txt_norm2(text), 1 + mod2.scale, mod2.shift)), mod2.gate)
            call.state[STATE_TEXT] = text
        return out

    block_replace.patchlab_nag = True
    return block_replace


def make_single_replace(index: int, previous=None):
    """The ``single_block`` replace of Flux block ``index`` (one stream [text; image])."""
    def block_replace(args, extra):
        options = args.get("transformer_options") or {}
        call, parts = call_parts(options, args["img"].shape[0])
        n_txt = call.state.get(STATE_TEXT_TOKENS) if call is not None else None
        if not parts or n_txt is None:
            return run_block(previous, args, extra)
        block = call.network.single_blocks[index]
        text = stream(call, parts, _flux_rope(call))
        mod = _mod_rows(_single_mod(block, args["vec"]), parts)
        hidden = block.hidden_size
        qkv, mlp = torch.split(block.linear1(_apply(block.pre_norm(text), 1 + mod.scale, mod.shift)),
                               [3 * hidden, block.linear1.out_features - 3 * hidden], dim=-1)
        q, k, v = _heads(qkv, block.num_heads)
        q, k = block.norm(q, k, v)
        q, k = apply_rope(q, k, call.state[STATE_PE])
        negative = Negative(q, k, v)

        def image_range(n):
            return (0, call.state[STATE_IMAGE_TOKENS]) if call.state.get(STATE_TEXT_LAST) else (n_txt, n)

        inner = dict(options)
        inner["optimized_attention_override"] = make_override(
            options.get("optimized_attention_override"), call, parts, negative, image_range)
        out = run_block(previous, {**args, "transformer_options": inner}, extra)
        if negative.text_out is not None:
            update = block.linear2(torch.cat((negative.text_out, block.mlp_act(mlp)), 2))
            call.state[STATE_TEXT] = text + _apply(update, mod.gate)
        return out

    block_replace.patchlab_nag = True
    return block_replace


def install(patched) -> None:
    """A NAG replace on every double and single block (once; another replace there is chained)."""
    net = patched.model.diffusion_model
    install_block_replaces(patched, "double_block", len(net.double_blocks), make_double_replace)
    install_block_replaces(patched, "single_block", len(net.single_blocks), make_single_replace)
