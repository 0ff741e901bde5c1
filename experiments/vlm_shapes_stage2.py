"""VLM on shapes, LLaVA stage 2: projector + LM trained on the VQA answers, the image tower
frozen, starting from stage 1's run (the whole model: tower, projector and LM).

    mmjax train --config experiments/vlm_shapes_stage2.py --workdir runs/vlm_shapes_stage2
"""

import dataclasses
import runpy
from pathlib import Path

BASE = runpy.run_path(str(Path(__file__).with_name("vlm_shapes.py")))


def get_config():
    cfg = BASE["get_config"]()
    return dataclasses.replace(
        cfg, name="vlm_shapes_stage2",
        init_from=(("", "runs/vlm_shapes_stage1"),),
        optim=dataclasses.replace(cfg.optim, peak_lr=3e-4, freeze=(r"vision/.*",), schedule="cosine",
                                  end_lr_ratio=0.05, cooldown_steps=0),
        train=dataclasses.replace(cfg.train, steps=1000, batch_size=64))
