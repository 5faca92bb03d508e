"""What every peer rule shares: the rule protocol, the cached residual, and the relative L1 distance.

A rule lives for one sampling run and one chunk of the model calls (a cond or uncond part of the batch). Per
model call the binding asks it, in order:

* ``decide(step, steps, feature) -> bool``: may this call reuse? ``step`` is the index of the call's sigma in
  the run's schedule (0 .. steps - 1), ``feature`` the rule's indicator for this chunk (a tensor, or None for
  rules that read none). Every rule hears every call, so its counters and accumulators advance as in the
  reference, even when another chunk of the same call forces a full evaluation.
* ``reuse(step) -> residual``: the block stack's residual to add instead of running it (only after a True).
* ``store(step, residual)``: after a full evaluation, the residual the blocks produced (channels last).

A rule never reuses before it has stored a residual.
"""

from __future__ import annotations

from typing import Optional

import torch


def relative_l1(current: torch.Tensor, previous: torch.Tensor) -> float:
    """``mean|current - previous| / mean|previous|`` over the whole tensor (every item of the chunk), as a float.

    The references reduce over the whole chunk, batch included, and divide by the *previous* tensor's magnitude.
    """
    current = current.detach().float()
    previous = previous.detach().float().to(current.device)
    return float((current - previous).abs().mean() / previous.abs().mean().clamp_min(1e-12))


class Rule:
    """The protocol's defaults: keep the last stored residual and reuse it as it is."""

    def __init__(self):
        self.cached: Optional[torch.Tensor] = None

    def decide(self, step: int, steps: int, feature: Optional[torch.Tensor] = None) -> bool:
        raise NotImplementedError

    def store(self, step: int, residual: torch.Tensor) -> None:
        self.cached = residual

    def reuse(self, step: int) -> torch.Tensor:
        return self.cached
