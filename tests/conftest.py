"""Test session setup: a real ComfyUI imported in-process, PatchLab loaded as ComfyUI loads it.

ComfyUI comes from $COMFYUI_PATH or the checkout scripts/setup.sh provisions. The
pack is imported under the package name ``patchlab`` (relative imports work as in
ComfyUI's custom-node loader); ``devtools`` holds the harness.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
from devtools import bootstrap  # noqa: E402  (import_comfyui removes REPO_ROOT from sys.path again)

COMFYUI_ROOT = bootstrap.import_comfyui(cpu=True)
bootstrap.load_pack()


def pytest_report_header(config):
    return f"ComfyUI {bootstrap.comfyui_version(COMFYUI_ROOT)} at {COMFYUI_ROOT}"


@pytest.fixture(scope="session")
def core_nodes():
    """ComfyUI's node registry with the built-in extra nodes (the oracles) loaded."""
    bootstrap.load_core_nodes()
    import nodes

    return nodes.NODE_CLASS_MAPPINGS


@pytest.fixture(scope="session")
def tiny_model():
    """Factory of tiny real models, cached per arguments. Treat them as read-only: patch clones."""
    from devtools.testkit import tiny_models

    cache = {}

    def make(layout="sd15", seed=0, **kwargs):
        key = (layout, seed, tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = tiny_models.build_model(layout, seed=seed, **kwargs)
        return cache[key]

    return make
