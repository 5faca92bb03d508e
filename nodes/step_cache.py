"""(placeholder: filled by the issue that adds this family)"""

from __future__ import annotations

NODES = []
