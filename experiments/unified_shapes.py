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

Trained with vq_ar_shapes' recipe (4,400 steps of 32, constant 2e-3, cool-down over the last 900).
Measured (2-core EPYC, 2026-12-07, 21.7 min in all, alone, over the patch-encoder tokenizer):
image → caption on 500 test scenes shape 83.5%, colour 88.0%, size 91.9%, position 59.7%, count
89.2% (88.2% of captions parse); caption → image with CFG 1.5 colour 75.4%, shape 54.0%, position
78.2% (the caption-only vq_ar_shapes: 96.8%, 94.2%, 92.2%: each order here sees half the examples).
Over the conv-encoder tokenizer, at 2,300 steps of 64 (2026-12-06): captions colour 51.1%, shape
50.1%; images colour 25.9%, shape 20.0%.
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
    return dataclasses.replace(cfg, name="unified_shapes", model=model, loss=loss)
