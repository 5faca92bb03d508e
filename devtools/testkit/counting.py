"""Count what a model evaluates: the batch rows reaching a layer of the network.

Speed nodes (guidance skipping, step caches) are tested by what the network computes,
never by the clock. :func:`count_rows` puts a forward pre-hook on one submodule of the
real network (by default its first layer) and adds up the batch size of every call,
so a test can say "20 steps of CFG evaluated 40 rows, with the node 31".
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Iterator, List, Optional

import torch

# The first layer every family's forward runs on the latent, in lookup order.
FIRST_LAYERS = (
    "input_blocks.0.0",  # openaimodel UNet (SD1.x, SD2.x, SDXL)
    "img_in",            # Flux, Chroma, HiDream-style, Qwen-Image
    "x_embedder",        # SD3 / MMDiT, Lumina 2, AuraFlow-style
    "patch_embedding",   # Wan
    "init_x_linear",     # AuraFlow (MMDiT of AuraFlow)
)


@dataclass
class RowCount:
    """Rows per call (in call order) of the hooked layer."""

    calls: List[int] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def rows(self) -> int:
        return sum(self.calls)

    def add(self, rows: int) -> None:
        with self._lock:
            self.calls.append(rows)


def network(model) -> torch.nn.Module:
    """The diffusion network inside a ModelPatcher (or a BaseModel)."""
    base = getattr(model, "model", model)
    return base.diffusion_model


def first_layer_name(model) -> str:
    names = dict(network(model).named_modules())
    for name in FIRST_LAYERS:
        if name in names:
            return name
    raise ValueError(f"no known first layer in {type(network(model)).__name__}; pass module= explicitly")


@contextlib.contextmanager
def count_rows(model, module: Optional[str] = None) -> Iterator[RowCount]:
    """Count the batch rows reaching ``module`` (a dotted name in the network; default its first layer).

    >>> with count_rows(model) as count:
    ...     sample(patched, "sd15", steps=4)
    >>> count.rows  # 8 for 4 CFG steps at batch 1
    """
    name = module or first_layer_name(model)
    layer = network(model).get_submodule(name)
    count = RowCount()

    def hook(_module, args):
        count.add(int(args[0].shape[0]))

    handle = layer.register_forward_pre_hook(hook)
    try:
        yield count
    finally:
        handle.remove()
