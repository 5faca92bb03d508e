"""Which blocks attention guidance acts on: the node's block text parsed, resolved against the model.

UNet keys are (stage, block id, transformer index) (:mod:`patches.unet`); DiT keys (stack, index), the
stacks named as ComfyUI's ``patches_replace["dit"]`` names them (``patches/families.py``). ``auto``
stands for a default per family, TPG has its own.
"""

from __future__ import annotations

import re
from typing import Dict, FrozenSet, List, Optional, Tuple

from .. import families
from ..families import Stack
from ..unet import STAGES, Key, transformer_keys

DitKey = Tuple[str, int]


UNET_ENTRY = re.compile(r"^(input|middle|output)(?:\.(\d+))?(?:\.(\d+))?$")


DIT_ENTRY = re.compile(r"^(double|single|joint)(?:\.(\d+)(?:-(\d+))?)?$")


SYNTAX_HINT = ("write stage[.block[.transformer]] for UNets (stage input, middle or output: 'middle', 'input.4', "
               "'output.1.0'), stack[.index[-last]] for DiTs (stack double, single or joint: 'double.7', "
               "'single.0-5', 'joint.10'), 'all' or 'auto'")


def _int(text: Optional[str]) -> Optional[int]:
    return None if text is None else int(text)


def parse_blocks(text: str) -> List[tuple]:
    """``"middle, input.4, double.7-9, auto"`` -> entries; ValueError if malformed.

    Entries: ("auto",), ("all",), ("unet", stage, block id or None, index or None),
    ("dit", stack, first index or None, last index or None).
    """
    entries = [e for e in re.split(r"[,\s]+", text.strip().lower()) if e]
    if not entries:
        raise ValueError("no block given; " + SYNTAX_HINT)
    parsed = []
    for entry in entries:
        unet, dit = UNET_ENTRY.match(entry), DIT_ENTRY.match(entry)
        if entry in ("auto", "all"):
            parsed.append((entry,))
        elif unet is not None:
            stage, block_id, index = unet.groups()
            parsed.append(("unet", stage, _int(block_id), _int(index)))
        elif dit is not None:
            stack, first, last = dit.groups()
            parsed.append(("dit", stack, _int(first), _int(last)))
        else:
            raise ValueError(f"cannot read block {entry!r}; " + SYNTAX_HINT)
    return parsed


def describe_keys(keys: List[Key]) -> str:
    blocks = sorted({(STAGES.index(s), b) for s, b, _ in keys})
    return ", ".join(f"{STAGES[s]}.{b}" if STAGES[s] != "middle" else "middle" for s, b in blocks)


def _resolve_unet(available: List[Key], entries, node_id: str, auto: Optional[List[Key]] = None) -> FrozenSet[Key]:
    chosen = set()
    for entry in entries:
        if entry[0] == "auto" and auto is not None:
            chosen.update(auto)
            continue
        if entry[0] == "dit":
            name = ".".join(str(p) for p in entry[1:] if p is not None)
            raise ValueError(f"{node_id}: block {name!r} is a DiT address; this model is a UNet with transformers "
                             f"in {describe_keys(available)} (write e.g. 'middle' or 'auto')")
        stage, block_id, index = {"auto": ("middle", None, None), "all": ("all", None, None)}.get(
            entry[0], entry[1:])
        found = [k for k in available if (stage == "all" or k[0] == stage)
                 and (block_id is None or k[1] == block_id) and (index is None or k[2] == index)]
        if not found:
            name = ".".join(str(p) for p in (stage, block_id, index) if p is not None)
            raise ValueError(f"{node_id}: block {name!r} has no self-attention in this model; blocks with "
                             f"transformers: {describe_keys(available)}")
        chosen.update(found)
    return frozenset(chosen)


def resolve_blocks(model, text: str, node_id: str, dit: bool = True, unet_auto=None, dit_auto=None) -> FrozenSet:
    """The block keys a block description selects in this model; clear errors otherwise.

    UNet keys are (stage, block id, transformer index); DiT keys (stack, index). ``dit``
    False: the node supports UNets only. ``unet_auto(model)`` / ``dit_auto(model)``: the keys
    ``auto`` stands for (default: the middle block; :func:`auto_blocks`).
    """
    available = transformer_keys(model)
    if available:
        auto = unet_auto(model) if unet_auto is not None else None
        return _resolve_unet(available, parse_blocks(text), node_id, auto)
    if dit and family(model) is not None:
        return frozenset(resolve(model, parse_blocks(text), node_id, dit_auto))
    supported = ("UNet models (SD1.x, SD2.x, SDXL and their fine-tunes)" if not dit else
                 f"UNet models (SD1.x, SD2.x, SDXL) and the DiTs {families.labels(lambda f: f.stacks)} (untested: "
                 f"{families.labels(lambda f: f.stacks, tested=False)})")
    raise RuntimeError(
        f"{node_id} supports {supported}; this model is "
        f"{type(model.model).__name__} with a {type(model.model.diffusion_model).__name__} network, which has "
        "no blocks it can guide with. Remove the node for this model."
    )


