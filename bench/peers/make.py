"""One ``make(model, name)`` factory per peer, for a bench ``Variant`` (ComfyUI must be loaded).

Each factory takes the peer's parameters as overrides of its published defaults for the model's family
(``DEFAULTS`` of :mod:`.teacache`, :mod:`.magcache`, :mod:`.fbcache`, :mod:`.taylorseer`; the family is read
from the model when ``make`` runs) and ``on_finish``, called with each finished :class:`.binding.PeerRun`::

    Variant("teacache", "TeaCache defaults", (UNET, DIT), "peer", "speed", make.teacache())
    Variant("magcache", "MagCache defaults", (UNET, DIT), "peer", "speed",
            make.magcache(calibrate_with=make.shapes_calibration()))

MagCache needs its ratio table: pass ``ratios`` (per stream, from :func:`calibrate`) or ``calibrate_with``,
which runs the calibration once per ``make``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import fbcache as fb
from . import magcache as mc
from . import taylorseer as ts
from . import teacache as tc
from .binding import PeerSpec, bind, family_of


def _params(defaults: Dict[str, Dict], family: str, overrides: Dict) -> Dict:
    return {**defaults[family], **overrides}


def teacache(on_finish=None, ret_mode: bool = False, **overrides):
    """``make(model, name)``: TeaCache at its published defaults for the model's family (:mod:`.teacache`);
    ``ret_mode``: Wan's "ret mode" (feature e0, its own polynomial and defaults)."""
    def make(model, _name=None):
        family = family_of(model)
        ret = ret_mode and family == "wan"
        params = _params(tc.DEFAULTS, "wan ret" if ret else family, overrides)
        feature = "modulated e0" if ret else "modulated"
        return bind(model, PeerSpec(f"TeaCache ({family}, threshold {params['threshold']:g})",
                                    lambda key: tc.TeaCache(**params), "embed", feature, on_finish))
    return make


def fbcache(on_finish=None, **overrides):
    """``make(model, name)``: First Block Cache at its published defaults for the model's family."""
    def make(model, _name=None):
        family = family_of(model)
        params = _params(fb.DEFAULTS, family, overrides)
        return bind(model, PeerSpec(f"FBCache ({family}, threshold {params['threshold']:g})",
                                    lambda key: fb.FBCache(**params), "first block", "first block", on_finish))
    return make


def taylorseer(on_finish=None, **overrides):
    """``make(model, name)``: TaylorSeer at its published defaults for the model's family."""
    def make(model, _name=None):
        family = family_of(model)
        params = _params(ts.DEFAULTS, family, overrides)
        label = f"TaylorSeer ({family}, interval {params['interval']}, order {params['order']})"
        return bind(model, PeerSpec(label, lambda key: ts.TaylorSeer(**params), "embed", None, on_finish))
    return make


def calibration(model, on_finish=None) -> Tuple[Any, mc.Calibration]:
    """A clone of ``model`` whose runs are MagCache's calibration (full evaluations, ratios recorded), and the
    :class:`.magcache.Calibration` that receives the tables."""
    family_of(model)
    tables = mc.Calibration()
    spec = PeerSpec("MagCache calibration", lambda key: tables.recorder(key[1]), "embed", None, on_finish)
    return bind(model, spec), tables


def calibrate(model, sample: Callable[[Any], Any]) -> Dict[int, List[float]]:
    """MagCache's calibration: ``sample(patched)`` runs the model in full once; returns the ratio table per
    stream (0 cond, 1 uncond)."""
    patched, tables = calibration(model)
    sample(patched)
    ratios = tables.ratios()
    if not ratios:
        raise RuntimeError("MagCache calibration: the run recorded no ratios (fewer than two steps?)")
    return ratios


def magcache(ratios: Optional[Dict[int, List[float]]] = None, calibrate_with=None, on_finish=None, **overrides):
    """``make(model, name)``: MagCache at its published defaults for the model's family, reading ``ratios``
    (per stream) or, without them, the tables of ``calibrate_with(model, name)`` (run once per ``make``)."""
    if not ratios and calibrate_with is None:
        raise ValueError("MagCache: pass ratios (from calibrate) or calibrate_with; the rule needs calibrated ratios")

    def make(model, name=None):
        family = family_of(model)
        params = _params(mc.DEFAULTS, family, overrides)
        tables = ratios if ratios else calibrate_with(model, name)

        def new_rule(key):
            return mc.MagCache(tables.get(key[1], tables.get(0, next(iter(tables.values())))), **params)

        label = (f"MagCache ({family}, threshold {params['threshold']:g}, retention {params['retention_ratio']:g}, "
                 f"K {params['max_skips']})")
        return bind(model, PeerSpec(label, new_rule, "embed", None, on_finish))
    return make


def shapes_calibration(prompts: int = 1, steps: int = 20, seed: int = 0, load: Optional[Callable] = None):
    """``calibrate_with`` for the trained reference models (``sd15_shapes``, ``flux_shapes``, ``wan_shapes``):
    one full run of the first ``prompts`` prompts through ``devtools.testkit.shapes.evaluate.sample`` at the
    bench's steps and the model's recommended CFG (the reference calibrates on one prompt). ``load(name)``: the
    ``models.Trained`` whose word table encodes the prompts (default ``models.load``, the committed weights; a
    bench judging other weights passes what it loaded)."""
    def calibrate_with(model, name):
        from devtools.testkit.shapes import evaluate, models

        trained = dataclasses.replace((load or models.load)(name), model=model)
        grid = evaluate.ALL_CLIP_PROMPTS if models.spec(name).frames else evaluate.ALL_PROMPTS
        return calibrate(model, lambda patched: evaluate.sample(trained, grid[:prompts], model=patched,
                                                                steps=steps, seed=seed))
    return calibrate_with
