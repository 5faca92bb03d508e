"""Attention guidance on DiTs: the per-block replace and the attention override it installs.

A DiT block is addressed as ``stack.index`` (``double.7``, ``single.0``, ``joint.10``), the stacks
named as ComfyUI's ``patches_replace["dit"]`` names them: Qwen-Image's transformer blocks and Wan's
blocks are ``double.N`` (ComfyUI replaces them as ``double_block``); Lumina 2 / Z-Image's main
layers, one stream of [text; image], are ``single.N``. PatchLab puts a block replace at every
chosen block (chaining a replace another pack put there); Lumina 2's NextDiT has no block replace in
0.3.75, so a DIFFUSION_MODEL wrapper wraps the chosen layers' ``forward`` for the length of
PatchLab's own extra passes only, through the same function. In normal passes it only calls the
block. In PatchLab's extra passes (``transformer_options["patchlab_guidance_pass"]`` holds the
specs, one group of batch rows each) it acts on the rows of the specs that chose this block:

* SLG rows: the block is skipped (its output is its input for those rows);
* PAG / SEG rows: the block runs with an ``optimized_attention_override`` (chained to one
  already present) that, in those rows only, replaces image-to-image attention by the
  identity (PAG: image tokens attend to the text and to themselves; on Wan, whose
  self-attention holds no text, the identity) or blurs the image queries on the token grid
  (SEG). The override lives in a copy of ``transformer_options`` handed to this block only, so
  no other block sees it. In a Wan block it acts in the block's first attention call only, the
  self-attention (the cross-attention reads the text);
* TPG rows: the block runs with those rows' image tokens in a seeded random order, and its update
  (output minus input) is added to the stream. In the UNets TPG was made for, attention knows no
  positions: the shuffled transformer's output landing on the unshuffled residual is the whole
  perturbation, and SD3 (positions added once, at the input) gets that rule. Where positions enter
  every attention as a rotary embedding (Flux, Chroma, HunyuanVideo, Wan, Qwen-Image, Lumina 2 /
  Z-Image) the order itself perturbs (each token attends as if it stood at another's place), and
  each token's update goes back to its own token: added to the token whose place it took, it also
  scrambles the content, which breaks the colours of the trained Flux-layout reference model.

Token layout (:class:`Stack`): Flux/HunyuanVideo double, SD3 joint and Qwen-Image blocks get both
streams and attend over [text; image] ([image; text] where the block is ``flipped_img_txt``,
HunyuanVideo); Flux and Lumina 2 single blocks get [text; image], the text length from the
conditioning (recorded by an APPLY_MODEL wrapper in extra passes with the latent shape; Lumina 2
pads it to a multiple of ``pad_tokens_multiple``); HunyuanVideo single blocks get [image; text],
the image length from the latent's patch grid. The image grid is ``ceil(H / p) x ceil(W / p)``
for patch size ``p`` (the models pad to whole patches), ``ceil(T / pt) x ...`` for a video, the
first tokens of the image stream (Flux Kontext and Qwen-Image Edit reference tokens follow it
and are treated as image tokens but not blurred; reference latents put ahead of the grid, as
HunyuanVideo's ``ref_latent``, switch SEG's blur off with a warning). SEG blurs a video frame by
frame (see :func:`kernels.attention.blur_queries`). Qwen-Image's latent has a frame axis of length 1
([B, C, 1, H, W]) and a 2-D grid. The models apply the rotary embedding before the attention call,
so the queries SEG blurs carry it.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import comfy.patcher_extension

from ...kernels import attention as ka
from .. import block_forward, once
from ..families import Stack
from .blocks import DitKey, _rope, _stacks_of, network_patch, patch_size
from .core import MARK, PASS_KEY, STEP_KEY, WRAPPER_KEY, shuffle_seed

log = logging.getLogger(__name__)
_warn_once = functools.partial(once.warn_once, log)  # a warning per process, not per step

LATENT_KEY = "patchlab_latent_shape"
TEXT_KEY = "patchlab_text_tokens"
REFERENCE_KEY = "patchlab_reference_latents"


def apply_model_wrapper(executor, x, *args, **kwargs):
    """APPLY_MODEL wrapper: in PatchLab's extra passes, hand the latent shape and text length to the blocks
    (and whether reference latents join the image stream, which moves the image grid)."""
    args = list(args)
    options = args[4] if len(args) > 4 else kwargs.get("transformer_options")
    if options is not None and options.get(PASS_KEY):
        options = dict(options)
        options[LATENT_KEY] = tuple(x.shape)
        context = args[2] if len(args) > 2 else kwargs.get("c_crossattn")
        options[TEXT_KEY] = None if context is None else int(context.shape[1])
        options[REFERENCE_KEY] = kwargs.get("ref_latent") is not None
        if len(args) > 4:
            args[4] = options
        else:
            kwargs["transformer_options"] = options
    return executor(x, *args, **kwargs)


setattr(apply_model_wrapper, MARK, True)


def install_wrappers(patched, forward_wrapped: bool) -> None:
    WrappersMP = comfy.patcher_extension.WrappersMP
    if not patched.get_wrappers(WrappersMP.APPLY_MODEL, WRAPPER_KEY):
        patched.add_wrapper_with_key(WrappersMP.APPLY_MODEL, WRAPPER_KEY, apply_model_wrapper)
    if forward_wrapped and not patched.get_wrappers(WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY):
        patched.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, diffusion_model_wrapper)


@dataclass(frozen=True)
class Tokens:
    """Where text and image tokens lie in this block's attention calls."""

    joint: int                 # tokens of the joint (text + image) sequence
    text: Tuple[int, int]      # text range inside the joint sequence
    image: Tuple[int, int]     # image range inside the joint sequence (grid first, then reference tokens)
    grid: Optional[Tuple[int, ...]]  # the image's token grid (h, w) or (t, h, w); None when it cannot be placed
    calls: Optional[int] = None  # act in the block's first ``calls`` attention calls only (Wan: self-attention)

    def split(self, n: int):
        """(text range, image range) for an attention call over n tokens, or None for other calls."""
        if n == self.joint:
            return self.text, self.image
        if n == self.image[1] - self.image[0]:  # image-only self-attention (SD3.5's x-block attn2)
            return (0, 0), (0, n)
        return None


