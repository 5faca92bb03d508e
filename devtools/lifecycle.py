"""Lifecycle checks of patched models: reuse across changing work, interrupted runs, threads.

A patched MODEL is one object that ComfyUI's output cache hands to run after run. The
tests in ``tests/nodes/test_lifecycle.py`` and ``tests/nodes/test_concurrency.py`` walk
:data:`CASES`, one entry per node configuration; a new node is covered by adding one
:class:`Case` (its node id, the inputs to use, the tiny layout)::

    Case("PatchLab_StepCache", {"indicator": "input", "threshold": 0.25, ...}, layout="sdxl"),

Everything is compared with what a *freshly* patched model gives for the same work
(:func:`fresh`, memoised per process so the files share the reference runs).
"""

from __future__ import annotations

import functools
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import comfy.model_management
import comfy.patcher_extension
import comfy.sample
import torch

from . import checks, sampling
from .testkit import tiny_models

FULL = {"start_percent": 0.0, "end_percent": 1.0}


@dataclass(frozen=True)
class Work:
    """One sampling run: latent size, batch, steps, sampler and denoise (seeded, so repeatable)."""

    height: int = 16
    width: int = 16
    batch: int = 1
    steps: int = 2
    sampler: str = "euler"
    scheduler: str = "normal"
    seed: int = 0
    denoise: float = 1.0
    cfg: float = 5.0

    def __str__(self) -> str:
        return (f"{self.height}x{self.width}xb{self.batch} {self.sampler} {self.steps} steps seed {self.seed} "
                f"denoise {self.denoise}")


# Consecutive runs of one patched model: size (odd, non-square), batch, steps, sampler
# (an SDE one with a fixed seed) and denoise all change, then the first work comes back.
SEQUENCE = (
    Work(),
    Work(height=13, width=21, batch=2, steps=3, sampler="dpmpp_2m", seed=1),
    Work(height=9, width=12, batch=1, steps=2, sampler="dpmpp_2m_sde", scheduler="karras", seed=2, denoise=0.6),
    Work(),
)


@dataclass(frozen=True)
class Case:
    """A node configuration under test.

    ``inputs`` are the node's widget inputs (the MODEL is added); ``resources`` names
    extra inputs built at test time (see :data:`RESOURCES`, e.g. InstantID's weights);
    ``chunked`` runs cond and uncond as separate model calls.
    """

    node_id: str
    inputs: Dict[str, Any] = field(default_factory=dict)
    layout: str = "sd15"
    chunked: bool = False
    resources: Tuple[str, ...] = ()
    label: str = ""

    @property
    def key(self) -> Tuple:
        return (self.node_id, repr(sorted(self.inputs.items())), self.layout, self.chunked, self.resources)

    @property
    def name(self) -> str:
        return self.node_id.replace("PatchLab_", "") + (f"[{self.label}]" if self.label else "") + \
            ("[chunked]" if self.chunked else "")


