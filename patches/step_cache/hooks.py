"""StepCache's hooks: the wrappers of one evaluation (mark it, tag its main pass, decide in the model call) and the
first-block hooks of the ``first block`` indicator (spec-free: they act only through the call's ``_Call``)."""

from __future__ import annotations

from typing import Dict, List, Optional

import torch

from .. import block_forward, keys, run
from .state import CALL_KEY, MAIN_KEY, MARKER_KEY, STATE_KEY, _Call, _Reuse


def _rows_of(value, index: torch.Tensor, rows: int):
    """``value`` cut to the rows ``index`` where it has one row per row of the call (tensors with ``rows`` rows, in
    dicts, lists and tuples: the conditioning, ControlNet outputs); everything else as it is."""
    if torch.is_tensor(value):
        return value.index_select(0, index.to(value.device)) if value.ndim and value.shape[0] == rows else value
    if isinstance(value, dict):
        return {key: _rows_of(item, index, rows) for key, item in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_rows_of(item, index, rows) for item in value)
    return value


def _call_rows(args, kwargs, index: torch.Tensor, rows: int):
    """The APPLY_MODEL arguments of a call over the rows ``index`` only (``transformer_options``: a shallow copy with
    its per-row tensors, such as ``sigmas``, cut)."""
    def cut(value):
        if isinstance(value, dict) and ("cond_or_uncond" in value or "sigmas" in value):  # transformer_options
            return {key: _rows_of(item, index, rows) if torch.is_tensor(item) else item for key, item in value.items()}
        return _rows_of(value, index, rows)

    return [cut(arg) for arg in args], {key: cut(value) for key, value in kwargs.items()}


def transformer_options_of(args, kwargs) -> Optional[Dict]:
    """The ``transformer_options`` dict of a network call's arguments (keyword, else the last dict passed), or None."""
    options = kwargs.get("transformer_options")
    if isinstance(options, dict):
        return options
    for arg in reversed(args):
        if isinstance(arg, dict):
            return arg
    return None


def predict_noise_wrapper(executor, x, timestep, model_options=None, seed=None, *args, **kwargs):
    state = run.of(model_options, STATE_KEY)
    if state is not None:
        model_options = run.mark_main_pass(model_options, MARKER_KEY, x, state.next_step())
    return executor(x, timestep, model_options, seed, *args, **kwargs)


def calc_cond_batch_wrapper(executor, *args, **kwargs):
    args = list(args)
    model_options = args[-1] if args and isinstance(args[-1], dict) else kwargs.get("model_options", {})
    transformer_options = model_options.get("transformer_options", {})
    state = transformer_options.get(STATE_KEY)
    if state is None or transformer_options.get(keys.GUIDANCE_PASS) is not None or len(args) < 3:
        return executor(*args, **kwargs)
    marker = run.take_main_pass(model_options, MARKER_KEY, args[2])
    if marker is None:
        return executor(*args, **kwargs)
    tagged = dict(model_options)
    tagged["transformer_options"] = {**transformer_options, MAIN_KEY: marker.step}
    if isinstance(args[-1], dict):
        args[-1] = tagged
    else:
        kwargs["model_options"] = tagged
    return executor(*args, **kwargs)


def apply_model_wrapper(executor, *args, **kwargs):
    """APPLY_MODEL: ``(x, t, c_concat, c_crossattn, control, transformer_options)`` -> denoised [B, C, ...]."""
    transformer_options = transformer_options_of(args, kwargs)
    state = transformer_options.get(STATE_KEY) if transformer_options is not None else None
    if state is None:
        return executor(*args, **kwargs)
    x = args[0] if args else kwargs.get("x")
    sigma = args[1] if len(args) > 1 else kwargs.get("t")
    step = transformer_options.get(MAIN_KEY)
    if step is None or not torch.is_tensor(x) or x.ndim < 3 or transformer_options.get(keys.GUIDANCE_PASS) is not None:
        if torch.is_tensor(x):
            state.count_extra(int(x.shape[0]))
        return executor(*args, **kwargs)
    call = _Call(state, x, sigma, transformer_options, getattr(executor.class_obj, "model_sampling", None))
    scaled = None
    if state.spec.indicator == "input" and call.valid and call.sigma is not None:
        scaled = call.scaled_inputs()
        reusing = call.items_reusing(scaled) if call.eligible() else None
        if reusing is not None and all(reusing):
            state.count(step, True, int(x.shape[0]))
            return call.reuse()
        if reusing is not None and any(reusing):
            return _evaluate_some(executor, args, kwargs, call, reusing, scaled, step)
    if state.spec.indicator == "first block":
        transformer_options[CALL_KEY] = call
    try:
        output = executor(*args, **kwargs)
    except _Reuse as reuse:
        if reuse.call is not call:
            raise
        state.count(step, True, int(x.shape[0]))
        return call.reuse()
    finally:
        if transformer_options.get(CALL_KEY) is call:
            transformer_options.pop(CALL_KEY, None)
    state.count(step, False, int(x.shape[0]))
    if call.sigma is not None:
        call.store(x, output, scaled)
    return output


def _evaluate_some(executor, args, kwargs, call: _Call, reusing: List[bool], scaled: List[torch.Tensor],
                   step: int) -> torch.Tensor:
    """A call where some batch items reuse: the others are evaluated in one model call over their rows."""
    x = args[0] if args else kwargs["x"]
    rows = int(x.shape[0])
    index = torch.tensor([chunk * call.rows + item for chunk in range(len(call.pieces))
                          for item in range(call.rows) if not reusing[item]], device=x.device)
    sub_args, sub_kwargs = _call_rows(args, kwargs, index, rows)
    output = executor(*sub_args, **sub_kwargs)
    denoised = call.reuse(reusing)
    denoised = denoised.index_copy(0, index, output.to(denoised.dtype))
    call.store(x, denoised, scaled, evaluated=[not r for r in reusing])
    call.state.count(step, False, int(index.numel()))
    call.state.count(step, True, rows - int(index.numel()))
    return denoised


def unet_input_block_patch(h, transformer_options):
    """input_block_patch: remember the stem conv's output, hand input block 1's residual to the call."""
    call = transformer_options.get(CALL_KEY)
    if call is None:
        return h
    block = transformer_options.get("block")
    if block == ("input", 0):
        call.stem = h
    elif block == ("input", 1):
        stem, call.stem = call.stem, None
        call.first_block(h - stem if stem is not None and stem.shape == h.shape else h)
    return h


setattr(unet_input_block_patch, keys.STEP_CACHE_MARK, True)


def dit_first_block(previous=None):
    """A ("double_block", 0) replace: run the block (or the replace already there), hand its residual to the call."""
    def replace(args, extra):
        out = block_forward.run_block(previous, args, extra)
        options = args.get("transformer_options")
        call = options.get(CALL_KEY) if isinstance(options, dict) else None
        if call is not None and torch.is_tensor(out.get("img")) and out["img"].shape == args["img"].shape:
            call.first_block(out["img"] - args["img"])
        return out

    setattr(replace, keys.STEP_CACHE_MARK, True)
    return replace
