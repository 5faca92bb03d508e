"""Charts drawn for preview nodes (Pillow and torch only, no ComfyUI import)."""