def tpg_auto_keys(model) -> List[Key]:
    """TPG's UNet default: the transformers of the last two input blocks that hold any, the down path's lowest
    resolution (SDXL input.7-8, the paper's SDXL layers; SD1.5 input.7-8). pamparamm counts the third and
    fourth such blocks instead, SD1.5 input.4-5: on the trained SD1.5-layout reference model, at scale 3 and
    CFG 1, those leave 78 % of prompts right (FID 1,133), input.7-8 93 % (FID 274), CFG 1 alone 92 % (168)."""
    keys = transformer_keys(model)
    ids = sorted({block_id for stage, block_id, _ in keys if stage == "input"})
    chosen = set(ids[-2:])
    return [key for key in keys if key[0] == "input" and key[1] in chosen]


def family(model) -> Optional[str]:
    """Which supported DiT family (token layout) the model's network is (None: no blocks to address)."""
    row = families.of_model(model)
    return row.key if row is not None and row.stacks else None


def _rope(net) -> bool:
    row = families.of_network(net)
    return row is None or row.rope


def _stacks_of(net) -> Dict[str, Stack]:
    row = families.of_network(net)
    return row.stacks if row is not None else {}


def stacks(model) -> Dict[str, int]:
    """``{stack name: number of blocks}`` of a supported DiT (empty for any other model)."""
    net = model.model.diffusion_model
    return {stack: len(getattr(net, s.attr)) for stack, s in _stacks_of(net).items()}


def patch_size(model) -> Tuple[int, int, int]:
    return network_patch(model.model.diffusion_model)


def network_patch(net) -> Tuple[int, int, int]:
    """The network's patch (frames, height, width): an int ``p`` is ``(1, p, p)``."""
    size = getattr(net, "patch_size", 2)
    if isinstance(size, (tuple, list)):
        return (1, int(size[0]), int(size[1])) if len(size) == 2 else tuple(int(p) for p in size[-3:])
    return (1, int(size), int(size))


def describe(available: Dict[str, int]) -> str:
    return ", ".join(f"{stack}.0-{count - 1}" if count > 1 else f"{stack}.0"
                     for stack, count in available.items() if count)


def auto_blocks(model) -> List[DitKey]:
    """The family's default: blocks 7-9 of the first stack (Flux double, SD3 joint; HunyuanVideo's Flux-like
    double stack too, a starting point of ours), the anchors' SLG layers and the middle of the stack PAG papers
    perturb; the same relative depth (7/19 to 9/19) in a shallower stack. Families without a published value
    and deeper stacks take that relative depth in their first stack, starting points of ours: Qwen-Image
    double.22-28 of 60, Wan 2.1 1.3B / 14B double.11-14 of 30 / 14-18 of 40, Z-Image single.11-14 of 30."""
    stack, count = next(iter(stacks(model).items()))
    if count >= 10 and family(model) in ("flux", "mmdit", "hunyuan_video"):
        return [(stack, i) for i in (7, 8, 9)]
    first = min(count - 1, int(count * 7 / 19))
    last = max(first, min(count - 1, int(count * 9 / 19)))
    return [(stack, i) for i in range(first, last + 1)]


def _in_order(available: Dict[str, int]) -> List[DitKey]:
    """Every block of ``{stack: count}``, stacks in the order the network runs them."""
    return [(stack, i) for stack, count in available.items() for i in range(count)]


def tpg_auto_blocks(model) -> List[DitKey]:
    """TPG's default on DiTs, a starting point of ours (the paper tests UNets only): the blocks from a third to
    half of the network's depth, counted over all its stacks in the order they run (Flux single.0-9 of 19 + 38
    blocks, Wan 2.1 double.10-14 of 30, SD3.5 Large joint.12-18 of 38). Earlier blocks take the colours apart
    on the trained Flux-layout reference model: at scale 3 and CFG 1, its double.0 leaves 38 % of prompts
    right (FID 2,584), this rule's single.0 58 % (FID 182), CFG 1 alone 59 % (FID 290)."""
    order = _in_order(stacks(model))
    first = len(order) // 3
    last = max(first, (len(order) - 1) // 2)
    return order[first:last + 1]


def resolve(model, entries, node_id: str, auto=None) -> List[DitKey]:
    """The block keys the parsed entries select in this DiT; ValueError listing the model's blocks otherwise.
    ``auto(model)``: the blocks ``auto`` stands for (default :func:`auto_blocks`)."""
    available = stacks(model)
    chosen: List[DitKey] = []
    for entry in entries:
        if entry[0] == "auto":
            chosen.extend((auto or auto_blocks)(model))
            continue
        if entry[0] == "all":
            chosen.extend(_in_order(available))
            continue
        kind, stack, first, last = entry[0], entry[1], entry[2], entry[3]
        if kind != "dit" or stack not in available:
            name = ".".join(str(p) for p in entry[1:] if p is not None)
            raise ValueError(f"{node_id}: block {name!r} is a UNet address; this model is a DiT with blocks "
                             f"{describe(available)} (write e.g. '{next(iter(available))}.0' or 'auto')"
                             if kind != "dit" else
                             f"{node_id}: this model has no {stack!r} blocks; it has {describe(available)}")
        count = available[stack]
        if first is None:
            first, last = 0, count - 1
        elif last is None:
            last = first
        if first > last or last >= count:
            wanted = f"{stack}.{first}" + (f"-{last}" if last != first else "")
            raise ValueError(f"{node_id}: block {wanted!r} does not exist in this model; it has "
                             f"{describe(available)}")
        chosen.extend((stack, i) for i in range(first, last + 1))
    return chosen
