"""PatchLab test kit: a ComfyUI custom-node folder of tiny stand-ins for checkpoints, text encoders and VAEs.

Linked into ``custom_nodes/`` next to the pack by the server harness and the demo;
never shipped with the pack.
"""

from .nodes import NODE_CLASS_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS"]
