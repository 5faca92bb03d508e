"""The step caches users run, as bench peers of PatchLab's StepCache (not shipped in the pack).

One module per peer holds its decision and reuse rule in plain torch (no ComfyUI import), written from the
paper and the reference code each module cites:

* :mod:`.teacache`   TeaCache (Liu et al. 2024): accumulated, polynomial-rescaled relative L1 change of the
  timestep-modulated input of the first block;
* :mod:`.magcache`   MagCache (Ma et al. 2025): accumulated error of calibrated residual magnitude ratios, with
  its calibration run;
* :mod:`.fbcache`    First Block Cache (Comfy-WaveSpeed / ParaAttention): relative change of the first block's
  residual since the last full evaluation;
* :mod:`.taylorseer` TaylorSeer (Liu et al. 2025): full evaluations every N steps, Taylor forecasts between.

Every rule speaks one protocol (:class:`.common.Rule`), per run and per chunk of a model call:
``decide(step, steps, feature) -> bool`` (True: reuse), ``store(step, residual)`` after a full evaluation and
``reuse(step) -> residual``. :mod:`.binding` binds any rule to a cloned ComfyUI ModelPatcher (the block stack's
residual on Flux and Wan, its closest analogue on SD1.x UNets) and :mod:`.make` holds one ``make(model, name)``
factory per peer for a bench ``Variant``. Import those two only where ComfyUI is loaded.
"""
