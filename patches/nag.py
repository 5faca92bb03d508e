"""Normalized Attention Guidance (Chen et al. 2025, arXiv 2505.21179) as a MODEL patch.

In every attention that reads the text, the same queries attend once more, to the *negative*
prompt's keys and values: ``Z+ = Attn(Q, K+, V+)``, ``Z- = Attn(Q, K-, V-)``, combined per token
by :func:`kernels.attention.normalized_attention_guidance` before the layer's output projection
(as the paper's reference code). Only the rows of the positive prompt are guided (chunks tagged
cond in ``cond_or_uncond``: at CFG 1 every row, at CFG > 1 the positive branch; the negative
branch of CFG stays plain, and PatchLab's PAG/SEG/SLG/TPG extra passes, tagged cond, are guided
as the positive they are compared with).

Where the pieces come from:

* the negative prompt: a ``SAMPLER_SAMPLE`` wrapper reads the guider's processed ``negative``
  conditioning (present at CFG 1 too, where ComfyUI leaves it out of the model calls), or the
  node's own ``negative`` input, and puts its tensor into that run's copy of the model options;
* per model call, an ``APPLY_MODEL`` wrapper checks the schedule window once and maps the
  negative into the network's text space (UNets: as it is; Wan: the network's ``text_embedding``),
  handing it and the running network (whose layers project it) to the layers;
* UNets (SD1.x, SD2.x, SDXL): an **attn2 replace** at every transformer (chaining one another
  pack put there) projects K- and V- with that transformer's own ``attn2.to_k`` / ``to_v``;
* Wan 2.1 / 2.2: a ``double_block`` **block replace** on every block installs an
  ``optimized_attention_override`` for that block call which acts in the attention call that reads
  the text (K- and V- through the block's ``cross_attn.k`` / ``norm_k`` / ``v``): the second, or in
  image-to-video the third (its cross-attention first attends to the CLIP vision tokens, left as is);
* Flux, Flux.2, Chroma, HunyuanVideo (joint attention): :mod:`.nag_flux` (a text stream for the
  negative, no second image stream); SD3/SD3.5: :mod:`.nag_mmdit`; Qwen-Image: :mod:`.nag_qwen`;
  Z-Image / Lumina 2: :mod:`.nag_lumina` (the same scheme on their blocks).

The negative prompt never runs as a pass of its own: per guided layer, the K/V projections of
its tokens and one more cross-attention of the positive rows (joint-attention models: the
negative's text side of each block and two attention calls of its size). A step a step cache reuses is not
re-guided: the cached prediction already carries the guidance of the step it came from.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import comfy.patcher_extension
import comfy.sampler_helpers
import comfy.samplers
import comfy.utils
import torch

from ..kernels import attention as ka
from . import attention_guidance, families, once
from .block_forward import run_block
from .window import SigmaWindow

log = logging.getLogger(__name__)
_warn_once = functools.partial(once.warn_once, log)  # a warning per process, not per step

SPEC_KEY = "patchlab_nag"                 # transformer_options: the NagSpec
NEGATIVE_KEY = "patchlab_nag_negative"    # a run's options: the negative prompt's tensor [B, T, C]
NEGATIVE_MASK_KEY = "patchlab_nag_negative_mask"  # a run's options: its text attention mask [B, T], or None
CALL_KEY = "patchlab_nag_call"            # a model call's options: the negative in the network's text space
WRAPPER_KEY = "patchlab_nag"
NODE_ID = "PatchLab_NormalizedAttentionGuidance"
WRAPPERS = comfy.patcher_extension.WrappersMP
# Wan cross-attention classes -> which attention call of a Wan block reads the text: self-attention is the first;
# image-to-video's cross-attention attends to the CLIP vision tokens (second) before the text (third).
WAN_CROSS_ATTENTIONS = {"WanT2VCrossAttention": 2, "WanI2VCrossAttention": 3}


@dataclass(frozen=True, eq=False)
class NagSpec:
    """The node's settings; ``negative``: the node's own negative CONDITIONING (None: the sampler's)."""

    scale: float
    tau: float
    alpha: float
    window: SigmaWindow
    negative: Optional[list] = None

    @property
    def is_off(self) -> bool:
        return self.scale == 1.0 or self.alpha == 0.0

    def __deepcopy__(self, memo):
        return self


@dataclass(frozen=True, eq=False)
class NagCall:
    """One model call's NAG inputs: the negative in the network's text space [B-, T, C], the running network, the
    shape of the call's latent (Qwen-Image numbers its text positions from it), the negative's text attention mask
    as an additive bias [1, T] (None: every token attended)."""

    spec: NagSpec
    context: torch.Tensor
    network: torch.nn.Module
    latent_shape: tuple = ()
    mask: Optional[torch.Tensor] = None
    state: Dict = field(default_factory=dict)  # per call: the negative text stream of joint-attention models

    def __deepcopy__(self, memo):
        return self


# --- which family ---------------------------------------------------------------------------------

def family(model) -> str:
    """``unet``, ``wan``, ``flux``, ``mmdit``, ``qwen_image`` or ``lumina2``; RuntimeError naming the supported
    families for any other model."""
    if attention_guidance.transformer_keys(model):
        return "unet"
    net = model.model.diffusion_model
    row = families.of_network(net)
    if row is not None and row.key in ("flux", "hunyuan_video"):
        return "flux"
    if row is not None and row.key in ("mmdit", "qwen_image", "lumina2"):
        return row.key
    if row is not None and row.key == "wan":
        kinds = {type(block.cross_attn).__name__ for block in net.blocks}
        if not kinds <= set(WAN_CROSS_ATTENTIONS):
            raise RuntimeError(f"{NODE_ID} supports Wan's text-to-video and image-to-video cross-attention; this Wan "
                               f"model's is {', '.join(sorted(kinds))}. Remove the node for this model.")
        return "wan"
    raise RuntimeError(
        f"{NODE_ID} supports UNet models (SD1.x, SD2.x, SDXL), Wan 2.1/2.2 text-to-video, Flux, Flux.2, Chroma, "
        f"HunyuanVideo, SD3/SD3.5, Qwen-Image, Z-Image and Lumina 2; this model is {type(model.model).__name__} "
        f"with a {type(net).__name__} network. Remove the node for this model.")


# --- the negative prompt, per run -------------------------------------------------------------------

def _cond_tensor(cond: Dict) -> Optional[torch.Tensor]:
    """A processed conditioning entry's cross-attention tensor (the model's own ``c_crossattn``)."""
    model_cond = cond.get("model_conds", {}).get("c_crossattn")
    tensor = getattr(model_cond, "cond", None)
    return tensor if tensor is not None else cond.get("cross_attn")


def _entries(spec: NagSpec, guider, noise, latent_image, denoise_mask, seed) -> List[Dict]:
    """The negative conditioning entries, processed by the model as the sampler processes its own (the node's
    ``negative`` goes through ``extra_conds`` here: Flux.2 pads its text, for one)."""
    if spec.negative is None:
        return list((getattr(guider, "conds", None) or {}).get("negative", []) or [])
    entries = comfy.sampler_helpers.convert_cond(spec.negative)
    return comfy.samplers.encode_model_conds(guider.inner_model.extra_conds, entries, noise, noise.device, "negative",
                                             latent_image=latent_image, denoise_mask=denoise_mask, seed=seed)


def negative_tensor(entries: List[Dict]) -> torch.Tensor:
    """The negative prompt NAG guides away from: the first entry's cross-attention tensor [B, T, C]."""
    entries = [c for c in entries if _cond_tensor(c) is not None]
    if not entries:
        raise RuntimeError(f"{NODE_ID}: no negative prompt reached the sampler (a BasicGuider has none). "
                           "Connect a negative prompt to the node's optional 'negative' input, or sample with "
                           "KSampler / CFGGuider and a negative.")
    if len(entries) > 1:
        _warn_once(f"{NODE_ID}: the negative conditioning has {len(entries)} entries (combined or area "
                   "prompts); NAG uses the first. Connect one prompt to the node's 'negative' input to choose.")
    tensor = _cond_tensor(entries[0])
    if tensor.ndim != 3:
        raise ValueError(f"{NODE_ID}: the negative prompt's tensor has shape {tuple(tensor.shape)}; a text "
                         "encoder's output [batch, tokens, channels] is needed (connect a CLIPTextEncode output)")
    if not torch.isfinite(tensor).all():  # once per run
        raise ValueError(f"{NODE_ID}: the negative prompt holds NaN or infinite values; re-encode it")
    return tensor


def negative_mask(entries: List[Dict]) -> Optional[torch.Tensor]:
    """The negative prompt's text attention mask [B, T] (1 = a token, 0 = padding), where the model keeps one
    (HunyuanVideo, Lumina 2, ...) and it masks something; else None."""
    entries = [c for c in entries if _cond_tensor(c) is not None]
    mask = getattr(entries[0].get("model_conds", {}).get("attention_mask"), "cond", None) if entries else None
    if mask is None or mask.ndim != 2 or bool(mask.bool().all()):
        return None
    return mask


def sampler_sample_wrapper(executor, guider, sigmas, extra_args, callback, noise, latent_image=None,
                           denoise_mask=None, *args, **kwargs):
    """SAMPLER_SAMPLE wrapper: put the run's negative prompt into this run's (copied) model options."""
    options = extra_args.get("model_options", {})
    transformer_options = options.get("transformer_options", {})
    spec = transformer_options.get(SPEC_KEY)
    if spec is not None and not spec.is_off:
        entries = _entries(spec, guider, noise, latent_image, denoise_mask, extra_args.get("seed"))
        run_options = {**transformer_options, NEGATIVE_KEY: negative_tensor(entries),
                       NEGATIVE_MASK_KEY: negative_mask(entries)}
        extra_args = {**extra_args, "model_options": {**options, "transformer_options": run_options}}
    return executor(guider, sigmas, extra_args, callback, noise, latent_image, denoise_mask, *args, **kwargs)


# --- per model call -------------------------------------------------------------------------------------

def _text_space(base, negative: torch.Tensor, t: torch.Tensor, options: Dict,
                mask: Optional[torch.Tensor]) -> torch.Tensor:
    """The negative prompt as the network's attention layers read it (Wan embeds its text first, Flux's text
    stream starts at ``txt_in``, HunyuanVideo's token refiner reads the timestep too)."""
    net = base.diffusion_model
    row = families.of_network(net)
    if row is not None and row.key in ("flux", "hunyuan_video"):
        from . import nag_flux

        return nag_flux.network_text(base, negative, t, options, mask)
    if row is not None and row.key == "mmdit":
        from . import nag_mmdit

        return nag_mmdit.network_text(net, negative)
    if row is not None and row.key == "qwen_image":
        from . import nag_qwen

        return nag_qwen.network_text(net, negative)
    if row is not None and row.key == "lumina2":
        from . import nag_lumina

        return nag_lumina.network_text(net, negative)
    embed = getattr(net, "text_embedding", None)
    return embed(negative) if embed is not None else negative


def apply_model_wrapper(executor, x, t, *args, **kwargs):
    """APPLY_MODEL wrapper: inside the window, hand the layers the negative in the network's text space."""
    args = list(args)
    options = args[3] if len(args) > 3 else kwargs.get("transformer_options")
    spec = options.get(SPEC_KEY) if options else None
    negative = options.get(NEGATIVE_KEY) if options else None
    if spec is None or negative is None or spec.is_off or not spec.window.contains(t):
        return executor(x, t, *args, **kwargs)
    base = executor.class_obj
    dtype = base.manual_cast_dtype if base.manual_cast_dtype is not None else base.get_dtype()
    net = base.diffusion_model
    # the negative's text mask where the model masks the positive's text in every block (HunyuanVideo)
    row = families.of_network(net)
    mask = options.get(NEGATIVE_MASK_KEY) if row is not None and row.key == "hunyuan_video" else None
    if mask is not None:  # 1/0 -> an additive bias, as the model turns its own
        mask = (mask.to(device=x.device) - 1).to(dtype) * torch.finfo(dtype).max
    context = _text_space(base, negative.to(device=x.device, dtype=dtype), t, options, mask)
    options = {**options, CALL_KEY: NagCall(spec, context, net, tuple(x.shape), mask)}
    if len(args) > 3:
        args[3] = options
    else:
        kwargs["transformer_options"] = options
    return executor(x, t, *args, **kwargs)


def cond_parts(cond_or_uncond: List[int], rows: int) -> List[slice]:
    """The row ranges of the positive (cond) chunks of a call of ``rows`` rows."""
    chunks = max(1, len(cond_or_uncond))
    per_chunk = rows // chunks
    tags = cond_or_uncond or [0]
    return [slice(i * per_chunk, (i + 1) * per_chunk) for i, tag in enumerate(tags) if tag == 0]


def call_parts(options: Dict, rows: int):
    """(this model call's NagCall, the row ranges it guides) from a hook's ``transformer_options``; no parts where
    NAG does not act in this call."""
    call = options.get(CALL_KEY)
    return call, (cond_parts(options.get("cond_or_uncond", []), rows) if call is not None else [])


def install_block_replaces(patched, name: str, count: int, make) -> None:
    """NAG's ``make(index, previous)`` as the ``dit`` ``name`` replace of blocks 0..count-1 (once per block; a
    replace another node put there is chained)."""
    replaces = patched.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
    for index in range(count):
        existing = replaces.get((name, index))
        if existing is not None and getattr(existing, "patchlab_nag", False):
            continue
        patched.set_model_patch_replace(make(index, existing), "dit", name, index)


def _guide(out: torch.Tensor, z_neg: torch.Tensor, part: slice, spec: NagSpec) -> None:
    out[part] = ka.normalized_attention_guidance(out[part], z_neg, spec.scale, spec.tau, spec.alpha)


# --- UNets: the attn2 replace ---------------------------------------------------------------------------

def unet_cross_attention(net, extra) -> torch.nn.Module:
    """The ``attn2`` of the transformer an attn2 replace is called for (``block``, ``block_index``)."""
    stage, block_id = extra["block"]
    block = attention_guidance.transformer_block(net, (stage, block_id, extra.get("block_index", 0)))
    if block is None:
        raise RuntimeError(f"{NODE_ID}: found no transformer at {stage}.{block_id} of this UNet")
    return block.attn2


def make_unet_replace(previous=None):
    """The attn2 replace at one transformer key (``previous``: a replace another pack put there, chained)."""
    def attend(q, k, v, extra):
        return attention_guidance.attend(q, k, v, extra, previous)

    def attn2_replace(q, k, v, extra_options):
        out = attend(q, k, v, extra_options)
        call, parts = call_parts(extra_options, q.shape[0])
        if not parts:
            return out
        attn2 = unet_cross_attention(call.network, extra_options)
        k_neg = comfy.utils.repeat_to_batch_size(attn2.to_k(call.context), q.shape[0])
        v_neg = comfy.utils.repeat_to_batch_size(attn2.to_v(call.context), q.shape[0])
        out = out.clone()
        if previous is not None:  # the chained replace sees the whole call, as it expects
            z_neg = attend(q, k_neg, v_neg, extra_options)
            for part in parts:
                _guide(out, z_neg[part], part, call.spec)
            return out
        for part in parts:
            _guide(out, attend(q[part], k_neg[part], v_neg[part], extra_options), part, call.spec)
        return out

    attn2_replace.patchlab_nag = True
    return attn2_replace


def _install_unet(patched) -> None:
    replaces = patched.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    for key in attention_guidance.transformer_keys(patched):
        existing = replaces.get(key, replaces.get(key[:2]))
        if existing is not None and getattr(existing, "patchlab_nag", False):
            continue
        patched.set_model_attn2_replace(make_unet_replace(existing), key[0], key[1], key[2])


# --- Wan: a block replace and its attention override -----------------------------------------------------

def make_wan_override(previous, cross_attn, call: NagCall, parts: List[slice]):
    """An ``optimized_attention_override`` for one Wan block call: guides the attention call that reads the text
    (the second, or the third after image-to-video's CLIP vision tokens) in ``parts``; every other call goes on to
    ``previous`` (or the attention itself)."""
    seen = [0]
    text_call = WAN_CROSS_ATTENTIONS[type(cross_attn).__name__]

    def override(func, *args, **kwargs):
        out = previous(func, *args, **kwargs) if previous is not None else func(*args, **kwargs)
        seen[0] += 1
        if seen[0] != text_call:
            return out
        q = args[0]
        k_neg = comfy.utils.repeat_to_batch_size(cross_attn.norm_k(cross_attn.k(call.context)), q.shape[0])
        v_neg = comfy.utils.repeat_to_batch_size(cross_attn.v(call.context), q.shape[0])
        out = out.clone()
        for part in parts:
            _guide(out, func(q[part], k_neg[part], v_neg[part], *args[3:], **kwargs), part, call.spec)
        return out

    override.patchlab_nag = True
    return override


def make_wan_replace(index: int, previous=None):
    """The ``double_block`` replace PatchLab's NAG puts at Wan block ``index`` (chaining ``previous``)."""
    def block_replace(args, extra):
        options = args.get("transformer_options") or {}
        call, parts = call_parts(options, args["img"].shape[0])
        if not parts:
            return run_block(previous, args, extra)
        inner = dict(options)
        inner["optimized_attention_override"] = make_wan_override(
            options.get("optimized_attention_override"), call.network.blocks[index].cross_attn, call, parts)
        return run_block(previous, {**args, "transformer_options": inner}, extra)

    block_replace.patchlab_nag = True
    return block_replace


def _install_wan(patched) -> None:
    install_block_replaces(patched, "double_block", len(patched.model.diffusion_model.blocks), make_wan_replace)


# --- installing ---------------------------------------------------------------------------------------------

def with_nag(model, spec: NagSpec):
    """A clone guided by ``spec``: the layer hooks of the model's family, the two wrappers, the spec (a second
    NAG node replaces the first's settings)."""
    kind = family(model)
    patched = model.clone()
    if kind == "unet":
        _install_unet(patched)
    elif kind == "wan":
        _install_wan(patched)
    else:
        from . import nag_flux, nag_lumina, nag_mmdit, nag_qwen

        modules = {"flux": nag_flux, "mmdit": nag_mmdit, "qwen_image": nag_qwen, "lumina2": nag_lumina}
        modules[kind].install(patched)
    transformer_options = patched.model_options.setdefault("transformer_options", {})
    if transformer_options.get(SPEC_KEY) is not None:
        log.info("%s: this model already has NAG; the new node's settings replace the earlier ones", NODE_ID)
    transformer_options[SPEC_KEY] = spec
    if not patched.get_wrappers(WRAPPERS.SAMPLER_SAMPLE, WRAPPER_KEY):
        patched.add_wrapper_with_key(WRAPPERS.SAMPLER_SAMPLE, WRAPPER_KEY, sampler_sample_wrapper)
    if not patched.get_wrappers(WRAPPERS.APPLY_MODEL, WRAPPER_KEY):
        patched.add_wrapper_with_key(WRAPPERS.APPLY_MODEL, WRAPPER_KEY, apply_model_wrapper)
    return patched
