"""Helpers shared by the tests: run a node class, check a patch left its input alone."""

from __future__ import annotations

import re
from typing import Any, Callable, Dict, List, Tuple


def run_node(node_class: type, **inputs: Any) -> Tuple:
    """Call a node the way ComfyUI executes it (V1 FUNCTION or V3 ``execute``); returns its outputs."""
    if hasattr(node_class, "FUNCTION"):
        return tuple(getattr(node_class(), node_class.FUNCTION)(**inputs))
    output = node_class.execute(**inputs)
    return tuple(output.result if hasattr(output, "result") else output)


def snapshot(model) -> Dict[str, Any]:
    """What a patch must not change on the ModelPatcher it was given."""
    return {
        "model_options": _freeze(model.model_options),
        "object_patches": dict(model.object_patches),
        "patches_uuid": model.patches_uuid,
        "model_sampling": model.get_model_object("model_sampling"),
    }


def assert_unchanged(model, before: Dict[str, Any]) -> None:
    after = snapshot(model)
    for key, value in before.items():
        assert after[key] == value if key != "model_sampling" else after[key] is value, f"input model's {key} changed"


def _freeze(value: Any) -> Any:
    """A comparable copy of nested dicts/lists; other objects compared by identity."""
    if isinstance(value, dict):
        return tuple(sorted((repr(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_freeze(v) for v in value))
    return ("id", id(value))


STEP_CACHE_LOG = re.compile(r"PatchLab_StepCache: reused (\d+) of (\d+) steps \((\d+) partly\); model calls: (\d+) "
                            r"full, (\d+) reused; rows: (\d+) evaluated, (\d+) reused, (\d+) in extra passes")
STEP_CACHE_KEYS = ("reused_steps", "steps", "partly", "full_calls", "reused_calls", "full_rows", "reused_rows",
                   "extra_rows")


def step_cache_runs(caplog) -> List[Dict[str, int]]:
    """The StepCache log lines so far as dicts (one per run, :data:`STEP_CACHE_KEYS`), and clear the log."""
    found = []
    for record in caplog.records:
        match = STEP_CACHE_LOG.search(record.getMessage())
        if match:
            found.append(dict(zip(STEP_CACHE_KEYS, map(int, match.groups()))))
    caplog.clear()
    return found


def batch_item(conditioning, i: int):
    """Batch item ``i`` of a one-entry CONDITIONING (its tensor and the per-item tensors of its extras)."""
    import torch

    tensor, extras = conditioning[0]
    return [[tensor[i:i + 1], {k: v[i:i + 1] if torch.is_tensor(v) and v.shape[:1] == tensor.shape[:1] else v
                               for k, v in extras.items()}]]


def alone_and_together(patched: Callable[[], Any], base, layout: str, prompts: Dict, img2img: bool = False):
    """Sample a batch of two with the model ``patched()`` returns, and each of its items alone (12 steps): returns
    (the items alone, the batch, rows counted per item alone, rows counted together; rows of ``base``'s network).
    ``img2img``: item 1 starts from a picture (denoise 0.6), so the items' inputs change differently."""
    import comfy.sample
    import torch

    from .sampling import sample
    from .testkit import tiny_models
    from .testkit.counting import count_rows

    latent = comfy.sample.fix_empty_latent_channels(base, tiny_models.empty_latent(layout, batch=2))
    if img2img:
        latent[1] = 2.0 * torch.randn(latent[1].shape, generator=torch.Generator().manual_seed(3))
    noise = comfy.sample.prepare_noise(latent, 7)
    common = {"steps": 12, "denoise": 0.6 if img2img else 1.0}
    alone, rows_alone = [], []
    for i in range(2):
        with count_rows(base) as counted:
            alone.append(sample(patched(), layout, noise=noise[i:i + 1], latent=latent[i:i + 1], **common,
                                **{name: batch_item(cond, i) for name, cond in prompts.items()}))
        rows_alone.append(counted.rows)
    with count_rows(base) as counted:
        together = sample(patched(), layout, noise=noise, latent=latent, **common, **prompts)
    return alone, together, rows_alone, counted.rows
