"""Run PatchLab's example workflows in a real, headless ComfyUI and collect the images.

Default: the ComfyUI that scripts/setup.sh provisions (or $COMFYUI_PATH), on the CPU,
with tiny built-in models standing in for the checkpoints, so it needs no downloads.
With --checkpoint NAME: your own ComfyUI ($COMFYUI_PATH) and a checkpoint from its
models/checkpoints folder, at the workflows' real sizes and step counts.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devtools import bootstrap, workflows  # noqa: E402
from devtools.server import ComfyServer, ServerError, prepare_base_directory  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=bootstrap.REPO_ROOT / "demo_output",
                        help="folder for the images (default: demo_output/)")
    parser.add_argument("--checkpoint", help="checkpoint file name in $COMFYUI_PATH/models/checkpoints; "
                                             "runs the workflows on it instead of the tiny models")
    parser.add_argument("--workflows", default="*", help="glob of example workflow names to run (default: all)")
    parser.add_argument("--gpu", action="store_true", help="let ComfyUI use the GPU (default: --cpu)")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    comfyui = bootstrap.comfyui_root()
    paths = [p for p in workflows.example_paths() if fnmatch.fnmatch(p.stem, args.workflows)]
    if not paths:
        print(f"no example workflow matches {args.workflows!r}")
        return 2
    models = None
    if args.checkpoint:
        models = comfyui / "models"
        if not (models / "checkpoints" / args.checkpoint).is_file():
            print(f"{args.checkpoint} is not in {models / 'checkpoints'}; set COMFYUI_PATH to your ComfyUI "
                  "and pass a file name from its models/checkpoints folder")
            return 2
    args.out.mkdir(parents=True, exist_ok=True)
    mode = f"checkpoint {args.checkpoint}" if args.checkpoint else "tiny built-in models"
    print(f"ComfyUI {bootstrap.comfyui_version(comfyui)} at {comfyui}; {len(paths)} workflows on {mode}")

    failures = 0
    summary = {}
    with tempfile.TemporaryDirectory(prefix="patchlab-demo-") as scratch:
        base = prepare_base_directory(Path(scratch), with_testkit=not args.checkpoint, models=models)
        with ComfyServer(base, comfyui=comfyui, cpu=not args.gpu) as server:
            object_info = server.object_info()
            for path in paths:
                prompt = workflows.ui_to_api(workflows.load(path), object_info)
                prompt = workflows.use_checkpoint(prompt, args.checkpoint) if args.checkpoint \
                    else workflows.use_testkit(prompt, trained=True)
                missing = workflows.missing_choices(prompt, object_info)
                if args.checkpoint and missing:
                    summary[path.stem] = {"skipped": missing}
                    print(f"  skipped {path.stem}: this ComfyUI lacks {', '.join(missing)}")
                    continue
                start = time.monotonic()
                try:
                    entry = server.run(prompt, timeout=3600)
                except ServerError as error:
                    failures += 1
                    summary[path.stem] = {"error": str(error)}
                    print(f"  FAILED {path.stem}: {error}")
                    continue
                target = args.out / path.stem
                target.mkdir(exist_ok=True)
                saved = []
                for image in server.output_images(entry):
                    shutil.copy(image, target / image.name)
                    saved.append(str(target / image.name))
                summary[path.stem] = {"seconds": round(time.monotonic() - start, 2), "images": saved}
                print(f"  ok {path.stem}: {len(saved)} image(s) in {target} ({summary[path.stem]['seconds']} s)")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"images in {args.out}; {failures} workflow(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
