"""PatchLab installed without InstantID's optional packages (insightface, onnxruntime).

The pack is loaded in a subprocess whose import system cannot find those packages, as if they were not
installed (this session has them, for the InstantID tests). The subprocess writes what it saw as JSON.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from devtools import checks
from devtools.sampling import sample

REPO_ROOT = Path(__file__).resolve().parents[2]
NODES = sys.modules["patchlab"].NODE_CLASS_MAPPINGS
FACE_NODE = "PatchLab_InstantIDFaceAnalysis"
FACE_PACKAGES = {"insightface", "onnxruntime"}
INTERVAL = {"start_percent": 0.25, "end_percent": 0.75}

SCRIPT = r"""
import importlib.util, json, sys

repo, out, blocked, interval = sys.argv[1], sys.argv[2], set(sys.argv[3].split(",")), json.loads(sys.argv[4])


class Hidden:
    # A meta-path finder as it was, except that it finds none of the blocked packages: `import insightface`
    # raises ModuleNotFoundError and importlib.util.find_spec("insightface") is None, as without the package.
    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in blocked or not hasattr(self.finder, "find_spec"):
            return None
        return self.finder.find_spec(name, path, target)

    def __getattr__(self, attr):
        return getattr(self.finder, attr)


sys.meta_path[:] = [Hidden(finder) for finder in sys.meta_path]
sys.path.insert(0, repo)
from devtools import bootstrap

bootstrap.import_comfyui(cpu=True)
nodes = bootstrap.load_pack().NODE_CLASS_MAPPINGS
from devtools import checks
from devtools.sampling import sample
from devtools.testkit import tiny_models

result = {"nodes": sorted(nodes)}
if "sample" in sys.argv[5:]:
    (patched,) = checks.run_node(nodes["PatchLab_GuidanceInterval"], model=tiny_models.build_model("sd15"), **interval)
    result["sample"] = sample(patched, "sd15", steps=4).flatten().tolist()
try:
    checks.run_node(nodes["PatchLab_InstantIDFaceAnalysis"], provider="CPU")
except Exception as error:
    result["error"] = {"type": type(error).__name__, "message": str(error)}
result["findable"] = sorted(name for name in blocked if importlib.util.find_spec(name) is not None)
result["imported"] = sorted(name for name in sys.modules if name.partition(".")[0] in blocked)
with open(out, "w") as file:
    json.dump(result, file)
"""


def run_without(packages, workdir: Path, *flags: str) -> dict:
    """Load the pack in a fresh Python where ``packages`` cannot be imported; what it saw (see SCRIPT)."""
    out = workdir / "result.json"
    command = [sys.executable, "-c", SCRIPT, str(REPO_ROOT), str(out), ",".join(sorted(packages)),
               json.dumps(INTERVAL), *flags]
    process = subprocess.run(command, capture_output=True, text=True, cwd=workdir, timeout=600)
    assert process.returncode == 0, process.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def without_both(tmp_path_factory):
    return run_without(FACE_PACKAGES, tmp_path_factory.mktemp("without_both"), "sample")


@pytest.fixture(scope="module")
def without_onnxruntime(tmp_path_factory):
    """insightface's own requirements do not include onnxruntime: a pip install of insightface alone."""
    return run_without({"onnxruntime"}, tmp_path_factory.mktemp("without_onnxruntime"))


@pytest.fixture(params=["without_both", "without_onnxruntime"])
def without(request):
    return request.getfixturevalue(request.param)


def requirements(path: Path) -> list:
    """The requirements a requirements file lists, comments and blank lines left out."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def names(specs) -> set:
    return {re.match(r"[A-Za-z0-9._-]+", spec).group(0).lower() for spec in specs}


def pyproject() -> dict:
    return pytest.importorskip("tomllib").loads((REPO_ROOT / "pyproject.toml").read_text())["project"]


# --- the subprocess ------------------------------------------------------------------------------------------------

def test_the_subprocess_really_lacks_the_face_packages(without_both):
    assert without_both["findable"] == [] and without_both["imported"] == []


# --- the pack without them -----------------------------------------------------------------------------------------

def test_the_pack_registers_every_node_without_insightface(without_both):
    assert without_both["nodes"] == sorted(NODES)
    assert FACE_NODE in without_both["nodes"]


def test_a_node_outside_instantid_samples_as_with_insightface(without_both, tiny_model):
    (patched,) = checks.run_node(NODES["PatchLab_GuidanceInterval"], model=tiny_model("sd15"), **INTERVAL)
    expected = sample(patched, "sd15", steps=4)
    torch.testing.assert_close(torch.tensor(without_both["sample"]), expected.flatten(), rtol=1e-5, atol=1e-5)


def test_the_face_node_raises_one_runtime_error_naming_itself(without):
    assert without["error"]["type"] == "RuntimeError"
    assert without["error"]["message"].startswith(f"{FACE_NODE} needs the insightface and onnxruntime packages")


@pytest.mark.parametrize("command", [
    "`python -m pip install -r ComfyUI/custom_nodes/{folder}/requirements-instantid.txt`",
    "`python -m pip install insightface onnxruntime`",
    "from the ComfyUI_windows_portable folder: "
    "`python_embeded\\python.exe -m pip install -r ComfyUI\\custom_nodes\\{folder}\\requirements-instantid.txt`",
    "`onnxruntime-gpu` instead of `onnxruntime`",
], ids=["pip", "pip-packages", "windows-portable", "cuda"])
def test_the_face_error_gives_the_install_command(without, command):
    assert command.format(folder=REPO_ROOT.name) in without["error"]["message"]


# --- the requirements files ----------------------------------------------------------------------------------------

def test_requirements_txt_installs_no_face_package():
    assert not names(requirements(REPO_ROOT / "requirements.txt")) & FACE_PACKAGES


def test_requirements_instantid_txt_names_both_face_packages():
    assert names(requirements(REPO_ROOT / "requirements-instantid.txt")) == FACE_PACKAGES


def test_pyproject_has_no_dependencies():
    assert pyproject()["dependencies"] == []


def test_pyproject_instantid_extra_is_requirements_instantid_txt():
    assert sorted(pyproject()["optional-dependencies"]["instantid"]) == sorted(
        requirements(REPO_ROOT / "requirements-instantid.txt"))
