"""InstantID nodes: model and face-model loaders, keypoints, the attention patch and the apply nodes."""

from __future__ import annotations

import logging
import os
from typing import List, Optional, Tuple

import torch

from ..patches import instantid as iid
from ..patches.instantid import face_analysis as fa
from ..patches.window import SigmaWindow
from ..viz import keypoints as kp
from ._common import (
    MODEL_INPUT,
    category,
    check_percents,
    check_ranges,
    combo_input,
    first_error,
    float_input,
    int_input,
    percent_input,
)

log = logging.getLogger(__name__)
CATEGORY = category("InstantID")
INSTANTID = "PATCHLAB_INSTANTID"
FACEANALYSIS = "PATCHLAB_FACEANALYSIS"
FACE_EMBEDS = "PATCHLAB_FACE_EMBEDS"
COMBINE = ["average", "norm average", "concat"]
# ComfyUI folder name -> the file extensions it lists ("insightface" holds folders, no files).
MODEL_FOLDERS = {"instantid": {".bin", ".safetensors"}, "insightface": set()}


def register_model_folders() -> None:
    """models/instantid (InstantID weights) and models/insightface (face models) for ComfyUI's folder_paths."""
    import folder_paths

    for name, extensions in MODEL_FOLDERS.items():
        if name not in folder_paths.folder_names_and_paths:
            folder_paths.folder_names_and_paths[name] = ([os.path.join(folder_paths.models_dir, name)], set(extensions))


register_model_folders()


# --- shared inputs and steps --------------------------------------------------------------------

START = percent_input(0.0, "Where in the schedule the face identity starts to act (0 = first step).")
END = percent_input(1.0, "Where it stops (1 = last step). Ending around 0.8-0.9 frees the last steps for detail.")
INSTANTID_INPUT = (INSTANTID, {"tooltip": "From Load InstantID Model."})
FACEANALYSIS_INPUT = (FACEANALYSIS, {"tooltip": "From InstantID Face Analysis."})
CONTROL_NET = ("CONTROL_NET", {"tooltip": "The InstantID ControlNet, from Load ControlNet Model."})
POSITIVE = ("CONDITIONING", {"tooltip": "Prompt conditioning."})
NEGATIVE = ("CONDITIONING", {"tooltip": "Negative prompt conditioning."})
CN_STRENGTH = float_input(0.8, 0.0, 10.0, 0.01, "ControlNet strength. 0 disables it; 0.4-0.8 typical.")
FACE_INDEX = int_input(0, 0, 99, "Which face of each reference image: 0 the largest, 1 the next largest, ...")
ON_NO_FACE = combo_input(["error", "pass through"], "error", (
    "When a reference image shows no face: error stops with the image's index; pass through returns the model (and "
    "conditioning) unchanged with a warning, for unattended batch jobs."))
MASK = ("MASK", {"tooltip": "Optional: where the face identity applies (1) or not (0); it only scales the face "
                            "attention, the prompt still acts everywhere."})
IMAGE_KPS = ("IMAGE", {"tooltip": "Optional: an image whose face keypoints guide the pose (default: the reference "
                                  "image's)."})


def noise_input(default: float):
    """The noise of the negative face embedding (the apply nodes differ only in its default)."""
    return float_input(default, 0.0, 1.0, 0.05, (
        "Noise in the negative face embedding instead of zeros; a little (0.2-0.4) often helps against burn. 0 uses "
        "zeros."))


def reference_faces(analysis, image: torch.Tensor, face_index: int, on_no_face: str,
                    node_id: str) -> List[Tuple[int, fa.Face]]:
    """(image index, face) per reference image; images without a face raise (error) or are skipped with a warning."""
    faces = []
    for i in range(image.shape[0]):
        face = fa.pick(fa.detect(analysis, image[i]), face_index, i, node_id)
        if face is None:
            if on_no_face == "error":
                raise ValueError(f"{node_id}: no face found in reference image {i} (of {image.shape[0]}). Use a "
                                 "clearer, larger or more frontal face, or set on_no_face to 'pass through'.")
            log.warning("%s: no face found in reference image %d; it is skipped", node_id, i)
            continue
        faces.append((i, face))
    return faces


def embeddings(faces: List[Tuple[int, fa.Face]]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(face.embedding) for _, face in faces])


