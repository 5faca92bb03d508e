"""Running a block under a ``dit`` block replace (:func:`run_block`), and wrapping a block's ``forward`` for the
length of one model call, on networks without a block replace
(Lumina 2 / Z-Image's NextDiT in 0.3.75): an instance attribute over the class's method, undone when the
call returns. Wraps nest: each wraps the forward the block has at that moment (another wrapper's or the
class's), and each undo puts back what was there, so two packs' wrappers undone in reverse order leave the
block as it was."""

from __future__ import annotations

import types
from typing import Callable, Dict


def run_block(previous, args: Dict, extra: Dict):
    """Run a block from a ``dit`` block replace: through the replace that was there before ours (chained), or
    the block itself (``extra["original_block"]``)."""
    return previous(args, extra) if previous is not None else extra["original_block"](args)


def wrap(block, make: Callable[[Callable], Callable]) -> Callable[[], None]:
    """Set ``block.forward = make(inner)``, ``inner`` being the block's current forward; returns the undo."""
    previous = block.__dict__.get("forward")
    inner = previous if previous is not None else types.MethodType(type(block).forward, block)
    block.forward = make(inner)

    def undo():
        if previous is not None:
            block.forward = previous
        elif "forward" in block.__dict__:
            del block.forward

    return undo
