"""Token merging as a user gets it: one CFG step of SD1.5 at real size through ComfyUI's own server.

``bench/run.py`` times the sampler in-process; this script times what a user runs. It writes a
seeded random-weight SD1.5 UNet (``bench/models.py``'s config, fp32) and CLIP-L as safetensors in
a scratch ``models/`` folder (once), starts ``main.py`` (``--cpu`` unless ``--device cuda``) with
the pack in ``custom_nodes``, and queues, per variant,

    UNETLoader -> [patch node] -> KSampler (1 step, euler, CFG 5) -> SaveLatent
    CLIPLoader -> CLIPTextEncode (positive, negative)           EmptyLatentImage (size x size)

with the variants interleaved round by round after a warm-up round and a new seed on every prompt
(so KSampler runs again while the loaders and patch nodes stay cached). The time of a prompt is the
server's own, from its ``execution_start`` to its ``execution_success`` message: the sampling step
and the few milliseconds of SaveLatent. Results: ``bench/results/server_speed.json`` and ``.md``.

    .venv/bin/python bench/server_speed.py                       # 768 px, 2 rounds (CPU: ~15 min)
    .venv/bin/python bench/server_speed.py --size 512 --rounds 3
    .venv/bin/python bench/server_speed.py --comfyui /path/to/ComfyUI --python /path/to/venv/bin/python
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Dict, List, Tuple

import _common

UNET_FILE = "patchlab_bench_sd15_random.safetensors"
CLIP_FILE = "patchlab_bench_clip_l_random.safetensors"

# (name, label, node id or None, inputs): the same inputs as bench/run.py's variants of the same name.
VARIANTS: List[Tuple[str, str, object, Dict]] = [
    ("unpatched", "unpatched", None, {}),
    ("core_tome", "ToMe 0.5 (core TomePatchModel)", "TomePatchModel", {"ratio": 0.5}),
    ("patchlab_tome", "ToMe 0.5 (PatchLab)", "PatchLab_TokenMerging",
     {"ratio": 0.5, "max_downsample": 1, "stride_x": 2, "stride_y": 2, "destinations": "random", "seed": 0,
      "metric": "input", "merge": "queries, keys and values", "start_percent": 0.0, "end_percent": 1.0}),
    ("patchlab_todo", "ToDo 2x (PatchLab, defaults)", "PatchLab_TokenDownsampling",
     {"downsample_factor": 2.0, "max_downsample": 1, "method": "nearest-exact", "start_percent": 0.0,
      "end_percent": 1.0}),
]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=768, help="image size in pixels (latent size x 8)")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds after the warm-up round")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--variants", nargs="+", default=[v[0] for v in VARIANTS],
                        choices=[v[0] for v in VARIANTS])
    parser.add_argument("--models-dir", type=Path, default=Path(tempfile.gettempdir()) / "patchlab_bench_models",
                        help="where the random-weight files are written (once) and read by the server")
    parser.add_argument("--comfyui", type=Path, default=None, help="the ComfyUI checkout (default: the suite's)")
    parser.add_argument("--python", default=None, help="the Python that runs main.py (default: this one)")
    return parser.parse_args()


def write_weights(models_dir: Path) -> None:
    """The random-weight UNet (models/unet) and CLIP-L (models/text_encoders), seeded, unless already there."""
    import comfy.utils
    import models
    import torch

    unet_path = models_dir / "unet" / UNET_FILE
    clip_path = models_dir / "text_encoders" / CLIP_FILE
    if not unet_path.exists():
        unet_path.parent.mkdir(parents=True, exist_ok=True)
        patcher = models.build("sd15", dtype=torch.float32, seed=0)
        comfy.utils.save_torch_file(patcher.model.diffusion_model.state_dict(), str(unet_path))
        del patcher
    if not clip_path.exists():
        import comfy.sd1_clip

        clip_path.parent.mkdir(parents=True, exist_ok=True)
        encoder = comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32)
        generator = torch.Generator().manual_seed(0)
        state = {}
        for key, value in encoder.transformer.state_dict().items():
            if value.is_floating_point():
                value = torch.randn(value.shape, generator=generator) * 0.02
            state[key] = value.contiguous()
        comfy.utils.save_torch_file(state, str(clip_path))


def workflow(variant: Tuple[str, str, object, Dict], size: int, seed: int, defaults: Dict[str, Dict]) -> Dict:
    """The API-format prompt of one variant."""
    _, _, node_id, inputs = variant
    prompt = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": UNET_FILE, "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": CLIP_FILE, "type": "stable_diffusion"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["2", 0]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["2", 0]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": seed, "steps": 1, "cfg": 5.0, "sampler_name": "euler",
            "scheduler": "normal", "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0],
            "denoise": 1.0}},
        "8": {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": "bench/step"}},
    }
    if node_id is not None:
        prompt["6"] = {"class_type": node_id, "inputs": {**defaults.get(node_id, {}), **inputs, "model": ["1", 0]}}
        prompt["7"]["inputs"]["model"] = ["6", 0]
    return prompt


def node_class(node_id: str) -> type:
    """A node class by id: PatchLab's or ComfyUI's core (both imported in this process by ``_common.boot``)."""
    import nodes as comfy_nodes
    from patchlab.nodes import NODE_CLASS_MAPPINGS

    return NODE_CLASS_MAPPINGS.get(node_id) or comfy_nodes.NODE_CLASS_MAPPINGS[node_id]


def seconds(entry: Dict) -> float:
    """execution_start to execution_success of a finished prompt, from the server's status messages."""
    stamps = {kind: data["timestamp"] for kind, data in entry["status"]["messages"]}
    return (stamps["execution_success"] - stamps["execution_start"]) / 1000.0


