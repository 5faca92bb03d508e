"""Test-only InstantID assets: tiny ONNX face models, face pictures, random InstantID weights.

* A detector with SCRFD's output layout (9 outputs: scores, box distances and 5
  keypoints at strides 8/16/32, two anchors per cell) that reports a face where the
  picture is bright: insightface's own loader classifies it as detection and runs its
  real decoding, NMS and keypoint path on it.
* A 112x112 -> 512 recognizer (ArcFace's interface) whose embedding is a fixed linear
  map of the face crop's mean colour, so faces of different colours differ.
* Random InstantID weights with the real key names and shapes (``image_proj`` Resampler,
  ``ip_adapter`` to_k_ip/to_v_ip for the cross-attention layers of the given model).

Needs the ``onnx`` package (a test dependency).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, Optional, Tuple

import numpy as np
import torch

DETECTOR = "scrfd_10g_bnkps.onnx"
RECOGNIZER = "glintr100.onnx"
# keypoints of the reported face, in units of the detection stride (32): eyes, nose, mouth corners
KEYPOINTS = [(-0.6, -0.5), (0.6, -0.5), (0.0, 0.1), (-0.5, 0.8), (0.5, 0.8)]


def _save(model, path: Path) -> None:
    import onnx

    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def write_detector(path: Path) -> Path:
    """An SCRFD-shaped detector: faces are the bright 3x3-cell areas of the stride-32 grid."""
    from onnx import TensorProto, helper, numpy_helper

    def const(name, value):
        return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)

    nodes = [helper.make_node("ReduceMean", ["input.1"], ["gray"], axes=[1], keepdims=1)]
    initializers = [const("threshold", 0.5), const("gain", 10.0), const("zero", 0.0),
                    const("box", [[2.0, 2.0, 2.0, 2.0]]), const("kps", [[c for p in KEYPOINTS for c in p]]),
                    numpy_helper.from_array(np.asarray([-1, 1], dtype=np.int64), "column")]
    outputs = {"score": [], "bbox": [], "kps": []}
    for stride in (8, 16, 32):
        s = str(stride)
        nodes.append(helper.make_node("AveragePool", ["gray"], ["pool" + s], kernel_shape=[stride, stride],
                                      strides=[stride, stride]))
        if stride == 32:
            nodes += [
                helper.make_node("AveragePool", ["pool" + s], ["smooth" + s], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                                 count_include_pad=1),
                helper.make_node("Sub", ["smooth" + s, "threshold"], ["centred" + s]),
                helper.make_node("Mul", ["centred" + s, "gain"], ["logit" + s]),
                helper.make_node("Sigmoid", ["logit" + s], ["prob" + s]),
            ]
        else:
            nodes.append(helper.make_node("Mul", ["pool" + s, "zero"], ["prob" + s]))
        nodes += [
            helper.make_node("Transpose", ["prob" + s], ["cells" + s], perm=[0, 2, 3, 1]),
            helper.make_node("Concat", ["cells" + s, "cells" + s], ["anchors" + s], axis=3),
            helper.make_node("Reshape", ["anchors" + s, "column"], ["score_" + s]),
            helper.make_node("Mul", ["score_" + s, "zero"], ["nil" + s]),
            helper.make_node("Add", ["nil" + s, "box"], ["bbox_" + s]),
            helper.make_node("Add", ["nil" + s, "kps"], ["kps_" + s]),
        ]
        for kind, width in (("score", 1), ("bbox", 4), ("kps", 10)):
            outputs[kind].append(helper.make_tensor_value_info(f"{kind}_{s}", TensorProto.FLOAT, [None, width]))
    graph = helper.make_graph(
        nodes, "tiny_scrfd",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "height", "width"])],
        outputs["score"] + outputs["bbox"] + outputs["kps"], initializers)
    _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return path


def write_recognizer(path: Path, seed: int = 0) -> Path:
    """An ArcFace-shaped recognizer [1, 3, 112, 112] -> [1, 512]: a fixed map of the crop's mean colour."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weight = numpy_helper.from_array(rng.standard_normal((3, 512)).astype(np.float32) * 10, "weight")
    bias = numpy_helper.from_array(rng.standard_normal(512).astype(np.float32), "bias")
    nodes = [
        helper.make_node("GlobalAveragePool", ["input.1"], ["colour"], name="colour"),
        helper.make_node("Flatten", ["colour"], ["flat"], name="flat"),
        helper.make_node("MatMul", ["flat", "weight"], ["projected"], name="projected"),
        helper.make_node("Add", ["projected", "bias"], ["embedding"], name="embedding"),
    ]
    graph = helper.make_graph(
        nodes, "tiny_arcface", [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, 112, 112])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [1, 512])], [weight, bias])
    _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return path