PAG = {"scale": 3.0, "rescale": 0.0, **FULL}
CASES: List[Case] = [
    # stateful: momentum, step counters, recorded attention, merge plans
    Case("PatchLab_AdaptiveProjectedGuidance",
         {"eta": 1.0, "norm_threshold": 5.0, "momentum": -0.5, "mode": "paper", **FULL}, label="momentum"),
    Case("PatchLab_AdaptiveProjectedGuidance",
         {"eta": 0.5, "norm_threshold": 2.0, "momentum": 0.5, "mode": "comfyui", **FULL}, chunked=True,
         label="comfyui"),
    Case("PatchLab_CFGZeroStar", {"mode": "paper", "zero_init_steps": 1, **FULL}),
    Case("PatchLab_SelfAttentionGuidance",
         {"scale": 0.5, "blur_sigma": 2.0, "threshold": 1.0, "block": "middle.0.0", **FULL}),
    Case("PatchLab_SelfAttentionGuidance",
         {"scale": 0.5, "blur_sigma": 2.0, "threshold": 1.0, "block": "middle.0.0", **FULL}, chunked=True),
    Case("PatchLab_PerturbedAttentionGuidance", {**PAG, "blocks": "auto"}),
    Case("PatchLab_PerturbedAttentionGuidance", {**PAG, "blocks": "middle"}, chunked=True),
    Case("PatchLab_SmoothedEnergyGuidance", {"scale": 3.0, "blur_sigma": 10.0, "blocks": "auto", **FULL}),
    Case("PatchLab_TokenMerging",
         {"ratio": 0.5, "max_downsample": 1, "stride_x": 2, "stride_y": 2, "destinations": "random", "seed": 3,
          "metric": "input", "merge": "queries, keys and values", "start_percent": 0.0, "end_percent": 0.7}),
    Case("PatchLab_TokenDownsampling",
         {"downsample_factor": 2.0, "max_downsample": 1, "method": "nearest-exact", "start_percent": 0.0,
          "end_percent": 0.7}),
    Case("PatchLab_InstantIDAttentionPatch",
         {"weight": 1.0, "start_at": 0.0, "end_at": 1.0, "noise": 0.0, "face_index": 0, "on_no_face": "error"},
         layout="sdxl", resources=("instantid", "insightface", "image")),
    Case("PatchLab_AdaptiveGuidance", {"threshold": 0.5, "start_percent": 0.2}),
    Case("PatchLab_AdaptiveGuidance", {"threshold": 0.5, "start_percent": 0.0}, chunked=True),
    Case("PatchLab_GuidanceInterval", {"start_percent": 0.2, "end_percent": 0.8}),
    Case("PatchLab_RenormCFG", {"cfg_trunc": 50.0, "renorm_cfg": 1.0, "truncate": "paper", **FULL}, chunked=True,
         label="paper"),
    Case("PatchLab_DeepCache", {"interval": 2, "depth": 1, **FULL}),
    Case("PatchLab_DeepCache", {"interval": 2, "depth": 0, **FULL}, layout="sdxl", chunked=True),
    Case("PatchLab_StepCache", {"indicator": "input", "threshold": 0.5, "max_consecutive": 2, "reuse": "forecast",
                                **FULL}),
    Case("PatchLab_StepCache", {"indicator": "first block", "threshold": 0.5, "max_consecutive": 2,
                                "reuse": "plain", **FULL}, layout="flux", chunked=True),
    Case("PatchLab_PerturbedAttentionGuidance", {**PAG, "blocks": "auto"}, layout="flux"),
    Case("PatchLab_SkipLayerGuidance", {"scale": 3.0, "blocks": "auto", "rescaling_scale": 0.5, **FULL},
         layout="flux"),
    Case("PatchLab_NormalizedAttentionGuidance", {"scale": 5.0, "tau": 2.5, "alpha": 0.5, **FULL}),
    Case("PatchLab_NormalizedAttentionGuidance", {"scale": 5.0, "tau": 2.5, "alpha": 0.5, **FULL}, layout="flux",
         chunked=True),
    Case("PatchLab_TokenPerturbationGuidance", {"scale": 3.0, "blocks": "auto", "seed": 3, **FULL}, chunked=True),
    Case("PatchLab_TokenPerturbationGuidance", {"scale": 3.0, "blocks": "auto", "seed": 3, **FULL}, layout="flux"),
    Case("PatchLab_NormalizedAttentionGuidance", {"scale": 5.0, "tau": 2.5, "alpha": 0.5, "start_percent": 0.0,
                                                  "end_percent": 0.6}, layout="wan21", chunked=True),
    Case("PatchLab_NormalizedAttentionGuidance", {"scale": 5.0, "tau": 2.5, "alpha": 0.5, **FULL}, layout="sd3"),
    Case("PatchLab_NormalizedAttentionGuidance", {"scale": 5.0, "tau": 2.5, "alpha": 0.5, **FULL},
         layout="qwen_image", chunked=True),
    Case("PatchLab_NormalizedAttentionGuidance", {"scale": 5.0, "tau": 2.5, "alpha": 0.5, **FULL}, layout="zimage",
         chunked=True),
    # stateless
    Case("PatchLab_RescaleCFG", {"multiplier": 0.7, **FULL}),
    Case("PatchLab_FreeU_V2", {"b1": 1.3, "b2": 1.4, "s1": 0.9, "s2": 0.2, **FULL}),
    Case("PatchLab_FreSca", {"scale_low": 1.0, "scale_high": 1.25, "freq_cutoff": 3, **FULL}),
    Case("PatchLab_ModelSamplingDiscrete", {"sampling": "v_prediction", "zsnr": True}),
]


def case_ids(cases: List[Case]) -> List[str]:
    return [case.name for case in cases]


# --- resources (inputs that are objects, built once per process) -------------------------

