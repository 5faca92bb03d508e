"""Files the test kit puts into a ComfyUI base directory so the InstantID workflows run on tiny models.

models/instantid/ip-adapter.bin (random weights for the tiny SDXL layout),
models/insightface/models/antelopev2 (the tiny ONNX face models) and input/face.png.
Existing files are left alone. Run as ``python -m devtools.testkit.assets MODELS INPUT``
(the server harness does, for the scratch base directory of the test server and the demo).
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def provision(models_dir: Path, input_dir: Path) -> None:
    from . import face_models, tiny_models

    weights = Path(models_dir) / "instantid" / "ip-adapter.bin"
    if not weights.exists():
        model = tiny_models.build_model("sdxl")
        face_models.save_instantid(face_models.instantid_state_dict(model), weights)
    antelope = Path(models_dir) / "insightface" / "models" / "antelopev2"
    if not antelope.exists():
        face_models.write_antelopev2(Path(models_dir) / "insightface")
    picture = Path(input_dir) / "face.png"
    if not picture.exists():
        import numpy as np
        from PIL import Image

        image = face_models.face_picture(size=(256, 256))[0].numpy()
        Image.fromarray((image * 255).astype(np.uint8)).save(picture)


if __name__ == "__main__":
    import sys

    from devtools import bootstrap

    bootstrap.import_comfyui()
    bootstrap.load_pack()
    provision(Path(sys.argv[1]), Path(sys.argv[2]))