def keypoint_image(analysis, reference: fa.Face, reference_image: torch.Tensor, image_kps: Optional[torch.Tensor],
                   face_index: int, node_id: str) -> torch.Tensor:
    """[1, H, W, 3] keypoints drawing: from ``image_kps``' face if given, else from the reference face."""
    if image_kps is None:
        height, width = reference_image.shape[:2]
        return kp.draw(reference.keypoints, width, height)[None]
    face = fa.pick(fa.detect(analysis, image_kps[0]), face_index, 0, node_id)
    if face is None:
        raise ValueError(f"{node_id}: no face found in image_kps (image 0); give an image with a visible face or "
                         "leave image_kps unconnected to use the reference's keypoints.")
    return kp.draw(face.keypoints, image_kps.shape[2], image_kps.shape[1])[None]


def apply(node_id, instantid, insightface, model, image, weight, cn_strength, start_at, end_at, noise,
          combine_embeds, face_index, on_no_face, control_net=None, positive=None, negative=None, image_kps=None,
          mask=None) -> Tuple:
    """The shared body of the apply nodes: (model, positive, negative, face tokens or None)."""
    faces = reference_faces(insightface, image, face_index, on_no_face, node_id)
    if not faces:
        log.warning("%s: no reference image has a face; the model and conditioning pass through unchanged", node_id)
        return model, positive, negative, None
    tokens = iid.face_tokens(instantid, embeddings(faces), combine_embeds, noise)
    window = SigmaWindow.from_percents(model, start_at, end_at)
    patched = iid.with_face_attention(model, instantid, tokens, weight, window, mask, node_id)
    if control_net is not None:
        first, face = faces[0]
        keypoints = keypoint_image(insightface, face, image[first], image_kps, face_index, node_id)
        positive, negative = iid.with_controlnet(positive, negative, control_net, keypoints, tokens, cn_strength,
                                                 start_at, end_at)
    return patched, positive, negative, tokens


# --- nodes -----------------------------------------------------------------------------------------

class _Loader:
    """Base of the two loaders: one input, one PatchLab object out (``load``), errors naming the node."""

    CATEGORY = CATEGORY
    FUNCTION = "load"


class _WindowNode:
    """Base of the nodes with a start_at/end_at window: its range and order are checked before a run."""

    CATEGORY = CATEGORY

    @classmethod
    def VALIDATE_INPUTS(cls, start_at=None, end_at=None):
        return first_error(check_ranges(cls, start_at=start_at, end_at=end_at), check_percents(start_at, end_at))


class InstantIDModelLoader(_Loader):
    NODE_ID = "PatchLab_InstantIDModelLoader"
    DISPLAY_NAME = "Load InstantID Model (PatchLab)"
    DESCRIPTION = (
        "Loads InstantID's face-adapter weights (ip-adapter.bin from the InstantID release, or a .safetensors with "
        "image_proj./ip_adapter. keys) from ComfyUI/models/instantid. Pickles are read with safe loading; a damaged "
        "file, a file of another kind or an SD1.5 IP-Adapter is reported with what is missing or mis-shaped."
    )
    RETURN_TYPES = (INSTANTID,)
    RETURN_NAMES = ("instantid",)
    OUTPUT_TOOLTIPS = ("The InstantID Resampler and per-layer face attention weights.",)

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths

        return {"required": {"instantid_file": (folder_paths.get_filename_list("instantid"), {
            "tooltip": "A file in ComfyUI/models/instantid (usually ip-adapter.bin).",
        })}}

    def load(self, instantid_file):
        import folder_paths

        path = folder_paths.get_full_path("instantid", instantid_file)
        if path is None:
            raise FileNotFoundError(f"{self.NODE_ID}: {instantid_file} is not in ComfyUI/models/instantid; put the "
                                    "InstantID ip-adapter.bin there and refresh.")
        return (iid.load_weights(path, self.NODE_ID),)


class InstantIDFaceAnalysis(_Loader):
    NODE_ID = "PatchLab_InstantIDFaceAnalysis"
    DISPLAY_NAME = "InstantID Face Analysis (PatchLab)"
    DESCRIPTION = (
        "Loads insightface's antelopev2 face detector and recognizer from ComfyUI/models/insightface/models/"
        "antelopev2 on onnxruntime. The folder is checked first, with an explanation for a nested antelopev2 "
        "folder, the buffalo_l pack or a missing recognition model; missing insightface/onnxruntime packages are "
        "reported with install instructions."
    )
    RETURN_TYPES = (FACEANALYSIS,)
    RETURN_NAMES = ("faceanalysis",)
    OUTPUT_TOOLTIPS = ("insightface's detector and recognizer, ready to find faces.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"provider": combo_input(fa.PROVIDERS, "CPU", (
            "onnxruntime device: CPU works everywhere; CUDA needs onnxruntime-gpu, ROCm and CoreML their builds. Face "
            "analysis runs once per reference image, so CPU is usually fine."))}}

    def load(self, provider):
        return (fa.load(provider, self.NODE_ID),)


