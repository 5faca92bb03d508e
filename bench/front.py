"""The front: evaluations saved against PSNR from full compute, every step cache swept over its own knob.

Issue 37 item 2. On the trained reference models (``sd15_shapes``, ``flux_shapes``: every ``"<colour> <shape>"``
prompt; ``wan_shapes``: every ``"<colour> <shape> moving <direction>"`` clip prompt, as quality_video.py), each
method is run at several settings of the knob that trades work for fidelity:

* StepCache (PatchLab) over ``threshold`` (0.1, 0.2, 0.3, 0.5, 0.8) and, as a second line, over
  ``target_speedup`` (1.5, 2, 3, 4), every other input at its default; three more lines over ``target_speedup``:
  with ``max_consecutive`` 2, and with the higher-order forecasts (``reuse`` ``taylor 2`` and ``chebyshev``,
  :data:`HIGHER_ORDER`);
* core EasyCache and LazyCache (ComfyUI's nodes) over ``reuse_threshold`` (0.1, 0.2, 0.4, 0.6; default 0.2);
* the bench peers (bench/peers/): TeaCache, FBCache and MagCache over their thresholds at 0.5x, 1x, 2x and 3x the
  family's published default (MagCache calibrated on the model first, once per model and run), TaylorSeer of
  order 1 and 2 over its interval (2, 3, 4, 6).

Each setting runs as quality.py runs a variant (its ``run_model``): ``--seeds`` seeds per prompt (default 16 for
the images: 288 pictures; 4 for the clips: 288 clips), euler, 20 steps, CFG 5, the same initial noise for every
setting, through ComfyUI's own sampler; PSNR against full compute of the same seed, the oracle's prompt accuracy
(clips: colour, shape and direction at once, and flicker). No FID. Evaluations are the batch rows that ran the
block stack (a module inside it, :data:`STACK`), as a share of the full run's: the peers run the embedding and
the head on every call and skip only the stack, so the network's first layer, where quality.py counts, would see
all of their rows. Full compute, StepCache (its default input indicator) and the core caches skip whole calls, so
for them both counts agree; FBCache also runs its first block on every call, which the count leaves out.

    .venv/bin/python bench/front.py --threads 1                          # every model and setting
    .venv/bin/python bench/front.py --models flux_shapes --seeds 4 --variants stepcache teacache
    .venv/bin/python bench/front.py --name front --merge --variants magcache   # redo one method (or key)
    .venv/bin/python bench/front.py --replot                             # table and chart from the JSON
    .venv/bin/python bench/front.py --untrained --seeds 1 --steps 3 --name smoke   # does the code run?

Writes ``results/front.json`` (per model and setting: quality.py's result, with the method, knob and value),
``front.md`` (a table per model; per model and method the settings nearest 2x and 3x, i.e. 50 % and 67 % saved,
with StepCache's lead or lag on each line there; the verdict over 30-70 % saved) and ``front.png`` (one panel per
model: PSNR against evaluations saved, one line per method, the 30-70 % band shaded), the table and chart drawn
from the JSON alone (:func:`redraw`). ``--publish`` copies them to ``figures/``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import _common
import quality
import quality_video
from peers import fbcache, magcache, teacache
from quality import Variant, core, ours, unpatched

UNET, DIT, VIDEO = quality.UNET, quality.DIT, quality_video.MODEL
MODELS = (UNET, DIT, VIDEO)
FAMILY = {UNET: "unet", DIT: "flux", VIDEO: "wan"}  # each model's family in the peers' DEFAULTS
PROMPTS = {UNET: 18, DIT: 18, VIDEO: 72}            # evaluate.ALL_PROMPTS, evaluate.ALL_CLIP_PROMPTS
SEEDS = {UNET: 16, DIT: 16, VIDEO: 4}               # evaluate.DEFAULT_SEEDS: 288 samples per setting
# A module inside the block stack every method here skips (test_peers' INSIDE): FBCache's stack starts after the
# UNet's input block 1, Flux's double block 0 and Wan's block 0.
STACK = {"unet": "middle_block.0", "flux": "single_blocks.0", "wan": "blocks.1"}

# method -> (its name on the chart and in the tables, kind). A method is one line of the front.
METHODS = {
    "full": ("full compute", "reference"),
    "stepcache": ("StepCache threshold", "ours"),
    "stepcache_target": ("StepCache target_speedup", "ours"),
    "stepcache_target_mc2": ("StepCache target_speedup, max_consecutive 2", "ours"),
    "stepcache_taylor2": ("StepCache target_speedup, taylor 2", "ours"),
    "stepcache_chebyshev": ("StepCache target_speedup, chebyshev", "ours"),
    "easycache": ("EasyCache (core)", "core"),
    "lazycache": ("LazyCache (core)", "core"),
    "teacache": ("TeaCache", "peer"),
    "fbcache": ("FBCache", "peer"),
    "magcache": ("MagCache", "peer"),
    "taylorseer_o1": ("TaylorSeer order 1", "peer"),
    "taylorseer_o2": ("TaylorSeer order 2", "peer"),
}
OURS = ("stepcache", "stepcache_target", "stepcache_target_mc2", "stepcache_taylor2", "stepcache_chebyshev")
HIGHER_ORDER = {"stepcache_taylor2": "taylor 2", "stepcache_chebyshev": "chebyshev"}  # method -> StepCache reuse
STEPCACHE_THRESHOLDS = (0.1, 0.2, 0.3, 0.5, 0.8)
STEPCACHE_TARGETS = (1.5, 2.0, 3.0, 4.0)
CORE_THRESHOLDS = (0.1, 0.2, 0.4, 0.6)          # 0.5x to 3x core's default 0.2
AROUND_DEFAULT = (0.5, 1.0, 2.0, 3.0)           # the peers' thresholds: these multiples of the published default
PEER_DEFAULTS = {"teacache": teacache.DEFAULTS, "fbcache": fbcache.DEFAULTS, "magcache": magcache.DEFAULTS}
TAYLORSEER_INTERVALS = (2, 3, 4, 6)
BAND = (0.3, 0.7)                               # the saved shares where StepCache must be on or ahead of the front
TARGETS = ((2, 0.5), (3, 2 / 3))                # speed-ups the table reads off: 2x = 50 % saved, 3x = 67 %
CAP_DB = 60.0                                   # PSNR above this (100 dB: identical) counts as this


@dataclass(frozen=True)
class Point(Variant):
    """One setting of one method: ``knob`` at ``value`` (None for full compute)."""

    method: str = ""
    knob: str = ""
    value: Optional[float] = None


def peer(factory: str, **params) -> Callable:
    """``make(model, name)`` of bench/peers/make.py's ``factory``, ``params`` over the family's published defaults."""
    def make(model, name):
        from peers import make as peers

        return getattr(peers, factory)(**params)(model, name)
    return make


class Calibrations:
    """MagCache's ``calibrate_with`` for one run: each model calibrated once (by ``calibrate_with(model, name)``,
    default ``make.shapes_calibration()``), its ratio tables reused by every threshold."""

    def __init__(self, calibrate_with: Optional[Callable] = None):
        self.calibrate_with = calibrate_with
        self.tables: Dict[Tuple[str, int], Dict[int, List[float]]] = {}

    def __call__(self, model, name):
        key = (name, id(model.model.diffusion_model))
        if key not in self.tables:
            calibrate = self.calibrate_with
            if calibrate is None:
                from peers import make

                calibrate = make.shapes_calibration()
            self.tables[key] = calibrate(model, name)
        return self.tables[key]


def thresholds(method: str, model: str) -> Tuple[float, ...]:
    """A peer's thresholds on ``model``: :data:`AROUND_DEFAULT` times its family's published default."""
    default = PEER_DEFAULTS[method][FAMILY[model]]["threshold"]
    return tuple(round(m * default, 4) for m in AROUND_DEFAULT)


def default_of(method: str, model: str) -> Optional[float]:
    """The method's knob at its default on ``model`` (None where the knob has no default: target_speedup is off
    by default, TaylorSeer's interval is set per line)."""
    if method == "stepcache":
        return 0.3
    if method in ("easycache", "lazycache"):
        return _common.CORE_CACHE_DEFAULTS["reuse_threshold"]
    if method in PEER_DEFAULTS:
        return PEER_DEFAULTS[method][FAMILY[model]]["threshold"]
    return None


