#!/usr/bin/env bash
# Run the test suite against any ComfyUI checkout (the folder holding main.py), in a virtual
# environment of its own (.venv-comfyui-<version>), so scripts/test.sh's ComfyUI 0.3.75
# environment stays as it is. Arguments after the folder go to pytest.
#   scripts/test-comfyui.sh /path/to/ComfyUI
#   scripts/test-comfyui.sh /path/to/ComfyUI -m "not slow" -x
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
if [ $# -lt 1 ] || [ ! -f "$1/main.py" ] || [ ! -f "$1/comfyui_version.py" ]; then
  echo "usage: scripts/test-comfyui.sh /path/to/ComfyUI [pytest arguments]" >&2
  echo "(the folder must hold ComfyUI's main.py and comfyui_version.py)" >&2
  exit 2
fi
comfy=$(cd "$1" && pwd)
shift
version=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$comfy/comfyui_version.py")
echo "[test-comfyui] ComfyUI $version at $comfy"
export COMFYUI_PATH=$comfy
export PATCHLAB_VENV=$root/.venv-comfyui-$version
exec "$root/scripts/test.sh" "$@"
