"""Trained reference models: a procedural image and clip set, small models trained on it, and a quality oracle.

``data`` draws the pictures (one coloured shape on a dark background, named by a
``"<colour> <shape>"`` prompt) and the clips (the shape moving: ``"<colour> <shape> moving
<direction>"``); ``models`` builds and loads the SD1.5-layout UNet and the Flux-layout DiT
trained on the pictures and the Wan 2.1-layout video model trained on the clips (with their
word-table text encoder and RGB "VAE");
``train`` is the command that trained them; ``oracle`` judges what a sampler made
(prompt accuracy, FID on the classifier's features, PSNR). Test and bench code only:
never shipped with the pack (see .comfyignore).
"""
