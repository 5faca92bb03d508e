"""Recognising the functions ComfyUI's own nodes (``comfy_extras``) put on a model, to compose with them."""

from __future__ import annotations

import re


def made_by(fn, module: str, node_class: str) -> bool:
    """Whether ``fn`` was defined by the core node ``node_class`` of ``comfy_extras/<module>.py``.

    ComfyUI names the module by how it loaded the file (``comfy_extras.nodes_sag`` or a path),
    so only its last component is compared; the qualified name starts with the node's class.
    """
    name = str(getattr(fn, "__module__", "") or "")
    return (re.split(r"[./\\]", name)[-1] == module
            and str(getattr(fn, "__qualname__", "")).startswith(node_class + "."))
