"""Speed node: DeepCache (reuse a UNet's deep features between steps)."""

from __future__ import annotations

from ..patches import deep_cache as dc
from ._common import HIDDEN_NODE_ID, WindowPatchNode, category, check_window, int_input


class DeepCache(WindowPatchNode):
    NODE_ID = "PatchLab_DeepCache"
    DISPLAY_NAME = "DeepCache (PatchLab)"
    DESCRIPTION = (
        "DeepCache (Ma et al. 2024, arXiv 2312.00858): a UNet evaluates in full only every interval-th step; on the "
        "steps in between only its shallow input and output blocks run, and the deep features of the last full "
        "step are reused at the skip connection chosen by depth (the paper reports 2.3x on SD1.5). Safe to reuse "
        "across runs, latent sizes, batch sizes and samplers; extra guidance passes (PAG, SEG, SAG) always run in "
        "full. UNet models (SD1.x, SD2.x, SDXL); DiTs such as Flux get a clear error (use Step Cache there)."
    )
    CATEGORY = category("speed")
    WHAT = "caching"
    OPTIONS = {
        "interval": int_input(3, 1, 20, (
            "One full evaluation every this many steps; the others reuse the deep features. 1 disables it (every "
            "step in full). 3 is the reference code's recommended value (about 2x faster at 20 steps); 5 is "
            "faster with softer details."), step=1),
        "depth": int_input(0, 0, 11, (
            "The skip branch the cache sits at (the paper's cache_branch_id): how many input blocks after the "
            "first convolution still run on a cached step. 0 (the reference default) is the fastest; higher "
            "keeps more detail and saves less. SD1.x/SD2.x allow 0-11, SDXL 0-8."), step=1),
    }
    HIDDEN_INPUTS = HIDDEN_NODE_ID

    @classmethod
    def VALIDATE_INPUTS(cls, interval=None, depth=None, start_percent=None, end_percent=None):
        return check_window(cls, start_percent, end_percent, interval=interval, depth=depth)

    def patch(self, model, interval, depth, start_percent, end_percent, unique_id=None):
        window = self.window(model, start_percent, end_percent)
        return (dc.with_deep_cache(model, self.NODE_ID, interval, depth, window, unique_id),)


NODES = [DeepCache]