@functools.cache
def _instantid_bundle(layout: str) -> Dict[str, Any]:
    from patchlab.patches import instantid
    from patchlab.patches.instantid import face_analysis

    from .testkit import face_models

    root = Path(tempfile.mkdtemp(prefix="patchlab_lifecycle_"))
    face_models.write_antelopev2(root / "insightface")
    model = tiny_models.build_model(layout)
    path = face_models.save_instantid(face_models.instantid_state_dict(model), root / "ip-adapter.bin")
    return {"instantid": instantid.load_weights(str(path), "PatchLab_Lifecycle"),
            "insightface": face_analysis.load("CPU", "PatchLab_Lifecycle", root=root / "insightface"),
            "image": face_models.face_picture()}


RESOURCES: Dict[str, Callable[[str], Any]] = {
    "instantid": lambda layout: _instantid_bundle(layout)["instantid"],
    "insightface": lambda layout: _instantid_bundle(layout)["insightface"],
    "image": lambda layout: _instantid_bundle(layout)["image"],
}


# --- patching and sampling ----------------------------------------------------------------

def node_class(node_id: str) -> type:
    import patchlab

    return patchlab.NODE_CLASS_MAPPINGS[node_id]


def model_for(case: Case):
    """The case's tiny base model (built once per process; never patched in place)."""
    return _base_model(case.layout, case.chunked)


@functools.cache
def _base_model(layout: str, chunked: bool):
    return tiny_models.build_model(layout, chunked=chunked)


def patch(case: Case, model=None):
    """A freshly patched model for the case (the node's first MODEL output)."""
    model = model_for(case) if model is None else model
    extra = {name: RESOURCES[name](case.layout) for name in case.resources}
    return checks.run_node(node_class(case.node_id), model=model, **case.inputs, **extra)[0]


def sample(model, layout: str, work: Work, callback: Optional[Callable] = None) -> torch.Tensor:
    """``comfy.sample.sample`` as KSampler calls it, for ``work``; ``callback(step, x0, x, total)`` per step."""
    return sampling.sample(model, layout, steps=work.steps, cfg=work.cfg, sampler=work.sampler,
                           scheduler=work.scheduler, seed=work.seed, height=work.height, width=work.width,
                           batch=work.batch, denoise=work.denoise, callback=callback)


_FRESH: Dict[Tuple, torch.Tensor] = {}
_FRESH_LOCK = threading.Lock()


def fresh(case: Case, work: Work) -> torch.Tensor:
    """What a freshly patched model gives for ``work`` (memoised per process)."""
    key = (case.key, work)
    with _FRESH_LOCK:
        if key not in _FRESH:
            _FRESH[key] = sample(patch(case), case.layout, work)
        return _FRESH[key]


def remember(case: Case, work: Work, result: torch.Tensor) -> None:
    """Record the result of a patched model's first run as the fresh reference for ``work``."""
    with _FRESH_LOCK:
        _FRESH.setdefault((case.key, work), result)


def assert_same(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if not torch.equal(actual, expected):
        diff = float((actual - expected).abs().max())
        raise AssertionError(f"{what}: differs from a freshly patched model's run (max |diff| {diff:.3g})")


# --- interruptions --------------------------------------------------------------------------

class Interrupted(RuntimeError):
    """Raised by the test hooks below to stop a run mid-sampling."""


def raising_post_cfg(model, on_call: int):
    """A further clone whose post-CFG function raises on its ``on_call``-th call (1-based)."""
    calls = [0]

    def post_cfg(args):
        calls[0] += 1
        if calls[0] == on_call:
            raise Interrupted(f"post-CFG call {on_call}")
        return args["denoised"]

    clone = model.clone()
    clone.set_model_sampler_post_cfg_function(post_cfg)
    return clone


def raising_model_call(model, on_call: int):
    """A further clone whose APPLY_MODEL wrapper raises after its ``on_call``-th model call.

    The inner patches have run for that call (recorded attention, merge plans), the
    step is left half done. (APPLY_MODEL, not DIFFUSION_MODEL: SD3's network in 0.3.75 does not
    run the DIFFUSION_MODEL wrappers.)
    """
    calls = [0]

    def wrapper(executor, *args, **kwargs):
        out = executor(*args, **kwargs)
        calls[0] += 1
        if calls[0] == on_call:
            raise Interrupted(f"model call {on_call}")
        return out

    clone = model.clone()
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "patchlab_lifecycle_test", wrapper)
    return clone


def interrupting_callback(on_step: int) -> Callable:
    """A sampler callback that asks ComfyUI to interrupt (as ``POST /interrupt`` does) at ``on_step``."""

    def callback(step, x0, x, total_steps):
        if step == on_step:
            comfy.model_management.interrupt_current_processing(True)

    return callback
