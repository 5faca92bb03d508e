"""Any peer rule (:mod:`peers`) bound to a cloned ComfyUI ModelPatcher (the factories are in :mod:`.make`).

The peers skip the network's *block stack* and add its cached (or forecast) residual instead, keeping the
embedding and the head, as their references do:

* Flux: img tokens from ``img_in`` through every double and single block (``img`` after the last block minus
  ``img`` before the first), then ``final_layer``; FBCache's stack starts after double block 0;
* Wan 2.1: ``x`` from ``patch_embedding`` through every block, then ``head``; FBCache's after block 0;
* SD1.x UNets (no single residual stream; the closest analogue): the stem's output (input block 0) through every
  later input block, the middle and the output blocks to the input of ``out``, whose channels and size match the
  stem's; FBCache's stack starts after input block 1, as Comfy-WaveSpeed's UNet path.

Hooks, all on the clone (``comfy.patcher_extension``), under one key:

* ``OUTER_SAMPLE`` (PatchLab's run-state protocol, ``patchlab.patches.run``): a fresh :class:`PeerRun` per run,
  whose rules (one per chunk: cond/uncond flag, uuid, shape) and cached tensors are dropped when the run ends,
  interrupted or not, after one INFO line with its counts;
* ``DIFFUSION_MODEL``: per network call, the step (the call's sigma in the run's ``sample_sigmas``, as the
  references find it), the chunks, and a :class:`_Call` in ``transformer_options`` for the block hooks; for the
  duration of the call, wraps that capture the time embedding (UNet ``time_embed``, Wan ``time_embedding``)
  and the UNet's pre-``out`` hidden state;
* DiTs: a ``dit`` block replace on every block (``double_block`` / ``single_block``, chained to a replace already
  there): at the stack's start the rules decide; on a reuse the stack's blocks return their input unchanged
  and the last adds the residual; on a full evaluation the last stores it;
* UNets: an ``input_block_patch`` decides at the stack's start; a reuse raises :class:`_Skip` there, which the
  same call's ``DIFFUSION_MODEL`` wrapper turns into ``out(h_start + residual)``.

A call reuses only when every chunk's rule says so (each rule hears every call). The counts (calls and batch
rows evaluated and reused) are the run's :meth:`PeerRun.summary`; ``on_finish`` hands the finished run to a
caller (a bench or a test) after its state is dropped. Extra passes of other nodes (SAG, PAG) are not told
apart from the sampler's own: the bench runs the peers alone, as users run them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import comfy.patcher_extension
import torch

from patchlab.patches import block_forward, families, run
from patchlab.patches.step_cache.hooks import transformer_options_of
from patchlab.patches.unet import is_unet

log = logging.getLogger(__name__)

KEY = "patchlab_bench_peer"            # wrapper key; the PeerRun's key in the run's transformer_options
CALL_KEY = "patchlab_bench_peer_call"  # the _Call in one network call's transformer_options
MARK = "_patchlab_bench_peer"          # on our block replaces and input block patch
ChunkKey = Tuple[Any, int, Tuple[int, ...]]


@dataclass(frozen=True)
class PeerSpec:
    """One peer on one model: ``new_rule(key)`` makes a chunk's rule; ``start`` is where the skipped stack begins
    ("embed": after the embedding; "first block": after the first block); ``feature`` what ``decide`` reads
    (None, "modulated", "modulated e0" (Wan's ret mode), "first block")."""

    label: str
    new_rule: Callable[[ChunkKey], Any]
    start: str = "embed"
    feature: Optional[str] = None
    on_finish: Optional[Callable[[PeerRun], None]] = None


class PeerRun(run.RunState):
    """One run of a peer: its rules per chunk and what it evaluated and reused."""

    def __init__(self, spec: PeerSpec):
        super().__init__()
        self.spec = spec
        self.rules: Dict[ChunkKey, Any] = {}
        self.calls: List[Tuple[int, bool, int]] = []  # (step, reused, rows) per network call

    def rule(self, key: ChunkKey):
        with self.lock:
            if key not in self.rules:
                self.rules[key] = self.spec.new_rule(key)
            return self.rules[key]

    def count(self, step: int, reused: bool, rows: int) -> None:
        with self.lock:
            self.calls.append((step, reused, rows))

    @property
    def reused_steps(self) -> List[int]:
        return [step for step, reused, _ in self.calls if reused]

    def summary(self) -> str:
        full = sum(rows for _, reused, rows in self.calls if not reused)
        skipped = sum(rows for _, reused, rows in self.calls if reused)
        return (f"{self.spec.label}: {len(self.calls)} network calls, {len(self.reused_steps)} reused; rows: {full} "
                f"evaluated, {skipped} reused (reused at steps {self.reused_steps})")

    def finish(self, finished: bool) -> None:
        log.info(self.summary())
        with self.lock:
            self.rules.clear()
        if self.spec.on_finish is not None:
            self.spec.on_finish(self)


def step_index(sample_sigmas: torch.Tensor, sigma: float) -> int:
    """The call's step: the index of ``sigma`` in the schedule, else the interval it falls in (the references'
    lookup, after KJNodes)."""
    table = [float(s) for s in sample_sigmas.reshape(-1)]
    for i, value in enumerate(table):
        if value == sigma:
            return i
    for i in range(len(table) - 1):
        if (table[i] - sigma) * (table[i + 1] - sigma) <= 0:
            return i
    return 0


class _Skip(Exception):
    """Raised by the UNet hook to end a reused call at the stack's start; caught by the same call's wrapper."""

    def __init__(self, call: _Call, h: torch.Tensor):
        super().__init__("PatchLab bench peer: reuse (internal)")
        self.call, self.h = call, h


class _Call:
    """One network call: its chunks and their rules, and the stack's start ``[rows, ..., channels]``."""

    def __init__(self, state: PeerRun, network, x: torch.Tensor, options: Dict):
        self.state, self.spec, self.network = state, state.spec, network
        uuids = list(options.get("uuids") or [None])
        flags = list(options.get("cond_or_uncond") or [0] * len(uuids))
        rows = int(x.shape[0])
        self.valid = rows % len(uuids) == 0 and len(flags) == len(uuids)
        if not self.valid:
            uuids, flags = [None], [0]
        self.rows = rows // len(uuids)
        self.keys = [(uuid, int(flag), (self.rows, *x.shape[1:])) for uuid, flag in zip(uuids, flags)]
        self.rules = [state.rule(key) for key in self.keys]
        sample_sigmas, sigma = options.get("sample_sigmas"), options.get("sigmas")
        if sample_sigmas is None or sigma is None:
            raise RuntimeError(f"{self.spec.label}: the call has no sample_sigmas/sigmas in its transformer_options; "
                               "sample through ComfyUI's sampler")
        self.step = step_index(sample_sigmas, float(sigma.reshape(-1)[0]))
        self.steps = len(sample_sigmas.reshape(-1)) - 1
        self.reusing = False
        self.start: Optional[torch.Tensor] = None
        self.stem: Optional[torch.Tensor] = None   # UNet: input block 0's output
        self.emb: Optional[torch.Tensor] = None    # the captured time embedding
        self.label: Optional[torch.Tensor] = None  # UNet: the class/ADM embedding added to it
        self.txt_len = 0                           # Flux: text tokens before the image tokens in single blocks

    def _split(self, tensor: Optional[torch.Tensor]) -> List[Optional[torch.Tensor]]:
        if tensor is None:
            return [None] * len(self.rules)
        return list(tensor.split(tensor.shape[0] // len(self.rules)))

    def begin(self, start: torch.Tensor, feature: Optional[torch.Tensor] = None) -> bool:
        """The stack starts at ``start`` [rows, ..., C]; every rule decides; True when the call reuses.

        Both are copied: Flux's double blocks add to their input in place (``img += ...``), as the references'
        ``img.clone()`` before the blocks guards against."""
        self.start = start.detach().clone()
        feature = feature.detach().clone() if feature is not None else None
        votes = [rule.decide(self.step, self.steps, piece) for rule, piece in zip(self.rules, self._split(feature))]
        shape = (start.shape[0] // len(self.rules), *start.shape[1:])
        cached = all(getattr(rule, "cached", None) is not None and rule.cached.shape == shape for rule in self.rules)
        self.reusing = self.valid and all(votes) and cached
        return self.reusing

    def output(self) -> torch.Tensor:
        """The stack's output on a reused call: its start plus every chunk's residual."""
        residual = torch.cat([rule.reuse(self.step).to(self.start.device) for rule in self.rules])
        return (self.start.float() + residual.float()).to(self.start.dtype)

    def end(self, out: torch.Tensor) -> None:
        """The stack's output [rows, ..., C] on a full evaluation: each rule stores its chunk's residual."""
        if self.start is None or out.shape != self.start.shape:
            return
        residual = (out.float() - self.start.float()).detach()
        for rule, piece in zip(self.rules, self._split(residual)):
            rule.store(self.step, piece)


# --- the wrapper of every network call ---------------------------------------------------------------------

def _capture(module: torch.nn.Module, sink: Callable[[torch.Tensor], None], before: bool = False):
    """Wrap ``module.forward`` for one call so that ``sink`` sees its output (its input if ``before``)."""
    def make(inner):
        def forward(h, *args, **kwargs):
            if before:
                sink(h)
            out = inner(h, *args, **kwargs)
            if not before:
                sink(out)
            return out
        return forward
    return block_forward.wrap(module, make)


def _captures(call: _Call, network) -> List[Callable[[], None]]:
    """The per-call wraps of a network: its time embedding, and the UNet's hidden state before ``out``."""
    undo = []
    if is_unet(network):
        undo.append(_capture(network.time_embed, lambda e: setattr(call, "emb", e)))
        undo.append(_capture(network.out, lambda h: call.end(h.movedim(1, -1)) if not call.reusing else None,
                             before=True))
    elif call.spec.feature == "modulated" and hasattr(network, "time_embedding"):
        undo.append(_capture(network.time_embedding, lambda e: setattr(call, "emb", e)))
    return undo


def diffusion_model_wrapper(executor, *args, **kwargs):
    options = transformer_options_of(args, kwargs)
    state = run.of(options, KEY) if options is not None else None
    x = args[0] if args else kwargs.get("x")
    if state is None or not torch.is_tensor(x):
        return executor(*args, **kwargs)
    network = executor.class_obj
    call = _Call(state, network, x, options)
    if is_unet(network) and network.num_classes is not None:
        y = args[3] if len(args) > 3 else kwargs.get("y")
        call.label = network.label_emb(y) if torch.is_tensor(y) else None
    options[CALL_KEY] = call
    undo = _captures(call, network)
    try:
        output = executor(*args, **kwargs)
    except _Skip as skip:
        if skip.call is not call:
            raise
        output = network.out(skip.h.type(x.dtype))
    finally:
        for restore in reversed(undo):
            restore()
        options.pop(CALL_KEY, None)
    state.count(call.step, call.reusing, int(x.shape[0]))
    return output


# --- UNets ---------------------------------------------------------------------------------------------------

def _unet_modulated(call: _Call, stem: torch.Tensor) -> torch.Tensor:
    """TeaCache's feature on a UNet: input block 1's first ResBlock's timestep-modulated input, from the stem."""
    block = call.network.input_blocks[1][0]
    if not hasattr(block, "in_layers") or getattr(block, "emb_layers", None) is None or call.emb is None:
        raise RuntimeError(f"{call.spec.label}: input block 1 of this UNet does not start with a time-conditioned "
                           "ResBlock; TeaCache's UNet feature needs one")
    emb = call.emb if call.label is None else call.emb + call.label
    h = block.in_layers(stem)
    e = block.emb_layers(emb).type(h.dtype)
    while e.ndim < h.ndim:
        e = e[..., None]
    if block.use_scale_shift_norm:
        scale, shift = e.chunk(2, dim=1)
        return block.out_layers[0](h) * (1 + scale) + shift
    return h + e


def unet_input_block_patch(h, transformer_options):
    """input_block_patch: the stack starts after input block 0 (or 1 for FBCache); decide there, raise on reuse."""
    call = transformer_options.get(CALL_KEY)
    if call is None:
        return h
    block, spec = transformer_options.get("block"), call.spec
    if block == ("input", 0):
        call.stem = h
    if block == ("input", 0) and spec.start == "embed":
        feature = _unet_modulated(call, h) if spec.feature == "modulated" else None
        if call.begin(h.movedim(1, -1), feature):
            raise _Skip(call, call.output().movedim(-1, 1))
    elif block == ("input", 1) and spec.start == "first block" and call.stem is not None:
        if call.begin(h.movedim(1, -1), (h - call.stem).movedim(1, -1)):
            raise _Skip(call, call.output().movedim(-1, 1))
    return h


setattr(unet_input_block_patch, MARK, True)


# --- DiTs (Flux, Wan) ----------------------------------------------------------------------------------------

def _dit_feature(call: _Call, args: Dict, out: Optional[Dict] = None) -> Optional[torch.Tensor]:
    """The feature of ``call.spec.feature`` at the stack's start (``out``: the first block's output, FBCache)."""
    kind, network = call.spec.feature, call.network
    if kind == "first block":
        if hasattr(network, "double_blocks"):
            return out["img"]                   # Flux: the block's output (Comfy-WaveSpeed)
        return out["img"] - args["img"]         # Wan: the block's residual (ParaAttention, diffusers)
    if kind == "modulated e0":
        return args["vec"]
    if kind == "modulated" and hasattr(network, "double_blocks"):
        block = network.double_blocks[0]
        mod, _ = block.img_mod(args["vec"])
        return torch.addcmul(mod.shift, block.img_norm1(args["img"]), 1 + mod.scale)
    if kind == "modulated":
        return call.emb
    return None


def dit_block_replace(kind: str, index: int, first: bool, last: bool, previous=None):
    """A ``dit`` replace of one block of the stack (``kind`` "double_block" or "single_block")."""
    def replace(args, extra):
        options = args.get("transformer_options")
        call = options.get(CALL_KEY) if isinstance(options, dict) else None
        if call is None:
            return block_forward.run_block(previous, args, extra)
        if first and hasattr(call.network, "double_blocks"):
            call.txt_len = int(args["txt"].shape[1])
        if first and call.spec.start == "embed":
            call.begin(args["img"], _dit_feature(call, args))
        if call.reusing:
            out = {name: args[name] for name in ("img", "txt") if name in args}
        else:
            out = block_forward.run_block(previous, args, extra)
        if first and call.spec.start == "first block":
            call.begin(out["img"], _dit_feature(call, args, out))
        if last:
            offset = call.txt_len if kind == "single_block" else 0
            img = out["img"]
            if call.reusing:
                out = {**out, "img": torch.cat([img[:, :offset], call.output()], dim=1)}
            else:
                call.end(img[:, offset:])
        return out

    setattr(replace, MARK, True)
    return replace


# --- binding -------------------------------------------------------------------------------------------------

def family_of(model) -> str:
    """"unet", "flux" or "wan": the families the peers are bound to (RuntimeError for any other)."""
    network = model.model.diffusion_model
    if is_unet(network) and len(network.input_blocks) >= 2:
        return "unet"
    row = families.of_network(network)
    name = type(network).__name__
    if row is not None and row.key == "flux" and name == "Flux" and not network.params.global_modulation:
        return "flux"
    if row is not None and row.key == "wan" and name == "WanModel":
        return "wan"
    raise RuntimeError(f"bench peers: {type(model.model).__name__} (network {name}) is not one of the families they "
                       "are bound to: SD1.x/SDXL UNets, Flux, Wan 2.1")


def bind(model, spec: PeerSpec):
    """A clone of ``model`` running ``spec``'s rule (replacing a peer bound before)."""
    family = family_of(model)
    patched = model.clone()
    WrappersMP = comfy.patcher_extension.WrappersMP
    patched.remove_wrappers_with_key(WrappersMP.DIFFUSION_MODEL, KEY)
    run.install(patched, KEY, lambda guider, sigmas: PeerRun(spec), replace=True)
    patched.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, KEY, diffusion_model_wrapper)
    network = model.model.diffusion_model
    if family == "unet":
        existing = patched.model_options.get("transformer_options", {}).get("patches", {}).get("input_block_patch", [])
        if not any(getattr(p, MARK, False) for p in existing):
            patched.set_model_input_block_patch(unet_input_block_patch)
        return patched
    stacks = [("double_block", len(network.double_blocks)), ("single_block", len(network.single_blocks))] \
        if family == "flux" else [("double_block", len(network.blocks))]
    stacks = [(kind, count) for kind, count in stacks if count]
    for position, (kind, count) in enumerate(stacks):
        final = position == len(stacks) - 1
        block_forward.install_block_replaces(
            patched, kind, count,
            lambda index, previous, kind=kind, count=count, final=final, position=position: dit_block_replace(
                kind, index, position == 0 and index == 0, final and index == count - 1, previous), MARK)
    return patched
