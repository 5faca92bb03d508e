"""Face analysis for InstantID: insightface's antelopev2 models on onnxruntime.

The models live in ``models/insightface/models/antelopev2`` (registered with ComfyUI's
``folder_paths`` as ``insightface``). The folder is checked before insightface sees
it, so the usual mistakes (a nested ``antelopev2/antelopev2``, the buffalo_l pack, a
missing recognition model) get an explanation instead of an assert or a download
attempt. insightface and onnxruntime are imported only when a face node runs, so the
rest of PatchLab loads without them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

log = logging.getLogger(__name__)

DETECTOR = "scrfd_10g_bnkps.onnx"
RECOGNIZER = "glintr100.onnx"
PACK = "antelopev2"
BUFFALO_FILES = {"det_10g.onnx", "w600k_r50.onnx"}
PROVIDERS = {"CPU": "CPUExecutionProvider", "CUDA": "CUDAExecutionProvider", "ROCm": "ROCMExecutionProvider",
             "CoreML": "CoreMLExecutionProvider"}
# The face nodes' optional requirements, in PatchLab's folder under the name it has in ComfyUI/custom_nodes
# (not resolved: a symlinked folder keeps its name).
REQUIREMENTS = Path(__file__).absolute().parents[2] / "requirements-instantid.txt"


def install_hint() -> str:
    """How to install insightface and onnxruntime into ComfyUI's Python: plain pip, Windows portable, CUDA."""
    folder = REQUIREMENTS.parent.name
    return (
        "Install them into the Python that runs ComfyUI, then restart ComfyUI: "
        f"`python -m pip install -r ComfyUI/custom_nodes/{folder}/{REQUIREMENTS.name}` "
        "(or `python -m pip install insightface onnxruntime`); on the Windows portable build, run from the "
        "ComfyUI_windows_portable folder: "
        f"`python_embeded\\python.exe -m pip install -r ComfyUI\\custom_nodes\\{folder}\\{REQUIREMENTS.name}`. "
        "For the CUDA provider install `onnxruntime-gpu` instead of `onnxruntime` (not both)."
    )


def insightface_root() -> Path:
    """ComfyUI's ``models/insightface`` folder (the first registered path)."""
    import folder_paths

    return Path(folder_paths.get_folder_paths("insightface")[0])


def preflight(folder: Path, node_id: str) -> None:
    """Explain what is wrong with an antelopev2 folder, or return quietly."""
    onnx_files = {p.name for p in folder.glob("*.onnx")} if folder.is_dir() else set()
    expected = f"{folder} must contain {DETECTOR} and {RECOGNIZER} (unzip antelopev2.zip there)"
    if not folder.is_dir():
        raise RuntimeError(f"{node_id}: no face models: {folder} does not exist. Create it: {expected}.")
    nested = folder / PACK
    if not onnx_files and nested.is_dir() and any(nested.glob("*.onnx")):
        raise RuntimeError(f"{node_id}: the antelopev2 models are one folder too deep, in {nested}. Move the .onnx "
                           f"files up into {folder}.")
    if not onnx_files:
        raise RuntimeError(f"{node_id}: {folder} holds no .onnx model: {expected}.")
    if BUFFALO_FILES & onnx_files and RECOGNIZER not in onnx_files:
        raise RuntimeError(f"{node_id}: {folder} holds the buffalo_l face pack ({', '.join(sorted(onnx_files))}); "
                           f"InstantID was trained with antelopev2's models: {expected}.")
    if RECOGNIZER not in onnx_files:
        raise RuntimeError(f"{node_id}: the face recognition model {RECOGNIZER} is missing from {folder} (without it "
                           f"faces have no embedding): {expected}.")
    if DETECTOR not in onnx_files:
        raise RuntimeError(f"{node_id}: the face detector {DETECTOR} is missing from {folder}: {expected}.")


def require_insightface(node_id: str):
    try:
        import insightface.app
        import onnxruntime
    except ImportError as error:
        raise RuntimeError(f"{node_id} needs the insightface and onnxruntime packages, optional in PatchLab (only the "
                           f"InstantID face nodes use them), and they could not be imported: {str(error).rstrip('.')}. "
                           + install_hint()) from None
    return insightface.app, onnxruntime


@dataclass(eq=False)
class FaceAnalysis:
    """A prepared insightface FaceAnalysis (detection + recognition only)."""

    app: object
    provider: str

    def __deepcopy__(self, memo):
        return self


def load(provider: str, node_id: str, root: Optional[Path] = None) -> FaceAnalysis:
    if provider not in PROVIDERS:
        raise ValueError(f"{node_id}: provider must be one of {', '.join(PROVIDERS)}, got {provider!r}")
    app_module, onnxruntime = require_insightface(node_id)
    root = Path(root) if root is not None else insightface_root()
    preflight(root / "models" / PACK, node_id)
    available = onnxruntime.get_available_providers()
    if PROVIDERS[provider] not in available:
        raise RuntimeError(f"{node_id}: onnxruntime here has no {provider} support (available: "
                           f"{', '.join(available)}). Pick CPU, or install the onnxruntime build for {provider} "
                           "(onnxruntime-gpu for CUDA).")
    providers = [PROVIDERS[provider]] + (["CPUExecutionProvider"] if provider != "CPU" else [])
    app = app_module.FaceAnalysis(name=PACK, root=str(root), providers=providers,
                                  allowed_modules=["detection", "recognition"])
    app.prepare(ctx_id=0, det_size=(640, 640))
    return FaceAnalysis(app=app, provider=provider)


# --- faces --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Face:
    bbox: np.ndarray  # x1, y1, x2, y2 in pixels
    keypoints: np.ndarray  # [5, 2] eyes, nose, mouth corners
    embedding: np.ndarray  # [512]

    @property
    def area(self) -> float:
        return float(max(0.0, self.bbox[2] - self.bbox[0]) * max(0.0, self.bbox[3] - self.bbox[1]))


def to_bgr(image: torch.Tensor) -> np.ndarray:
    """One ComfyUI image [H, W, 3] float in [0, 1] RGB -> uint8 BGR, as insightface reads pictures."""
    rgb = (image[..., :3].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return np.ascontiguousarray(rgb[..., ::-1])


def detect(analysis: FaceAnalysis, image: torch.Tensor) -> List[Face]:
    """Every face in one image [H, W, 3], largest first."""
    found = analysis.app.get(to_bgr(image))
    faces = [Face(np.asarray(f.bbox, dtype=np.float32), np.asarray(f.kps, dtype=np.float32),
                  np.asarray(f.embedding, dtype=np.float32))
             for f in found if getattr(f, "embedding", None) is not None]
    return sorted(faces, key=lambda f: -f.area)


def pick(faces: List[Face], index: int, image_index: int, node_id: str) -> Optional[Face]:
    """The ``index``-th largest face, None when there is none; ValueError when the index is past the last face."""
    if not faces:
        return None
    if index >= len(faces):
        raise ValueError(f"{node_id}: face_index {index} asks for the {index + 1}th largest face of image "
                         f"{image_index}, which has {len(faces)}. Use a face_index below {len(faces)}.")
    return faces[index]
