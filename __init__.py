"""PatchLab: model patches for ComfyUI (sampling schedules, guidance, token merging, InstantID).

ComfyUI imports this folder as a package and reads NODE_CLASS_MAPPINGS (the V1 node
API; see docs/development.md, "Why the V1 node API"). The node classes import ComfyUI, so they are loaded
on first access: ``kernels/`` and ``viz/`` stay importable without ComfyUI.
"""

from __future__ import annotations

__version__ = "0.1.0"

# Served by ComfyUI under /extensions/<pack>/: docs/<node id>.md is each node's help page.
WEB_DIRECTORY = "./web"

_NODE_EXPORTS = ("NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS")


def __getattr__(name):
    if name in _NODE_EXPORTS:
        from . import nodes

        return getattr(nodes, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_NODE_EXPORTS)
