"""Import a real ComfyUI in this process, and load PatchLab the way ComfyUI does.

Used by the test suite, the benchmarks and the demo. Nothing here mocks ComfyUI:
it puts the ComfyUI checkout on ``sys.path``, forces the CPU unless asked otherwise,
and imports ComfyUI's own modules.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

REPO_ROOT = Path(__file__).resolve().parent.parent
PACK_NAME = "patchlab"
# The ComfyUI scripts/setup.sh provisions: the oldest the pack supports, and the one the
# example workflow files are generated against (core nodes' schemas change between releases).
BASELINE_VERSION = "0.3.75"


def comfyui_root() -> Path:
    """The ComfyUI checkout to use: ``$COMFYUI_PATH``, else the one scripts/setup.sh provisions."""
    configured = os.environ.get("COMFYUI_PATH")
    root = Path(configured).expanduser().resolve() if configured else REPO_ROOT / ".comfyui" / "ComfyUI"
    if not (root / "main.py").is_file() or not (root / "comfy").is_dir():
        where = f"COMFYUI_PATH={configured}" if configured else str(root)
        raise RuntimeError(
            f"No ComfyUI checkout at {where}. Run scripts/setup.sh to provision ComfyUI 0.3.75, "
            "or point COMFYUI_PATH at a ComfyUI folder (the one holding main.py)."
        )
    return root


def comfyui_version(root: Path) -> str:
    text = (root / "comfyui_version.py").read_text()
    return text.split('__version__ = "', 1)[1].split('"', 1)[0] if '__version__ = "' in text else "unknown"


def import_comfyui(cpu: bool = True) -> Path:
    """Make ComfyUI importable (``import comfy``, ``import nodes``) and configure it.

    ComfyUI's root goes first on sys.path and this repository's root is removed from
    it, so ``nodes`` means ComfyUI's nodes.py and not PatchLab's ``nodes/`` folder.
    Command-line parsing is disabled; ``cpu`` selects ComfyUI's --cpu mode. Idempotent.
    """
    root = comfyui_root()
    repo = str(REPO_ROOT)
    sys.path[:] = [p for p in sys.path if p not in ("", ".", repo) and os.path.abspath(p) != repo]
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    if cpu:
        comfy.cli_args.args.cpu = True
    if (root / "utils" / "__init__.py").is_file():
        # nodes.py puts comfy/ first on sys.path, after which `import utils` would find
        # comfy/utils.py; main.py imports ComfyUI's utils package before that, so do we.
        import utils  # noqa: F401
    return root


_core_nodes_loaded = False


def load_core_nodes() -> None:
    """Register ComfyUI's built-in extra nodes (comfy_extras), the oracles for parity tests."""
    global _core_nodes_loaded
    if _core_nodes_loaded:
        return
    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    _core_nodes_loaded = True


def load_package(name: str, path: Path) -> ModuleType:
    """Import the package at ``path`` under ``name``, as ComfyUI's custom-node loader does."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path / "__init__.py", submodule_search_locations=[str(path)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def load_pack() -> ModuleType:
    """The PatchLab package, imported from this repository under the name ``patchlab``."""
    return load_package(PACK_NAME, REPO_ROOT)
