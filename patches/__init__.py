"""Hooks and ComfyUI objects bound to cloned ModelPatchers.

The only layer that knows ComfyUI's hook signatures; the math lives in ``kernels``.
"""
