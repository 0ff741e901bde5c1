"""One LM over text and image codes, both ways (Chameleon), on the built-in `shapes` scenes.

    mmjax train --config experiments/vqgan_shapes.py --workdir runs/vqgan_shapes   # the tokenizer, first
    mmjax train --config experiments/unified_shapes.py --workdir runs/unified_shapes
    mmjax sample --workdir runs/unified_shapes --prompt "a large red circle at the top left" --out grid.png

The vq_ar_shapes model and vocabulary (418 text ids, BOI / EOI / NULL, 512 codes of the frozen
vqgan_shapes tokenizer), trained on each example in one of two orders, drawn uniformly:

    caption → image   [caption (right-aligned) | BOI | 64 codes | EOI]   targets: codes, EOI
    image → caption   [BOI | 64 codes | EOI | caption | EOS]             targets: caption, EOS

with Chameleon's two stabilisers on: QK-norm (RMSNorm over each head's queries and keys, so
attention logits cannot grow without bound when image and text tokens of very different
statistics compete in one softmax) and z-loss 1e-4 (log Z² of the output softmax, which keeps
the logits of the large joint vocabulary from drifting). Caption → image samples are constrained
to code ids for exactly 64 steps (EOI follows by construction); image → caption decodes text
ids only, greedy, until EOS. Evaluated both ways on `test` and `test_novel`: generated images
read back by the shapes probe, generated captions parsed back with the dataset's grammar.

Measured (2-core EPYC, 2026-12-06, 2,300 steps in 23 min 33 s, over the conv-encoder tokenizer):
image → caption on 500 test scenes colour 51.1%, shape 50.1%, size 77.8%, position 76.2%, count
84.6% (86.2% of captions parse); caption → image with CFG 1.5 colour 25.9%, shape 20.0%, position
39.6% (the caption-only vq_ar_shapes: 54.5%, 40.4%, 59.2%: each order here sees half the examples).
"""

import dataclasses
import runpy
from pathlib import Path

from mmjax.experiment import ExperimentConfig

vq_ar_config = runpy.run_path(str(Path(__file__).with_name("vq_ar_shapes.py")))["get_config"]


def get_config() -> ExperimentConfig:
    cfg = vq_ar_config()
    model = dataclasses.replace(cfg.model, max_len=cfg.model.max_len + 2,  # EOI, and EOS after the caption
                                encoder=dataclasses.replace(cfg.model.encoder, qk_norm="rmsnorm"))
    loss = dataclasses.replace(cfg.loss, directions=("caption_to_image", "image_to_caption"), z_loss=1e-4)
    # As measured: vq_ar_shapes' recipe of 2026-12-06 (2,300 steps of 64 at a constant 2e-3).
    optim = dataclasses.replace(cfg.optim, cooldown_steps=0)
    train = dataclasses.replace(cfg.train, steps=2300, batch_size=64, checkpoint_every=1150)
    return dataclasses.replace(cfg, name="unified_shapes", model=model, loss=loss, optim=optim, train=train)
