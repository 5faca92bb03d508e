"""InstantID (Wang et al. 2024, arXiv 2401.07519): the face adapter (:mod:`.adapter`: weights, face tokens, the
attention patch, the ControlNet) and the face analysis that feeds it (:mod:`.face_analysis`: insightface's
antelopev2 on onnxruntime, optional packages)."""

from __future__ import annotations

from . import face_analysis
from .adapter import (
    FaceTokens,
    InstantIDWeights,
    combine_embeddings,
    cross_attention_layers,
    face_tokens,
    load_weights,
    with_controlnet,
    with_face_attention,
)

__all__ = ["FaceTokens", "InstantIDWeights", "combine_embeddings", "cross_attention_layers", "face_analysis",
           "face_tokens", "load_weights", "with_controlnet", "with_face_attention"]