def catalogue(calibrate_with: Optional[Callable] = None) -> List[Point]:
    """Every setting, ``full`` first, each method's in ascending knob order; a peer's setting shared by the models
    whose family defaults give it. ``calibrate_with``: MagCache's calibration (:class:`Calibrations` caches it)."""
    calibrations = Calibrations(calibrate_with)
    out = [Point("full", "full compute", MODELS, "reference", "speed", unpatched, method="full")]
    out += [Point(f"stepcache_t{t:g}", f"StepCache threshold {t:g} (PatchLab)", MODELS, "ours", "speed",
                  ours("PatchLab_StepCache", threshold=t), method="stepcache", knob="threshold", value=t)
            for t in STEPCACHE_THRESHOLDS]
    out += [Point(f"stepcache_x{x:g}", f"StepCache target_speedup {x:g} (PatchLab)", MODELS, "ours", "speed",
                  ours("PatchLab_StepCache", target_speedup=x), method="stepcache_target", knob="target_speedup",
                  value=x) for x in STEPCACHE_TARGETS]
    out += [Point(f"stepcache_mc2_x{x:g}", f"StepCache target_speedup {x:g}, max_consecutive 2 (PatchLab)", MODELS,
                  "ours", "speed", ours("PatchLab_StepCache", target_speedup=x, max_consecutive=2),
                  method="stepcache_target_mc2", knob="target_speedup", value=x) for x in STEPCACHE_TARGETS]
    for method, reuse in HIGHER_ORDER.items():
        out += [Point(f"{method}_x{x:g}", f"StepCache target_speedup {x:g}, reuse {reuse} (PatchLab)", MODELS, "ours",
                      "speed", ours("PatchLab_StepCache", target_speedup=x, reuse=reuse), method=method,
                      knob="target_speedup", value=x) for x in STEPCACHE_TARGETS]
    for method, node in (("easycache", "EasyCache"), ("lazycache", "LazyCache")):
        out += [Point(f"{method}_{t:g}", f"{node} {t:g} (core)", MODELS, "core", "speed",
                      core(node, **{**_common.CORE_CACHE_DEFAULTS, "reuse_threshold": t}), method=method,
                      knob="reuse_threshold", value=t) for t in CORE_THRESHOLDS]
    for method, name in (("teacache", "TeaCache"), ("fbcache", "FBCache"), ("magcache", "MagCache")):
        extra = {"calibrate_with": calibrations} if method == "magcache" else {}
        values = sorted({t for model in MODELS for t in thresholds(method, model)})
        out += [Point(f"{method}_{t:g}", f"{name} {t:g}", tuple(m for m in MODELS if t in thresholds(method, m)),
                      "peer", "speed", peer(method, threshold=t, **extra), method=method, knob="threshold",
                      value=t) for t in values]
    for order in (1, 2):
        out += [Point(f"taylorseer_o{order}_i{i}", f"TaylorSeer order {order}, interval {i}", MODELS, "peer",
                      "speed", peer("taylorseer", order=order, interval=i), method=f"taylorseer_o{order}",
                      knob="interval", value=i) for i in TAYLORSEER_INTERVALS]
    return out


