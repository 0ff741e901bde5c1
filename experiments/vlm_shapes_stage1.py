"""VLM on shapes, LLaVA stage 1: the projector alone learns to map the pretrained image tower's
features into the pretrained LM's embeddings (tower and LM frozen).

    mmjax train --config experiments/clip_shapes.py --workdir runs/clip_shapes     # first, once
    mmjax train --config experiments/lm_captions.py --workdir runs/lm_captions     # first, once
    mmjax train --config experiments/vlm_shapes_stage1.py --workdir runs/vlm_shapes_stage1

The model, data and evaluation are vlm_shapes.py's; point init_from elsewhere with
`--config.init_from='(("vision", "DIR"), ("lm", "DIR"))'`.
"""

import dataclasses
import runpy
from pathlib import Path

BASE = runpy.run_path(str(Path(__file__).with_name("vlm_shapes.py")))


def get_config():
    cfg = BASE["get_config"]()
    return dataclasses.replace(
        cfg, name="vlm_shapes_stage1",
        init_from=(("vision", "runs/clip_shapes"), ("lm", "runs/lm_captions")),
        optim=dataclasses.replace(cfg.optim, peak_lr=1e-3, weight_decay=0.0, freeze=(r"vision/.*", r"lm/.*"),
                                  schedule="cosine", end_lr_ratio=0.05, cooldown_steps=0),
        train=dataclasses.replace(cfg.train, steps=500, batch_size=64, eval_every=0, checkpoint_every=0))