class FaceKeypoints:
    NODE_ID = "PatchLab_FaceKeypoints"
    DISPLAY_NAME = "Face Keypoints (PatchLab)"
    DESCRIPTION = (
        "Draws the five face keypoints (eyes, nose, mouth corners) of each image's face the way InstantID's "
        "ControlNet was trained to read them, on a black image of the same size. Use it to preview or to feed "
        "Apply InstantID ControlNet a pose from another picture."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("Keypoint images, one per input image.",)
    FUNCTION = "draw"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "faceanalysis": FACEANALYSIS_INPUT,
            "image": ("IMAGE", {"tooltip": "Pictures with a face."}),
            "face_index": FACE_INDEX,
        }}

    def draw(self, faceanalysis, image, face_index):
        drawings = []
        for i in range(image.shape[0]):
            face = fa.pick(fa.detect(faceanalysis, image[i]), face_index, i, self.NODE_ID)
            if face is None:
                raise ValueError(f"{self.NODE_ID}: no face found in image {i} (of {image.shape[0]}).")
            drawings.append(kp.draw(face.keypoints, image.shape[2], image.shape[1]))
        return (torch.stack(drawings),)


class InstantIDAttentionPatch(_WindowNode):
    NODE_ID = "PatchLab_InstantIDAttentionPatch"
    DISPLAY_NAME = "InstantID Attention Patch (PatchLab)"
    DESCRIPTION = (
        "InstantID's identity injection alone (Wang et al. 2024, arXiv 2401.07519): the reference face's embedding "
        "becomes 16 face tokens that all 70 cross-attention layers of an SDXL model attend to besides the prompt. "
        "Outputs the face embeddings for Apply InstantID ControlNet. SDXL only (a clear error otherwise); the mask "
        "limits only the face attention; works at any batch size, split cond/uncond and fp16/bf16."
    )
    RETURN_TYPES = ("MODEL", FACE_EMBEDS)
    RETURN_NAMES = ("MODEL", "face_embeds")
    OUTPUT_TOOLTIPS = ("A clone of the model with face attention.",
                       "The face tokens (positive and negative) for Apply InstantID ControlNet.")
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "instantid": INSTANTID_INPUT,
                "insightface": FACEANALYSIS_INPUT,
                "image": ("IMAGE", {"tooltip": "Reference picture(s) of the face; several are averaged."}),
                "model": MODEL_INPUT,
                "weight": float_input(1.0, -1.0, 3.0, 0.01,
                                      "Strength of the face attention. 0 disables it; 0.6-1 typical."),
                "start_at": START,
                "end_at": END,
                "noise": noise_input(0.0),
                "face_index": FACE_INDEX,
                "on_no_face": ON_NO_FACE,
            },
            "optional": {"mask": MASK},
        }

    def patch(self, instantid, insightface, image, model, weight, start_at, end_at, noise, face_index, on_no_face,
              mask=None):
        patched, _, _, tokens = apply(self.NODE_ID, instantid, insightface, model, image, weight, 0.0, start_at,
                                      end_at, noise, "average", face_index, on_no_face, mask=mask)
        return (patched, tokens)


