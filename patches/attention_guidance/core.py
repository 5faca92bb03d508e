"""Attention guidance's shared pieces: the keys, the spec a node adds, the run's state, TPG's seeds."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Dict, FrozenSet, Tuple

import torch

from .. import keys, run
from ..window import SigmaWindow

SPECS_KEY = keys.ATTENTION_SPECS
RUN_KEY = "patchlab_attention_run"          # transformer_options: the run's AttentionRun
WRAPPER_KEY = "patchlab_attention_guidance"
PASS_KEY = keys.GUIDANCE_PASS
STEP_KEY = keys.GUIDANCE_STEP
MARK = keys.ATTENTION_MARK
PERTURBED = ("pag", "seg", "slg", "tpg")  # kinds whose rows share one batched extra pass on the positive


@dataclass(frozen=True, eq=False)
class GuidanceSpec:
    """One node's guidance: what it perturbs or records, where, and how strongly. Immutable, shared by clones."""

    kind: str  # "sag", "pag", "seg", "slg" or "tpg"
    scale: float
    blocks: FrozenSet
    window: SigmaWindow
    blur_sigma: float = 0.0
    threshold: float = 1.0
    rescale: float = 0.0
    seed: int = 0  # TPG's shuffles

    def __deepcopy__(self, memo):
        return self


class AttentionRun(run.RunState):
    """One sampling run's attention-guidance state (the run-state protocol, :mod:`patches.run`): SAG's attention
    mass per spec, summed over the uncond chunks of a step and taken by the runner each step, and whether the
    run's INFO line was written. Nothing is left when the run ends, however it ends."""

    def __init__(self):
        super().__init__()
        self.records: Dict[int, list] = {}  # id(spec) -> [mass sum [B, tokens], count, grid]
        self.logged = False

    def add(self, spec: GuidanceSpec, mass: torch.Tensor, grid: Tuple[int, int]) -> None:
        with self.lock:
            record = self.records.get(id(spec))
            if record is None:
                self.records[id(spec)] = [mass, 1, grid]
            else:
                record[0] = record[0] + mass.to(record[0].device)
                record[1] += 1

    def pop(self, spec: GuidanceSpec):
        """(mean mass [B, tokens], token grid) recorded this step for ``spec``, or None."""
        with self.lock:
            record = self.records.pop(id(spec), None)
        return None if record is None else (record[0] / record[1], record[2])

    def first_log(self) -> bool:
        """True once per run: the run's INFO line is due."""
        with self.lock:
            first, self.logged = not self.logged, True
            return first

    def finish(self, finished: bool) -> None:
        with self.lock:
            self.records.clear()


def shuffle_seed(spec, step: int, key, chunk: int, group: int) -> int:
    """The seed of one TPG shuffle: the node's seed, the step, the block, the chunk and row group (stable across
    processes: no Python hash)."""
    return zlib.crc32(repr((spec.seed, step, tuple(key), chunk, group)).encode())
