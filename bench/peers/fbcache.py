"""First Block Cache (FBCache): reuse the remaining blocks when the first block changed little (pure torch).

Reference code: chengzeyi/Comfy-WaveSpeed (``first_block_cache.py``: ``get_can_use_cache``,
``are_two_tensors_similar``, ``create_patch_unet_model__forward``, ``create_patch_flux_forward_orig``;
``fbcache_nodes.py``: ``ApplyFBCacheOnModel``; commit 8253745), itself ParaAttention's FBCache
(chengzeyi/ParaAttention, ``para_attn/first_block_cache``) for ComfyUI. No paper.

Per model call, with ``f`` the first block's indicator and ``f_ref`` that of the last full evaluation::

    reuse   if mean|f_ref - f| / mean|f_ref| < threshold        (and the consecutive-hit limit allows)
    reuse:  h = h_first + R          (R: the remaining blocks' residual from the last full evaluation)
    else:   run the remaining blocks; R = h_out - h_first; f_ref = f

The reference is only replaced on full evaluations, so the change is measured against the last evaluation,
not the last call (the difference from TeaCache's accumulator).

The indicator (what :mod:`..binding` hands in as ``feature``), as the reference computes it per family:

* SD1.x UNet: the residual of input block 1 over input block 0's output (``h - original_h`` at ``id == 1``);
* Flux: the *output* of double block 0 (Comfy-WaveSpeed's native Flux path sets
  ``first_hidden_states_residual = img``, the block's output, not its residual);
* Wan 2.1: Comfy-WaveSpeed has no Wan path; ParaAttention's and diffusers' FBCache use the first block's residual
  (output minus input), which is what is used here.

Defaults (:data:`DEFAULTS`): the Comfy-WaveSpeed README's values: Flux 0.12 (flux-dev, 28 steps); the UNet 0.2
(its only UNet row, SDXL); Wan 0.1 (no Wan row: the value it publishes for the other video DiTs, HunyuanVideo
and LTX-Video). ``max_consecutive_hits`` -1 (unlimited), the node's default; its start/end window defaults to
the whole run and is left out.
"""

from __future__ import annotations

from typing import Optional

import torch

from .common import Rule, relative_l1

DEFAULTS = {
    "flux": {"threshold": 0.12, "max_consecutive_hits": -1},
    "wan": {"threshold": 0.1, "max_consecutive_hits": -1},
    "unet": {"threshold": 0.2, "max_consecutive_hits": -1},
}


class FBCache(Rule):
    """FBCache's rule for one chunk of one run; ``feature``: the first block's indicator [rows, ...]."""

    def __init__(self, threshold: float, max_consecutive_hits: int = -1):
        super().__init__()
        self.threshold, self.max_consecutive_hits = threshold, max_consecutive_hits
        self.reference: Optional[torch.Tensor] = None
        self.pending: Optional[torch.Tensor] = None
        self.hits = 0
        self.last_change: Optional[float] = None

    def decide(self, step: int, steps: int, feature: Optional[torch.Tensor] = None) -> bool:
        self.pending = feature.detach()
        if self.reference is None or self.reference.shape != feature.shape or self.cached is None:
            self.last_change = None
            return False
        self.last_change = relative_l1(feature, self.reference)
        use = self.last_change < self.threshold
        use = use and (self.max_consecutive_hits < 0 or self.hits < self.max_consecutive_hits)
        self.hits = self.hits + 1 if use else 0
        return use

    def store(self, step: int, residual: torch.Tensor) -> None:
        super().store(step, residual)
        self.reference = self.pending
