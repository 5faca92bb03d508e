"""Hooks and ComfyUI objects bound to cloned ModelPatchers.

The only layer that knows ComfyUI's hook signatures; the math lives in ``kernels``. Shared
knowledge is written once: ``families`` (the DiT family table), ``unet`` (a UNet's anatomy),
``block_forward`` (reaching a DiT's blocks and attention calls), ``run`` (the run-state
protocol), ``keys`` (the keys techniques share). A technique that spans several files is a
package (``nag``, ``attention_guidance``, ``step_cache``, ``instantid``); the map is in
``docs/development.md``, "Who owns what in patches/".
"""