def _heads_first(t, heads: int, skip_reshape: bool):
    if skip_reshape:
        return t
    return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)  # [B, N, H*D] or [B, N, H, D]


def _write(out, part: slice, tokens: Tuple[int, int], values, skip_output_reshape: bool) -> None:
    """Write heads-first values [b, H, n, D] into rows ``part``, tokens ``tokens`` of the attention output."""
    if skip_output_reshape:
        out[part, :, tokens[0]:tokens[1]] = values.to(out.dtype)
    else:
        batch, heads, n, dim = values.shape
        out[part, tokens[0]:tokens[1]] = values.transpose(1, 2).reshape(batch, n, heads * dim).to(out.dtype)


def make_override(previous, parts, tokens: Tokens):
    """An ``optimized_attention_override`` perturbing ``parts`` [(batch-row slice, spec)] of this block's calls.

    Made for one block call (it counts that call's attention calls when ``tokens.calls`` is set)."""
    seen = [0]

    def override(func, *args, **kwargs):
        out = block_forward.attend(previous, func, *args, **kwargs)
        seen[0] += 1
        if tokens.calls is not None and seen[0] > tokens.calls:
            return out
        q, k, v = args[:3]
        heads = args[3] if len(args) > 3 else kwargs.get("heads")
        skip_reshape = kwargs.get("skip_reshape", False)
        n_q = q.shape[2] if skip_reshape else q.shape[1]
        n_k = k.shape[2] if skip_reshape else k.shape[1]
        layout = tokens.split(n_q) if n_q == n_k else None
        if layout is None:
            return out
        text, image = layout
        out = out.clone()
        for part, spec in parts:
            qh, kh, vh = (_heads_first(t[part], heads, skip_reshape) for t in (q, k, v))
            if spec.kind == "pag":
                if kh.shape[1] != qh.shape[1]:  # grouped-query attention: repeat the key/value heads
                    kh = kh.repeat_interleave(qh.shape[1] // kh.shape[1], dim=1)
                    vh = vh.repeat_interleave(qh.shape[1] // vh.shape[1], dim=1)
                values = ka.joint_identity_attention(qh, kh, vh, text, image)
                _write(out, part, image, values, kwargs.get("skip_output_reshape", False))
            elif spec.kind == "seg" and tokens.grid is not None:
                blurred = ka.blur_grid_queries(qh, image[0], tokens.grid, spec.blur_sigma)
                if not skip_reshape:
                    blurred = blurred.transpose(1, 2).reshape(q[part].shape)
                sub_kwargs = dict(kwargs)
                mask = kwargs.get("mask")
                if mask is not None and mask.ndim >= 3 and mask.shape[0] == q.shape[0]:
                    sub_kwargs["mask"] = mask[part]
                out[part] = block_forward.attend(previous, func, blurred, k[part], v[part], *args[3:],
                                                 **sub_kwargs).to(out.dtype)
        return out

    setattr(override, MARK, True)
    return override


def _grid(options: Dict, patch: Tuple[int, int, int], image_tokens: int) -> Optional[Tuple[int, ...]]:
    """The image's token grid: (h, w) for a picture, (t, h, w) for a video (None: no grid SEG can blur)."""
    shape = options.get(LATENT_KEY)
    if shape is None or len(shape) not in (4, 5):
        _warn_once("Smoothed Energy Guidance blurs image and video latents only; this call's latent is neither")
        return None
    if options.get(REFERENCE_KEY):
        _warn_once("Smoothed Energy Guidance: reference latents join this model's image tokens ahead of the "
                   "picture's grid; no blur")
        return None
    frames = -(-shape[2] // patch[0]) if len(shape) == 5 else 1
    grid = (-(-shape[-2] // patch[1]), -(-shape[-1] // patch[2]))
    if frames > 1:
        grid = (frames,) + grid
    if math.prod(grid) > image_tokens:
        _warn_once("Smoothed Energy Guidance found fewer image tokens than the latent's patch grid; no blur")
        return None
    return grid


def _tokens(stack: Stack, args: Dict, options: Dict, patch: Tuple[int, int, int], flipped: bool,
            text_multiple: Optional[int]) -> Optional[Tokens]:
    img, txt = args.get("img"), args.get("txt")
    if stack.tokens == "self":  # Wan: the image attends to itself, then reads the text in cross-attention
        n_img = img.shape[1]
        return Tokens(n_img, (0, 0), (0, n_img), _grid(options, patch, n_img), calls=1)
    if stack.tokens == "joint":  # the block gets both streams (Flux/HunyuanVideo double, SD3 joint, Qwen-Image)
        n_txt, n_img = txt.shape[1], img.shape[1]
        if flipped:
            text, image = (n_img, n_img + n_txt), (0, n_img)
        else:
            text, image = (0, n_txt), (n_txt, n_txt + n_img)
        return Tokens(n_txt + n_img, text, image, _grid(options, patch, n_img))
    n_joint = img.shape[1]
    if stack.tokens == "text_last":  # HunyuanVideo single blocks: [image; text], the image from the grid
        grid = _grid(options, patch, n_joint)
        if grid is None:
            _warn_once("attention guidance could not place the image tokens of a single-stream block; it is "
                       "left as is")
            return None
        n_img = math.prod(grid)
        return Tokens(n_joint, (n_img, n_joint), (0, n_img), grid)
    n_txt = options.get(TEXT_KEY)
    if n_txt is not None and text_multiple:  # Lumina 2 / Z-Image pad the caption to a multiple of tokens
        n_txt += -n_txt % text_multiple
    if n_txt is None or n_txt > n_joint:
        _warn_once("attention guidance could not tell text from image tokens in a DiT block; it is left as is")
        return None
    return Tokens(n_joint, (0, n_txt), (n_txt, n_joint), _grid(options, patch, n_joint - n_txt))


def make_block_replace(key: DitKey, previous, stack: Stack, patch: Tuple[int, int, int], flipped: bool = False,
                       text_multiple: Optional[int] = None, rope: bool = True):
    """The ``patches_replace["dit"]`` replace PatchLab puts at block ``key``, chaining ``previous`` (or None).
    ``rope``: the network's positions enter each attention as a rotary embedding (TPG's rule, below)."""
    def block_replace(args, extra):
        options = args.get("transformer_options") or {}
        groups = options.get(PASS_KEY)
        acting = [g for g, spec in enumerate(groups or ()) if key in spec.blocks]
        if not acting:
            return block_forward.run_block(previous, args, extra)
        chunks = max(1, len(options.get("cond_or_uncond", [0])))
        per_chunk = args["img"].shape[0] // chunks
        rows = per_chunk // len(groups)
        slices = {g: [slice(c * per_chunk + g * rows, c * per_chunk + (g + 1) * rows) for c in range(chunks)]
                  for g in acting}
        streams = [name for name in ("img", "txt") if args.get(name) is not None and stack.tokens != "self"]
        streams = streams or ["img"]
        skipped = [part for g in acting if groups[g].kind == "slg" for part in slices[g]]
        if len(skipped) == chunks * len(groups):  # every row skips this block
            return {name: args[name] for name in streams}
        saved = [(part, {name: args[name][part].clone() for name in streams}) for part in skipped]
        parts = [(part, groups[g]) for g in acting if groups[g].kind in ("pag", "seg") for part in slices[g]]
        shuffled = [(part, groups[g], c, g) for g in acting if groups[g].kind == "tpg"
                    for c, part in enumerate(slices[g])]
        before = None
        if shuffled:
            args, before, image, orders = _shuffle_image(args, shuffled, key, stack, options, patch, flipped,
                                                         text_multiple)
            shuffled_in = args["img"].clone() if before is not None else None  # blocks may add in place
        if parts:
            tokens = _tokens(stack, args, options, patch, flipped, text_multiple)
            if tokens is not None:
                args = block_forward.with_override(args, lambda previous: make_override(previous, parts, tokens))
        out = block_forward.run_block(previous, args, extra)
        if before is not None:  # TPG rows: the block's update, computed on shuffled tokens, added to the stream
            out = dict(out)
            img = out["img"].clone()
            for (part, _, _, _), order in zip(shuffled, orders):
                update = out["img"][part] - shuffled_in[part]
                if rope:  # each token's update back to its own token
                    update = ka.unshuffle_tokens(update, image[0], image[1], order)
                img[part] = before[part] + update
            out["img"] = img
        if saved:
            out = dict(out)
            for name in streams:
                if out.get(name) is None:
                    continue
                result = out[name].clone()
                for part, values in saved:
                    result[part] = values[name]
                out[name] = result
        return out

    setattr(block_replace, MARK, True)
    return block_replace


def _shuffle_image(args: Dict, shuffled, key: DitKey, stack: Stack, options: Dict, patch, flipped: bool,
                   text_multiple: Optional[int]):
    """TPG: the block's arguments with the image tokens of the shuffled rows reordered, the unshuffled image
    stream (None where the image tokens cannot be placed), the image token range and each part's permutation."""
    img = args["img"]
    if stack.tokens in ("joint", "self"):
        image = (0, img.shape[1])
    else:
        tokens = _tokens(stack, args, options, patch, flipped, text_multiple)
        if tokens is None:
            return args, None, None, []
        image = tokens.image
    step = options.get(STEP_KEY, 0)
    out = img.clone()
    orders = []
    for part, spec, chunk, group in shuffled:
        permutation = ka.token_permutation(image[1] - image[0], shuffle_seed(spec, step, key, chunk, group))
        out[part] = ka.shuffle_tokens(img[part], image[0], image[1], permutation)
        orders.append(permutation)
    return {**args, "img": out}, img, image, orders


def install_replaces(patched, keys) -> None:
    """Put PatchLab's block replace at every key (once; another pack's replace there is chained). Networks
    without a block replace (Lumina 2 / Z-Image) get a DIFFUSION_MODEL wrapper instead, which wraps the chosen
    blocks' forward for the length of PatchLab's extra passes."""
    net = patched.model.diffusion_model
    patch = patch_size(patched)
    net_stacks = _stacks_of(net)
    rope = _rope(net)
    forward_wrapped = False
    for stack_name, index in sorted(keys):
        stack = net_stacks[stack_name]
        if stack.replace is None:
            forward_wrapped = True
            continue
        flipped = bool(getattr(getattr(net, stack.attr)[index], "flipped_img_txt", False))
        block_forward.install_block_replace(
            patched, stack.replace, index,
            lambda previous, key=(stack_name, index), stack=stack, flipped=flipped: make_block_replace(
                key, previous, stack, patch, flipped, rope=rope),
            MARK)
    install_wrappers(patched, forward_wrapped)


def diffusion_model_wrapper(executor, *args, **kwargs):
    """DIFFUSION_MODEL wrapper for networks without a block replace: in PatchLab's extra passes only, each
    chosen block's ``forward`` is wrapped (an instance attribute, removed when the call returns) so it runs
    through :func:`make_block_replace` exactly as a block replace would. Other calls run untouched."""
    options = kwargs.get("transformer_options") or {}
    groups = options.get(PASS_KEY)
    net = executor.class_obj
    net_stacks = _stacks_of(net)
    if not groups or not net_stacks:
        return executor(*args, **kwargs)
    patch = network_patch(net)
    text_multiple = getattr(net, "pad_tokens_multiple", None)
    rope = _rope(net)
    undo = []
    try:
        for stack_name, index in sorted({key for spec in groups for key in spec.blocks}):
            stack = net_stacks.get(stack_name)
            if stack is None or stack.replace is not None or index >= len(getattr(net, stack.attr)):
                continue
            replace = make_block_replace((stack_name, index), None, stack, patch, text_multiple=text_multiple,
                                         rope=rope)
            undo.append(block_forward.wrap(getattr(net, stack.attr)[index],
                                           lambda inner, replace=replace: _lumina_forward(inner, replace)))
        return executor(*args, **kwargs)
    finally:
        for step in reversed(undo):
            step()


setattr(diffusion_model_wrapper, MARK, True)


def _lumina_forward(inner, replace):
    """``JointTransformerBlock.forward(x, x_mask, freqs_cis, adaln_input, ..., transformer_options)`` through
    ``replace``, ``inner`` the forward it wraps (the arguments after ``x`` are passed on as given: newer releases
    add keyword arguments)."""
    def forward(x, *args, transformer_options=None, **kwargs):
        def original_block(block_args):
            return {"img": inner(block_args["img"], *args, transformer_options=block_args["transformer_options"],
                                 **kwargs)}

        return replace({"img": x, "transformer_options": transformer_options or {}},
                       {"original_block": original_block})["img"]

    return forward
