"""PatchLab test kit: a ComfyUI custom-node folder of tiny stand-ins for checkpoints, text encoders and VAEs.

Linked into ``custom_nodes/`` next to the pack by the server harness and the demo;
never shipped with the pack. Its nodes import ComfyUI, so they load on first access.
"""


def __getattr__(name):
    if name == "NODE_CLASS_MAPPINGS":
        from .nodes import NODE_CLASS_MAPPINGS

        return NODE_CLASS_MAPPINGS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
