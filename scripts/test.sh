#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite against a real ComfyUI.
# Arguments go to pytest (e.g. -k flux, -m "not e2e").
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/setup.sh"
cd "$root"
exec "${PATCHLAB_VENV:-$root/.venv}/bin/python" -m pytest "$@"
