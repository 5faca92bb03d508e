"""Shared benchmark plumbing: a real ComfyUI in-process, timers, peak memory, JSON results.

Benchmarks compare variants side by side in one process and one run (ratios are what
count; absolute times depend on the machine). Results go to stdout and to
bench/results/<name>.json.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

REPO_ROOT = Path(__file__).resolve().parent.parent
# The defaults of ComfyUI's EasyCache and LazyCache nodes (0.3.75), the baseline of the cache benches.
CORE_CACHE_DEFAULTS = {"reuse_threshold": 0.2, "start_percent": 0.15, "end_percent": 0.95, "verbose": False}
RESULTS_DIR = REPO_ROOT / "bench" / "results"


def boot(cpu: bool = None) -> None:
    """Import ComfyUI and PatchLab (and ComfyUI's core nodes). CPU unless CUDA is available and cpu is False."""
    sys.path.insert(0, str(REPO_ROOT))
    from devtools import bootstrap

    if cpu is None:
        import torch

        cpu = not torch.cuda.is_available()
    bootstrap.import_comfyui(cpu=cpu)
    bootstrap.load_core_nodes()
    bootstrap.load_pack()


def node_defaults(node_class: type) -> dict:
    """The default of every widget input of a node class (its MODEL input left out)."""
    return {name: spec[1]["default"] for name, spec in node_class.INPUT_TYPES()["required"].items()
            if len(spec) > 1 and "default" in spec[1]}


def device_name() -> str:
    import comfy.model_management
    import torch

    device = comfy.model_management.get_torch_device()
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    return f"cpu ({cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()})"


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_call(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> Dict[str, float]:
    """Median and min wall time of ``fn`` over ``repeats`` runs after ``warmup`` runs (seconds)."""
    for _ in range(warmup):
        fn()
    synchronize()
    times = [timed(fn) for _ in range(repeats)]
    return {"median_s": statistics.median(times), "min_s": min(times), "repeats": repeats}


def timed(fn: Callable[[], Any]) -> float:
    """Wall time of one call of ``fn`` (seconds, after the device finished)."""
    start = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - start


def interleaved(runs: Dict[str, Callable[[], Any]], rounds: int, warmup: bool = True) -> Dict[str, List[float]]:
    """Every run once as warm-up (unless ``warmup`` is False), then ``rounds`` round-robin passes; seconds each.

    Round-robin spreads the machine's slow phases over all variants, so their ratios hold
    where one variant timed after another would not.
    """
    for fn in runs.values() if warmup else ():
        fn()
    times: Dict[str, List[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            times[name].append(timed(fn))
    return times


def _read_status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory(fn: Callable[[], Any]) -> Dict[str, Any]:
    """Peak memory while ``fn`` runs, above what was in use before it.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: the resident-set high-water mark
    (VmHWM, reset through /proc/self/clear_refs), which includes allocator slack.
    """
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return {"kind": "cuda_allocated", "peak_bytes": torch.cuda.max_memory_allocated() - base}
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    base = _read_status_kb("VmRSS")
    fn()
    return {"kind": "cpu_rss_high_water", "peak_bytes": (_read_status_kb("VmHWM") - base) * 1024}


def write_results(name: str, payload: Dict[str, Any], echo: bool = True) -> Path:
    """Save the results to bench/results/<name>.json (and print them, unless ``echo`` is False)."""
    payload = {"benchmark": name, "device": device_name(), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
               **payload}
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    text = json.dumps(payload, indent=2)
    path.write_text(text + "\n")
    if echo:
        print(text)
    return path
