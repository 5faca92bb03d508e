"""Example workflows of the InstantID nodes.

They name the files users have: models/instantid/ip-adapter.bin, the antelopev2 face
models, the InstantID ControlNet saved as controlnet/instantid/diffusion_pytorch_model.safetensors,
an SDXL checkpoint and a reference picture face.png in ComfyUI's input folder.
"""

from __future__ import annotations

from ._common import SDXL, checkpoint, example, prompts, sample_and_save
from .builder import Builder

INSTANTID_FILE = "ip-adapter.bin"
CONTROLNET_FILE = "instantid/diffusion_pytorch_model.safetensors"
REFERENCE = "face.png"
PORTRAIT = "portrait photo of a person in a garden, soft light, detailed skin, 85mm"
NEGATIVE = "blurry, cartoon, deformed, watermark, text"


def loaders(wf: Builder):
    return (wf.add("PatchLab_InstantIDModelLoader", instantid_file=INSTANTID_FILE),
            wf.add("PatchLab_InstantIDFaceAnalysis", provider="CPU"),
            wf.add("LoadImage", image=REFERENCE))


@example("instantid")
def instantid(wf: Builder) -> None:
    wf.note("Apply InstantID", "Identity from a reference photo: face attention in all 70 SDXL cross-attention "
            "layers plus the InstantID ControlNet on the face keypoints. Put ip-adapter.bin in models/instantid, "
            "antelopev2 in models/insightface/models/antelopev2 and the ControlNet in models/controlnet/instantid. "
            "Lower CFG (4-5) works best.")
    ckpt = checkpoint(wf, SDXL)
    instantid_model, analysis, reference = loaders(wf)
    controlnet = wf.add("ControlNetLoader", control_net_name=CONTROLNET_FILE)
    positive, negative = prompts(wf, ckpt, PORTRAIT, NEGATIVE)
    applied = wf.add("PatchLab_ApplyInstantID", instantid=instantid_model[0], insightface=analysis[0],
                     control_net=controlnet[0], image=reference[0], model=ckpt[0], positive=positive[0],
                     negative=negative[0], weight=0.8, start_at=0.0, end_at=1.0, face_index=0, on_no_face="error")
    latent = wf.add("EmptyLatentImage", width=1016, height=1016, batch_size=1)
    sample_and_save(wf, applied[0], ckpt, applied[1], applied[2], latent[0], "instantid", steps=30, cfg=4.5,
                    sampler="dpmpp_2m", scheduler="karras")


@example("instantid_advanced")
def instantid_advanced(wf: Builder) -> None:
    wf.note("Apply InstantID Advanced", "Separate strengths for the face attention and the ControlNet, a little noise "
            "in the negative face embedding, and the keypoints drawn for inspection. For batch jobs, on_no_face "
            "'pass through' keeps the queue running when a picture has no face.")
    ckpt = checkpoint(wf, SDXL)
    instantid_model, analysis, reference = loaders(wf)
    controlnet = wf.add("ControlNetLoader", control_net_name=CONTROLNET_FILE)
    positive, negative = prompts(wf, ckpt, PORTRAIT, NEGATIVE)
    applied = wf.add("PatchLab_ApplyInstantIDAdvanced", instantid=instantid_model[0], insightface=analysis[0],
                     control_net=controlnet[0], image=reference[0], model=ckpt[0], positive=positive[0],
                     negative=negative[0], ip_weight=0.8, cn_strength=0.6, start_at=0.0, end_at=0.9, noise=0.35,
                     combine_embeds="norm average", face_index=0, on_no_face="pass through")
    keypoints = wf.add("PatchLab_FaceKeypoints", faceanalysis=analysis[0], image=reference[0], face_index=0)
    wf.add("SaveImage", images=keypoints[0], filename_prefix="PatchLab/instantid_keypoints")
    latent = wf.add("EmptyLatentImage", width=1016, height=1016, batch_size=1)
    sample_and_save(wf, applied[0], ckpt, applied[1], applied[2], latent[0], "instantid_advanced", steps=30,
                    cfg=4.5, sampler="dpmpp_2m", scheduler="karras")


@example("instantid_attention_patch")
def instantid_attention_patch(wf: Builder) -> None:
    wf.note("InstantID, piece by piece", "The attention patch and the ControlNet as separate nodes, with the pose "
            "taken from the keypoints image: swap in another picture's keypoints to change the pose.")
    ckpt = checkpoint(wf, SDXL)
    instantid_model, analysis, reference = loaders(wf)
    controlnet = wf.add("ControlNetLoader", control_net_name=CONTROLNET_FILE)
    positive, negative = prompts(wf, ckpt, PORTRAIT, NEGATIVE)
    patched = wf.add("PatchLab_InstantIDAttentionPatch", instantid=instantid_model[0], insightface=analysis[0],
                     image=reference[0], model=ckpt[0], weight=0.8, start_at=0.0, end_at=1.0, noise=0.0,
                     face_index=0, on_no_face="error")
    keypoints = wf.add("PatchLab_FaceKeypoints", faceanalysis=analysis[0], image=reference[0], face_index=0)
    conditioned = wf.add("PatchLab_ApplyInstantIDControlNet", face_embeds=patched[1], control_net=controlnet[0],
                         image_kps=keypoints[0], positive=positive[0], negative=negative[0], strength=0.6,
                         start_at=0.0, end_at=1.0)
    latent = wf.add("EmptyLatentImage", width=1016, height=1016, batch_size=1)
    sample_and_save(wf, patched[0], ckpt, conditioned[0], conditioned[1], latent[0], "instantid_attention_patch",
                    steps=30, cfg=4.5, sampler="dpmpp_2m", scheduler="karras")