class ApplyInstantIDAdvanced(_WindowNode):
    NODE_ID = "PatchLab_ApplyInstantIDAdvanced"
    DISPLAY_NAME = "Apply InstantID Advanced (PatchLab)"
    DESCRIPTION = (
        "InstantID (arXiv 2401.07519) with separate strengths: the face attention (ip_weight) in all 70 SDXL "
        "cross-attention layers, and the InstantID ControlNet (cn_strength) guided by the face keypoints with the "
        "face tokens as its context. Several reference images are combined per combine_embeds (norm average "
        "normalises each embedding, not across images). SDXL only; a clear error names any image without a face, "
        "or on_no_face passes the model through."
    )
    RETURN_TYPES = ("MODEL", "CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("MODEL", "positive", "negative")
    OUTPUT_TOOLTIPS = ("A clone of the model with face attention.", "Positive conditioning with the ControlNet.",
                       "Negative conditioning with the ControlNet.")
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "instantid": INSTANTID_INPUT,
                "insightface": FACEANALYSIS_INPUT,
                "control_net": CONTROL_NET,
                "image": ("IMAGE", {"tooltip": "Reference picture(s) of the face."}),
                "model": MODEL_INPUT,
                "positive": POSITIVE,
                "negative": NEGATIVE,
                "ip_weight": float_input(0.8, 0.0, 3.0, 0.01, "Face attention strength. 0 disables it; 0.6-1 typical."),
                "cn_strength": CN_STRENGTH,
                "start_at": START,
                "end_at": END,
                "noise": noise_input(0.35),
                "combine_embeds": combo_input(COMBINE, "average", (
                    "How several reference faces combine: average, norm average (each embedding to unit length first) "
                    "or concat (all tokens).")),
                "face_index": FACE_INDEX,
                "on_no_face": ON_NO_FACE,
            },
            "optional": {"image_kps": IMAGE_KPS, "mask": MASK},
        }

    def apply(self, instantid, insightface, control_net, image, model, positive, negative, ip_weight, cn_strength,
              start_at, end_at, noise, combine_embeds, face_index, on_no_face, image_kps=None, mask=None):
        patched, positive, negative, _ = apply(
            self.NODE_ID, instantid, insightface, model, image, ip_weight, cn_strength, start_at, end_at, noise,
            combine_embeds, face_index, on_no_face, control_net, positive, negative, image_kps, mask)
        return (patched, positive, negative)


class ApplyInstantID(ApplyInstantIDAdvanced):
    NODE_ID = "PatchLab_ApplyInstantID"
    DISPLAY_NAME = "Apply InstantID (PatchLab)"
    DESCRIPTION = (
        "InstantID (arXiv 2401.07519) in one node: the reference face's identity through all 70 cross-attention "
        "layers of an SDXL model (middle block included) and the InstantID ControlNet guided by the face keypoints. "
        "weight sets both. SDXL only; a clear error names any image without a face, or on_no_face passes the model "
        "through."
    )

    @classmethod
    def INPUT_TYPES(cls):
        advanced = super().INPUT_TYPES()
        required = {}
        for name, spec in advanced["required"].items():
            if name == "ip_weight":
                required["weight"] = float_input(0.8, 0.0, 5.0, 0.01, (
                    "Strength of both the face attention and the ControlNet. 0 disables InstantID; 0.6-1 typical."))
            elif name not in ("cn_strength", "noise", "combine_embeds"):
                required[name] = spec
        return {"required": required, "optional": advanced["optional"]}

    def apply(self, instantid, insightface, control_net, image, model, positive, negative, weight, start_at, end_at,
              face_index, on_no_face, image_kps=None, mask=None):
        return super().apply(instantid, insightface, control_net, image, model, positive, negative, weight, weight,
                             start_at, end_at, 0.35, "average", face_index, on_no_face, image_kps, mask)


class ApplyInstantIDControlNet(_WindowNode):
    NODE_ID = "PatchLab_ApplyInstantIDControlNet"
    DISPLAY_NAME = "Apply InstantID ControlNet (PatchLab)"
    DESCRIPTION = (
        "The InstantID ControlNet alone: ComfyUI's ControlNet, guided by a face-keypoints image, with the face "
        "tokens from InstantID Attention Patch as its cross-attention context. Chains after any ControlNet already "
        "on the conditioning."
    )
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")
    OUTPUT_TOOLTIPS = ("Positive conditioning with the ControlNet.", "Negative conditioning with the ControlNet.")
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "face_embeds": (FACE_EMBEDS, {"tooltip": "From InstantID Attention Patch."}),
            "control_net": CONTROL_NET,
            "image_kps": ("IMAGE", {"tooltip": "Face keypoints image, e.g. from Face Keypoints."}),
            "positive": POSITIVE,
            "negative": NEGATIVE,
            "strength": CN_STRENGTH,
            "start_at": START,
            "end_at": END,
        }}

    def apply(self, face_embeds, control_net, image_kps, positive, negative, strength, start_at, end_at):
        if face_embeds is None:
            log.warning("%s: no face embeddings (the attention patch passed through); conditioning unchanged",
                        self.NODE_ID)
            return (positive, negative)
        return iid.with_controlnet(positive, negative, control_net, image_kps, face_embeds, strength, start_at,
                                   end_at)


NODES = [InstantIDModelLoader, InstantIDFaceAnalysis, FaceKeypoints, InstantIDAttentionPatch, ApplyInstantID,
         ApplyInstantIDAdvanced, ApplyInstantIDControlNet]
