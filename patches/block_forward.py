"""How PatchLab's techniques reach a DiT's blocks and attention calls, written once for all of them.

* :func:`install_block_replace` / :func:`install_block_replaces`: a ``dit`` block replace per block,
  installed once per technique (its marker attribute) and chaining a replace another pack put there;
* :func:`run_block`: inside such a replace, run the block through that chained replace or itself;
* :func:`with_override` / :func:`attend`: a block call whose attention goes through an
  ``optimized_attention_override`` of ours, chained to the override already present;
* :func:`wrap`: a block's ``forward`` wrapped for the length of one model call, on networks without a
  block replace (Lumina 2 / Z-Image's NextDiT in 0.3.75; a UNet's transformer for TPG): an instance
  attribute over the class's method, undone when the call returns. Wraps nest: each wraps the forward
  the block has at that moment (another wrapper's or the class's), and each undo puts back what was
  there, so two packs' wrappers undone in reverse order leave the block as it was.
"""

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


# --- block replaces and attention overrides, as every technique installs them ------------------------------

OVERRIDE = "optimized_attention_override"


def install_block_replace(patched, name: str, index: int, make: Callable, mark: str) -> None:
    """``make(previous)`` as the ``dit`` ``name`` replace of block ``index``, once: a replace there carrying the
    technique's ``mark`` attribute is kept; another pack's is chained (handed to ``make`` as ``previous``)."""
    replaces = patched.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
    existing = replaces.get((name, index))
    if existing is not None and getattr(existing, mark, False):
        return
    patched.set_model_patch_replace(make(existing), "dit", name, index)


def install_block_replaces(patched, name: str, count: int, make: Callable, mark: str) -> None:
    """``make(index, previous)`` as the ``dit`` ``name`` replace of blocks 0..count-1 (see install_block_replace)."""
    for index in range(count):
        install_block_replace(patched, name, index, lambda previous, index=index: make(index, previous), mark)


def attend(previous, func, *args, **kwargs):
    """One attention call inside an override: through the override that was there before ours, or ``func``."""
    return previous(func, *args, **kwargs) if previous is not None else func(*args, **kwargs)


def override_options(options: Dict, make: Callable) -> Dict:
    """A copy of a block call's ``transformer_options`` (no other block sees it) whose attention override is
    ``make(previous)``, ``previous`` the override already there (chained)."""
    options = dict(options)
    options[OVERRIDE] = make(options.get(OVERRIDE))
    return options


def with_override(args: Dict, make: Callable) -> Dict:
    """A block replace's arguments with :func:`override_options` of their ``transformer_options``."""
    return {**args, "transformer_options": override_options(args.get("transformer_options") or {}, make)}