VARIANTS = catalogue()


def selected(requested: Optional[Sequence[str]], variants: Sequence[Point]) -> set:
    """The keys ``requested`` names (a key, or a method: every setting of it), ``full`` always; all without it."""
    if not requested:
        return {v.key for v in variants}
    unknown = set(requested) - {v.key for v in variants} - {v.method for v in variants}
    if unknown:
        raise SystemExit(f"unknown variant(s) {sorted(unknown)}; expected keys or methods of: "
                         f"{sorted({v.method for v in variants})} / {[v.key for v in variants]}")
    return {v.key for v in variants if v.key in requested or v.method in requested} | {"full"}


def counted_at(model) -> str:
    """Where a run's rows are counted (:data:`STACK`, by the model's family): inside the block stack, not at the
    network's first layer, since the peers run the embedding and the head on every call."""
    from peers.binding import family_of

    return STACK[family_of(model)]


def annotated(results: Dict, variants: Sequence[Point] = VARIANTS) -> Dict:
    """``results`` (model -> key -> result) with each result's method, knob and value from the catalogue."""
    by_key = {v.key: v for v in variants}
    for per_model in results.values():
        for key, result in per_model.items():
            if key in by_key:
                v = by_key[key]
                result.update(method=v.method, knob=v.knob, value=v.value)
    return results


def seeds_of(args, model: str) -> int:
    return args.seeds or SEEDS[model]


def prompts_of(model: str) -> Tuple[str, ...]:
    from devtools.testkit.shapes import evaluate, models

    return evaluate.ALL_CLIP_PROMPTS if models.spec(model).frames else evaluate.ALL_PROMPTS


