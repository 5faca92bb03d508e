#!/usr/bin/env bash
# Set up (if needed) and run the demo: PatchLab's example workflows in a headless ComfyUI.
# Arguments go to scripts/demo.py (--checkpoint NAME with COMFYUI_PATH=... for your own model).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/setup.sh"
exec "$root/.venv/bin/python" "$root/scripts/demo.py" "$@"
