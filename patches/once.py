"""Warnings a user sees once per process, not once per step: a hook that meets the same odd input every model
call would otherwise flood the console."""

from __future__ import annotations

import logging
from typing import Set

_warned: Set[str] = set()


def warn_once(log: logging.Logger, message: str) -> None:
    """``log.warning(message)`` the first time this message is given, nothing afterwards."""
    if message not in _warned:
        _warned.add(message)
        log.warning(message)
