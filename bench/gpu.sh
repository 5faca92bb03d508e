#!/usr/bin/env bash
# On a CUDA machine: set up what is missing, print torch/CUDA/GPU, run the test suite, then the quick
# real-size bench in fp16 on the GPU.
#
#   bench/gpu.sh                 # setup + suite (without the soak) + bench/run.py --quick --device cuda
#   bench/gpu.sh --no-bench      # setup + suite only
#   bench/gpu.sh -- -k flux      # extra arguments after -- go to pytest
#
# The tests themselves run on the CPU (they never depend on a GPU); the bench is what uses it. The soak
# (marked slow) is left out here to keep the whole script under 8 minutes; scripts/test.sh runs it.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

bench=1
if [ "${1:-}" = "--no-bench" ]; then bench=0; shift; fi
if [ "${1:-}" = "--" ]; then shift; fi

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "[gpu] no NVIDIA GPU visible (nvidia-smi -L failed); use scripts/test.sh on a CPU machine" >&2
  exit 1
fi

start=$(date +%s)
"$root/scripts/setup.sh"
"$root/.venv/bin/python" - <<'PY'
import torch

print(f"[gpu] torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
if not torch.cuda.is_available():
    raise SystemExit("[gpu] torch sees no CUDA device: this venv's torch is a CPU build or the driver is too old")
for index in range(torch.cuda.device_count()):
    props = torch.cuda.get_device_properties(index)
    print(f"[gpu] device {index}: {props.name}, {props.total_memory / 2**30:.0f} GiB")
PY

"$root/.venv/bin/python" -m pytest -q -m "not slow" "$@"
echo "[gpu] suite done after $(( $(date +%s) - start )) s"

if [ "$bench" = 1 ]; then
  "$root/.venv/bin/python" bench/run.py --quick --device cuda
  echo "[gpu] bench done after $(( $(date +%s) - start )) s; results in bench/results/run.{json,md,png}"
fi
