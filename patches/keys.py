"""The keys PatchLab's techniques share, defined once.

Each is a key of a model call's ``transformer_options`` that one technique writes and others read,
or a marker attribute that tells one technique's hooks from another pack's. Keys only one module
uses stay in that module.
"""

from __future__ import annotations

# An extra model pass of PatchLab's attention guidance: the tuple of guidance specs whose rows the pass
# carries, one group of batch rows each (empty for SAG's pass). Every other technique leaves such passes
# alone: step caches never reuse or store in them, DeepCache runs them in full, guidance skipping passes
# them through, NAG guides them as the positive they are compared with.
GUIDANCE_PASS = "patchlab_guidance_pass"

# In an extra pass: a per-step number (TPG seeds its shuffles with it).
GUIDANCE_STEP = "patchlab_guidance_step"

# The model's attention-guidance specs (a tuple, one per node). Guidance skipping reads them: a step where
# SAG acts needs the negative prediction.
ATTENTION_SPECS = "patchlab_attention_guidance"

# Marker attributes on the hooks each technique registers: a hook that carries its technique's marker is
# not installed twice; any other hook at the same place is chained.
ATTENTION_MARK = "patchlab_attention"
NAG_MARK = "patchlab_nag"
STEP_CACHE_MARK = "patchlab_step_cache"
