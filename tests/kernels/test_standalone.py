"""kernels/ and viz/ load without ComfyUI (the root package imports its nodes lazily)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SCRIPT = f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("patchlab", {str(REPO / '__init__.py')!r},
                                              submodule_search_locations=[{str(REPO)!r}])
pack = importlib.util.module_from_spec(spec)
sys.modules["patchlab"] = pack
spec.loader.exec_module(pack)
import patchlab.kernels.sigma_schedules, patchlab.viz.sigma_plot
print(sorted(m for m in sys.modules if m == "comfy" or m.startswith("comfy.")))
"""


def test_kernels_and_viz_import_without_comfyui():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, cwd="/", check=True)
    assert result.stdout.strip() == "[]"
