"""Pure torch math behind the patches: no ComfyUI import, device- and dtype-agnostic."""
