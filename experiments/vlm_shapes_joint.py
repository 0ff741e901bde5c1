"""VLM on shapes, one joint stage: image tower, projector and LM all trained, starting from the
clip_shapes and lm_captions runs (vlm_shapes.py trains the same model from scratch).

    mmjax train --config experiments/vlm_shapes_joint.py --workdir runs/vlm_shapes_joint
"""

import dataclasses
import runpy
from pathlib import Path

BASE = runpy.run_path(str(Path(__file__).with_name("vlm_shapes.py")))


def get_config():
    cfg = BASE["get_config"]()
    return dataclasses.replace(cfg, name="vlm_shapes_joint",
                               init_from=(("vision", "runs/clip_shapes"), ("lm", "runs/lm_captions")),
                               optim=dataclasses.replace(cfg.optim, peak_lr=5e-4))