def main():
    args = parse_args()
    _common.boot(cpu=args.device == "cpu")
    from devtools import server as comfy_server

    args.models_dir.mkdir(parents=True, exist_ok=True)
    write_weights(args.models_dir)
    chosen = [v for v in VARIANTS if v[0] in args.variants]
    defaults = {v[2]: _common.node_defaults(node_class(v[2])) for v in chosen if v[2] is not None}
    times: Dict[str, List[float]] = {v[0]: [] for v in chosen}
    with tempfile.TemporaryDirectory(prefix="patchlab_bench_server_") as scratch:
        base = comfy_server.prepare_base_directory(Path(scratch), with_testkit=False, models=args.models_dir)
        server = comfy_server.ComfyServer(base, comfyui=args.comfyui, cpu=args.device == "cpu", python=args.python)
        with server:
            stats = server.get("/system_stats")
            seed = 0
            for round_index in range(args.rounds + 1):  # round 0 warms up (loads, allocations)
                for variant in chosen:
                    seed += 1
                    entry = server.run(workflow(variant, args.size, seed, defaults), timeout=3600)
                    elapsed = seconds(entry)
                    print(f"round {round_index} {variant[0]}: {elapsed:.2f} s", flush=True)
                    if round_index > 0:
                        times[variant[0]].append(elapsed)
    base_s = min(times["unpatched"]) if "unpatched" in times else None
    rows = []
    for name, label, _, _ in chosen:
        best = min(times[name])
        rows.append({"variant": name, "label": label, "best_s": round(best, 2),
                     "median_s": round(statistics.median(times[name]), 2), "times_s": times[name],
                     "speedup": round(base_s / best, 3) if base_s else None})
    core = next((r for r in rows if r["variant"] == "core_tome"), None)
    for row in rows:
        if core and row["speedup"] and row["variant"].startswith("patchlab"):
            row["speedup_over_core_speedup"] = round(row["speedup"] / core["speedup"], 3)
    what = (f"SD1.5 at real size (random weights, fp32 file) through ComfyUI's server (main.py"
            f"{' --cpu' if args.device == 'cpu' else ''}): UNETLoader, CLIPLoader/CLIPTextEncode, KSampler 1 step "
            f"euler CFG 5 (cond and uncond in one call), {args.size}x{args.size} px; variants interleaved, "
            f"{args.rounds} rounds after a warm-up round; time from the server's execution_start to "
            f"execution_success")
    path = _common.write_results("server_speed", {"what": what, "server": stats.get("system", {}), "results": rows})
    lines = [f"# server_speed\n\n{what}; {_common.device_name()}.\n",
             "| variant | best s | median s | speed-up | PatchLab's speed-up / core's |", "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['label']} | {row['best_s']} | {row['median_s']} | {row['speedup']}x | "
                     f"{row.get('speedup_over_core_speedup', '')} |")
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