def run(args, save: Callable[[Dict], None], previous: Optional[Dict] = None) -> Dict:
    """Every wanted setting on every model of ``args.models`` (quality.run_model, rows counted inside the stack);
    ``save`` gets the results so far after each. ``previous``: earlier results, kept where this run does not redo
    a setting."""
    import torch

    from devtools.testkit.shapes import evaluate, models, oracle

    if args.threads:
        torch.set_num_threads(args.threads)
    loaded: Dict = {}  # name -> models.Trained, as each model's turn comes (MagCache calibrates on it)
    variants = catalogue(_calibration(args.steps, loaded.__getitem__))
    wanted = selected(args.variants, variants)
    classifier = oracle.load()
    results: Dict[str, Dict] = {}
    for name in args.models:
        loaded[name] = models.untrained(name, seed=0) if args.untrained else models.load(name)
        prompts = evaluate.prompt_grid(seeds_of(args, name), prompts_of(name))
        results[name] = dict((previous or {}).get(name, {}))
        quality.run_model(loaded[name], variants, wanted, prompts, classifier, None, results[name],
                          lambda: save(annotated(results)), count_at=counted_at(loaded[name].model),
                          steps=args.steps)
    return annotated(results)


def _calibration(steps: int, load: Callable) -> Callable:
    """MagCache's calibration on the run's own model (``load(name)``: its ``models.Trained``) at the run's steps."""
    def calibrate_with(model, name):
        from peers import make

        return make.shapes_calibration(steps=steps, load=load)(model, name)
    return calibrate_with


# --- the front, from the results alone ------------------------------------------------------------------------

def points(variants: Dict) -> Dict[str, List[Tuple[float, float, str]]]:
    """Per method (in :data:`METHODS`' order): its settings as (share of evaluations saved, PSNR capped at
    :data:`CAP_DB`, key), by share saved; full compute and refused settings left out."""
    by_method: Dict[str, List[Tuple[float, float, str]]] = {}
    for key, r in variants.items():
        if "error" in r or r.get("method", "full") == "full":
            continue
        by_method.setdefault(r["method"], []).append((round(1 - r["evaluations"], 4), min(r["psnr_db"], CAP_DB),
                                                      key))
    order = list(METHODS)
    return {m: sorted(by_method[m]) for m in sorted(by_method, key=lambda m: (order.index(m) if m in order
                                                                              else len(order), m))}


def own_front(method_points: Sequence[Tuple]) -> List[Tuple[float, float]]:
    """The (saved, PSNR) of the settings none of the method's other settings beats (as much saved or more at as
    high a PSNR or higher), by share saved: the settings a user would pick; PSNR falls along it."""
    pts = sorted({(p[0], p[1]) for p in method_points})
    return [p for p in pts if not any(q != p and q[0] >= p[0] and q[1] >= p[1] for q in pts)]


def psnr_at(method_points: Sequence[Tuple], saved: float) -> Optional[float]:
    """The method's PSNR at share ``saved``, linear between the neighbours on its own front; below its least-saving
    setting, that setting's (it saves more for it); None above its most-saving one (it does not reach there)."""
    front = own_front(method_points)
    if not front or saved > front[-1][0] + 1e-9:
        return None
    if saved <= front[0][0]:
        return front[0][1]
    for (x0, y0), (x1, y1) in zip(front, front[1:]):
        if x0 <= saved <= x1:
            return y0 + (y1 - y0) * (saved - x0) / (x1 - x0)
    return None  # unreachable: the front covers [front[0][0], front[-1][0]]


def _best(points_by_method: Dict, methods: Sequence[str], saved: float) -> Tuple[Optional[str], Optional[float]]:
    best = (None, None)
    for method in methods:
        db = psnr_at(points_by_method[method], saved)
        if db is not None and (best[1] is None or db > best[1]):
            best = (method, db)
    return best


