"""Development tools for PatchLab (not shipped): ComfyUI bootstrap, server harness, workflow conversion, test kit."""