def write_antelopev2(insightface_root: Path) -> Path:
    """``<root>/models/antelopev2`` with the tiny detector and recognizer under the real file names."""
    folder = Path(insightface_root) / "models" / "antelopev2"
    write_detector(folder / DETECTOR)
    write_recognizer(folder / RECOGNIZER)
    return folder


def face_picture(size: Tuple[int, int] = (256, 256),
                 faces: Iterable[Tuple[int, int, int, Tuple[float, float, float]]] = ((64, 64, 128, (1.0, 0.8, 0.6)),),
                 background: Tuple[float, float, float] = (0.0, 0.0, 0.0)) -> torch.Tensor:
    """A ComfyUI IMAGE [1, H, W, 3] with a bright square (x, y, side, rgb) per 'face'."""
    height, width = size
    image = torch.tensor(background, dtype=torch.float32).expand(1, height, width, 3).clone()
    for x, y, side, colour in faces:
        image[0, y:y + side, x:x + side] = torch.tensor(colour)
    return image


def instantid_state_dict(model, seed: int = 0, dim: int = 64, depth: int = 2, embedding_dim: int = 512,
                         output_dim: Optional[int] = None, num_queries: int = 16, ip_layers: Optional[int] = None
                         ) -> Dict[str, Dict[str, torch.Tensor]]:
    """Random InstantID weights with the real key names; ip_adapter shapes follow ``model``'s cross-attention.

    The face tokens are as wide as the model's text context (2048 for SDXL), as the
    ControlNet reads them as its context. ``dim=1280, depth=4, output_dim=2048`` gives
    the released Resampler's exact shapes (about 85M values).
    """
    if output_dim is None:
        output_dim = model.model.model_config.unet_config["context_dim"]
    from patchlab.kernels.resampler import ResamplerShape
    from patchlab.patches import instantid

    generator = torch.Generator().manual_seed(seed)
    shape = ResamplerShape(dim=dim, depth=depth, inner=dim, num_queries=num_queries, embedding_dim=embedding_dim,
                           output_dim=output_dim, ff_dim=4 * dim)
    image_proj = {}
    for key, tensor_shape in shape.expected().items():
        if key.endswith(".weight") and len(tensor_shape) == 1:  # LayerNorm scales
            image_proj[key] = torch.ones(tensor_shape)
        elif key.endswith("bias"):
            image_proj[key] = torch.zeros(tensor_shape)
        else:
            fan_in = tensor_shape[-1]
            image_proj[key] = torch.randn(tensor_shape, generator=generator) / fan_in ** 0.5
    widths = [layer.width for layer in instantid.cross_attention_layers(model)]
    widths = widths if ip_layers is None else (widths * ip_layers)[:ip_layers]
    ip_adapter = {}
    for n, width in enumerate(widths):
        for name in ("to_k_ip", "to_v_ip"):
            ip_adapter[f"{2 * n + 1}.{name}.weight"] = torch.randn(width, output_dim, generator=generator) * 0.05
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def save_instantid(state_dict: Dict[str, Dict[str, torch.Tensor]], path: Path) -> Path:
    """Write InstantID weights as the release's torch pickle (.bin) or a prefixed .safetensors."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        flat = {f"{group}.{k}": v.contiguous() for group, tensors in state_dict.items() for k, v in tensors.items()}
        save_file(flat, str(path))
    else:
        torch.save(state_dict, str(path))
    return path