def front_verdict(points_by_method: Dict[str, Sequence[Tuple]], low: float = BAND[0], high: float = BAND[1],
                  step: float = 0.05, ours: Sequence[str] = OURS, tolerance_db: float = 0.5) -> Dict:
    """Whether StepCache is on or ahead of the best other method over the saved shares ``low`` to ``high``.

    ``points_by_method``: method -> [(share saved, PSNR dB, ...)], e.g. :func:`points`. At each bin (``low``,
    ``low + step``, ... ``high``) each method's PSNR is read off its own front (:func:`psnr_at`); StepCache's is
    the best of the ``ours`` methods, the peer's the best of the others (core caches included). Per bin
    ``position``: "ahead" (by ``tolerance_db`` or more), "on" (within it), "behind", "not reached" (no StepCache
    setting saves that much) or "alone" (no peer reaches it). Returns
    ``{"bins": [{saved, ours, ours_db, peer, peer_db, margin_db, position}], "holds": bool, "peer_wins":
    [{from, to, peers, by_db, unreached_from}] (runs of bins where StepCache is behind or reaches no setting:
    the peers best there, the largest lag (None where StepCache reaches none of the run), the first share it does
    not reach), "text": a sentence for the note}``.
    """
    peers = [m for m in points_by_method if m not in ours]
    mine = [m for m in points_by_method if m in ours]
    count = int(round((high - low) / step))
    bins = []
    for i in range(count + 1):
        saved = round(low + i * step, 6)
        ours_method, ours_db = _best(points_by_method, mine, saved)
        peer_method, peer_db = _best(points_by_method, peers, saved)
        margin = None if ours_db is None or peer_db is None else round(ours_db - peer_db, 4)
        if ours_db is None:
            position = "not reached"
        elif peer_db is None:
            position = "alone"
        else:
            position = "ahead" if margin >= tolerance_db else "on" if margin >= -tolerance_db else "behind"
        bins.append({"saved": saved, "ours": ours_method, "ours_db": ours_db, "peer": peer_method,
                     "peer_db": peer_db, "margin_db": margin, "position": position})
    wins: List[Dict] = []
    previous_lost = False
    for b in bins:
        lost = b["position"] in ("behind", "not reached")
        if lost and not previous_lost:
            wins.append({"from": b["saved"], "to": b["saved"], "peers": [], "by_db": None, "unreached_from": None})
        if lost:
            run_ = wins[-1]
            run_["to"] = b["saved"]
            if b["peer"] is not None and b["peer"] not in run_["peers"]:
                run_["peers"].append(b["peer"])
            if b["margin_db"] is not None:
                lag = -b["margin_db"]
                run_["by_db"] = lag if run_["by_db"] is None else max(run_["by_db"], lag)
            if b["position"] == "not reached" and run_["unreached_from"] is None:
                run_["unreached_from"] = b["saved"]
        previous_lost = lost
    return {"bins": bins, "holds": not wins, "peer_wins": wins, "text": _verdict_text(bins, wins, low, high, step,
                                                                                   tolerance_db)}


def _name(method: Optional[str]) -> str:
    return METHODS.get(method, (method,))[0] if method else "none"


def _verdict_text(bins, wins, low, high, step, tolerance_db) -> str:
    span = f"{low:.0%} to {high:.0%} saved (every {step:.0%}; within {tolerance_db:g} dB counts as on)"
    if not wins:
        return f"StepCache is on or ahead of the best other method from {span}."
    parts = []
    for w in wins:
        where = f"{w['from']:.0%}" if w["from"] == w["to"] else f"{w['from']:.0%}-{w['to']:.0%}"
        who = " and ".join(_name(p) for p in w["peers"]) or "no method"
        why = [f"behind by up to {w['by_db']:.1f} dB"] if w["by_db"] is not None else []
        if w["unreached_from"] is not None:
            why.append(f"no StepCache setting saves {w['unreached_from']:.0%} or more")
        parts.append(f"{where}: {who} {'wins' if w['peers'] else 'reaches it'} ({'; '.join(why)})")
    return f"StepCache is not on the front everywhere from {span}. " + "; ".join(parts) + "."


# --- table and chart ------------------------------------------------------------------------------------------

def _accuracy(r: Dict) -> float:
    return r["accuracy_all"] if "accuracy_all" in r else r["accuracy_both"]


def _setting(r: Dict, model: str) -> str:
    if r.get("method", "full") == "full":
        return ""
    default = default_of(r["method"], model)
    return f"{r['knob']} {r['value']:g}" + (" (default)" if default is not None and r["value"] == default else "")


def _nearest(variants: Dict, method_points: Sequence[Tuple], saved: float) -> Tuple[str, Dict]:
    key = min(method_points, key=lambda p: (round(abs(p[0] - saved), 6), -p[1], p[2]))[2]
    return key, variants[key]


