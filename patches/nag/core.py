"""NAG's shared core: the node's spec, the keys, the negative prompt of a run, and which rows a call guides.

* :class:`NagSpec`: the node's settings (frozen, shared by clones);
* the negative prompt, per run: a ``SAMPLER_SAMPLE`` wrapper reads the guider's processed ``negative``
  conditioning (present at CFG 1 too, where ComfyUI leaves it out of the model calls), or the node's own
  ``negative`` input, and puts its tensor into that run's copy of the model options;
* per model call, :class:`NagCall`: the negative in the network's text space and the running network,
  handed to the layers by the APPLY_MODEL wrapper (``patches.nag``); :func:`call_parts` tells a hook
  which rows of its call it guides (the positive chunks) and :func:`guide` applies the kernel.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import comfy.sampler_helpers
import comfy.samplers
import torch

from ...kernels import attention as ka
from .. import block_forward, keys, once
from ..window import SigmaWindow

log = logging.getLogger(__name__)
_warn_once = functools.partial(once.warn_once, log)  # a warning per process, not per step

SPEC_KEY = "patchlab_nag"                 # transformer_options: the NagSpec
NEGATIVE_KEY = "patchlab_nag_negative"    # a run's options: the negative prompt's tensor [B, T, C]
NEGATIVE_MASK_KEY = "patchlab_nag_negative_mask"  # a run's options: its text attention mask [B, T], or None
CALL_KEY = "patchlab_nag_call"            # a model call's options: the negative in the network's text space
WRAPPER_KEY = "patchlab_nag"
MARK = keys.NAG_MARK
NODE_ID = "PatchLab_NormalizedAttentionGuidance"


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


# --- which rows a call guides ----------------------------------------------------------------------------

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
    block_forward.install_block_replaces(patched, name, count, make, MARK)


def guided_replace(previous, guided):
    """A ``dit`` block replace that runs the block as it is in calls NAG does not guide, else returns
    ``guided(args, call, parts, run)``: ``run(args)`` runs the block (through ``previous``, chained), and
    ``guided`` returns ``run(args)`` itself where it finds nothing to guide."""
    def block_replace(args, extra):
        call, parts = call_parts(args.get("transformer_options") or {}, args["img"].shape[0])

        def run(block_args):
            return block_forward.run_block(previous, block_args, extra)

        return guided(args, call, parts, run) if parts else run(args)

    setattr(block_replace, MARK, True)
    return block_replace


def guide_rows(out: torch.Tensor, z_neg: torch.Tensor, part: slice, spec: NagSpec) -> None:
    """NAG on the rows ``part`` of an attention output, in place: ``Z+`` there against ``z_neg``."""
    out[part] = ka.normalized_attention_guidance(out[part], z_neg, spec.scale, spec.tau, spec.alpha)
