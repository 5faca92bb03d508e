"""Text on a node in ComfyUI's graph editor: what a node did, shown where the user looks.

ComfyUI (0.3.75 and newer) has ``PromptServer.instance.send_progress_text(text, node_id,
sid)``: a binary websocket message (type 3: the node id's length as a 4-byte big-endian
integer, the node id, the UTF-8 text) that the editor draws on the node with that id.
A node learns its id from the hidden ``UNIQUE_ID`` input.

``show`` is silent where no server runs (scripts, in-process tests: no ``server``
module, or one without an instance), where the node id is unknown, and where the
running ComfyUI has no progress text; a failure to send never fails the run.
"""

from __future__ import annotations

import functools
import logging
import sys
from typing import Optional

from . import once

log = logging.getLogger(__name__)
_warn_once = functools.partial(once.warn_once, log)


def show(node: Optional[str], text: str) -> bool:
    """Show ``text`` on graph node ``node`` (its UNIQUE_ID) to the client that queued the prompt.

    Returns whether a message was handed to the server.
    """
    if not node:
        return False
    prompt_server = getattr(sys.modules.get("server"), "PromptServer", None)
    instance = getattr(prompt_server, "instance", None)
    send = getattr(instance, "send_progress_text", None)
    if send is None:
        return False
    try:
        send(text, str(node), getattr(instance, "client_id", None))
    except Exception as error:  # noqa: BLE001 - the editor's text must never fail a finished run
        _warn_once(f"PatchLab could not show a node's summary in the editor ({error}); it is in the log")
        return False
    return True


def fewer(total: int, run: int) -> str:
    """``"2.2x fewer"``: how many times fewer evaluations ran than a run without the node."""
    if run <= 0:
        return "none ran" if total else "nothing to run"
    return f"{total / run:.1f}x fewer"