def table(payload: Dict, name: str) -> str:
    """NAME.md: what was measured; per model every setting, then each method at 2x and 3x, then the verdict."""
    lines = [f"# {name}: evaluations saved against PSNR from full compute, every step cache over its knob", "",
             f"Per setting: {_per_model(payload, 'samples_per_variant')} samples ({_per_model(payload, 'seeds')} "
             f"seeds per prompt) of {payload['weights']}, euler, {payload['steps']} steps, CFG 5, {payload['device']}. "
             "Evaluations: batch rows that ran the block stack, against the full run's. PSNR against the full "
             "run's sample of the same seed (100 dB = identical; above 60 dB counts as 60 for the lines). "
             "Accuracy: the oracle reads the asked colour and shape (clips: and direction) at once. Flicker (clips): "
             "the mean frame-to-frame change of the background (real clips: 0). A method's line is its own front "
             "(its settings that no other of its settings beats on both axes), read linearly between settings.", ""]
    for model, variants in payload["results"].items():
        video = any("accuracy_all" in r for r in variants.values())
        lines += [f"## {model}", "", "| setting | method | knob | evaluations | saved | wall s | accuracy | "
                  + ("flicker | " if video else "") + "PSNR dB |",
                  "|---|---|---|---|---|---|---|" + ("---|" if video else "") + "---|"]
        for _key, r in quality.ordered(variants, VARIANTS):
            method = _name(r.get("method"))
            if "error" in r:
                lines.append(f"| {r['label']} | {method} | | refused: {r['error'][:80]} | | | |"
                             + (" |" if video else "") + " |")
                continue
            flicker = f" {quality_video._cell(r.get('flicker'), '.4f')} |" if video else ""
            lines.append(f"| {r['label']} | {method} | {_setting(r, model)} | {r['evaluations']:.0%} | "
                         f"{1 - r['evaluations']:.0%} | {r['wall_s']:.1f} | {_accuracy(r):.1%} |{flicker} "
                         f"{r['psnr_db']:.1f} |")
        lines.append("")
        by_method = points(variants)
        for speedup, saved in TARGETS:
            lines += _at_target(model, variants, by_method, speedup, saved, video)
        verdict = front_verdict(by_method)
        lines += [f"**{BAND[0]:.0%}-{BAND[1]:.0%} saved:** {verdict['text']}", ""]
    return "\n".join(lines)


def _per_model(payload: Dict, field: str) -> str:
    value = payload[field]
    if isinstance(value, dict):
        return ", ".join(f"{v} ({m})" for m, v in value.items())
    return str(value)


def _at_target(model: str, variants: Dict, by_method: Dict, speedup: int, saved: float, video: bool) -> List[str]:
    """Each method's setting nearest ``saved``, and StepCache's lead on each line at exactly ``saved``."""
    ours_method, ours_db = _best(by_method, [m for m in by_method if m in OURS], saved)
    best = (f"StepCache's best ({_name(ours_method)}, {ours_db:.1f} dB)" if ours_db is not None
            else f"StepCache's best (no StepCache setting saves {saved:.0%})")
    head = (f"### {model} at {speedup}x ({saved:.0%} saved)", "",
            f"Each method's setting nearest {saved:.0%} saved; the last column compares the lines at exactly "
            f"{saved:.0%}: {best} against the method's.", "",
            "| method | nearest setting | saved | accuracy | " + ("flicker | " if video else "")
            + "PSNR dB | StepCache there |", "|---|---|---|---|" + ("---|" if video else "") + "---|---|")
    lines = list(head)
    for method, method_points in by_method.items():
        key, r = _nearest(variants, method_points, saved)
        theirs = psnr_at(method_points, saved)
        if method in OURS:
            there = "(ours)"
        elif ours_db is None:
            there = "StepCache does not reach it"
        elif theirs is None:
            there = f"ahead (the method does not reach {saved:.0%})"
        else:
            margin = ours_db - theirs
            there = f"{'ahead' if margin >= 0 else 'behind'} by {abs(margin):.1f} dB"
        flicker = f" {quality_video._cell(r.get('flicker'), '.4f')} |" if video else ""
        lines.append(f"| {_name(method)} | {_setting(r, model)} | {1 - r['evaluations']:.0%} | "
                     f"{_accuracy(r):.1%} |{flicker} {r['psnr_db']:.1f} | {there} |")
    return lines + [""]


COLOURS = {"stepcache": (31, 119, 180), "stepcache_target": (23, 190, 207), "easycache": (214, 39, 40),
           "lazycache": (255, 127, 14), "teacache": (44, 160, 44), "fbcache": (148, 103, 189),
           "magcache": (140, 86, 75), "taylorseer_o1": (227, 119, 194), "taylorseer_o2": (127, 127, 127)}


def draw_chart(results: Dict, path) -> None:
    """PSNR against the share of evaluations saved, one panel per model, one line per method (its own front;
    dots: every setting), the band shaded (PIL, as quality.py draws its chart)."""
    from PIL import Image, ImageDraw

    panel_w, plot_h, margin, legend_h = 560, 380, 60, 80
    image = Image.new("RGB", (panel_w * len(results), 30 + plot_h + legend_h), "white")
    pen = ImageDraw.Draw(image)
    for panel, (model, variants) in enumerate(results.items()):
        left, top = panel * panel_w + margin, 30
        width, height = panel_w - margin - 20, plot_h - 40
        by_method = points(variants)
        top_db = max([p[1] for pts in by_method.values() for p in pts] + [40.0])
        top_db = 10 * -(-top_db // 10)

        def at(saved, db, left=left, top=top, width=width, height=height, top_db=top_db):
            return left + saved * width, top + height - db / top_db * height

        pen.text((left, 8), f"{model}: PSNR from full compute vs evaluations saved", fill="black")
        pen.rectangle([at(BAND[0], top_db), at(BAND[1], 0)], fill=(238, 238, 238))
        pen.text((at(BAND[0], top_db)[0] + 4, top + 2), f"{BAND[0]:.0%}-{BAND[1]:.0%} saved", fill=(110, 110, 110))
        for db in range(0, int(top_db) + 1, 10):
            x, y = at(0, db)
            pen.text((x - 34, y - 6), f"{db} dB", fill="black")
            pen.line([(x, y), (left + width, y)], fill=(215, 215, 215))
        pen.line([(left, top), (left, top + height), (left + width, top + height)], fill="black")
        for tick in range(0, 11, 2):
            x, y = at(tick / 10, 0)
            pen.text((x - 8, y + 4), f"{tick * 10}%", fill="black")
        pen.text((left + width / 2 - 150, top + height + 18),
                 "share of model evaluations saved (dots: every setting; lines: each method's own front)",
                 fill="black")
        drawn = sorted(by_method, key=lambda m: m in OURS)  # ours last, on top
        for method in drawn:
            colour = COLOURS.get(method, (0, 0, 0))
            line = [at(*p) for p in own_front(by_method[method])]
            if len(line) > 1:
                pen.line(line, fill=colour, width=3 if method in OURS else 2)
            for saved, db, _key in by_method[method]:
                x, y = at(saved, db)
                pen.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        for i, method in enumerate(by_method):
            x, y = left + (i % 3) * (width / 3), top + height + 36 + (i // 3) * 13
            colour = COLOURS.get(method, (0, 0, 0))
            pen.line([(x, y + 6), (x + 16, y + 6)], fill=colour, width=3)
            pen.text((x + 20, y), _name(method), fill=colour)
    image.save(path)


def redraw(payload: Dict, name: str, out=None) -> None:
    """NAME.md and NAME.png from the JSON alone, in ``out`` (default bench/results/); no chart without a point."""
    out = Path(out or _common.RESULTS_DIR)
    (out / f"{name}.md").write_text(table(payload, name))
    chart = out / f"{name}.png"
    chart.unlink(missing_ok=True)
    if any(points(variants) for variants in payload["results"].values()):
        draw_chart(payload["results"], chart)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    quality.add_options(parser, "front", seeds=None, prompts="18 image or 72 clip")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps (20: what the models are judged at)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--untrained", action="store_true",
                        help="seeded random weights: checks that the code runs, the numbers mean nothing")
    args = parser.parse_args(argv)
    if args.publish and args.untrained:
        parser.error("--publish publishes figures of the committed weights only")
    return args


def main(argv=None):
    args = parse_args(argv)
    seeds = {m: seeds_of(args, m) for m in args.models}
    meta = {"weights": "seeded random weights (untrained: the numbers mean nothing)" if args.untrained
            else "the committed weights", "steps": args.steps, "seeds": seeds,
            "samples_per_variant": {m: s * PROMPTS[m] for m, s in seeds.items()}}
    quality.cli(args, run, redraw, meta)


if __name__ == "__main__":
    main()
