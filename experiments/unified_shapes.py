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
Measured (2-core EPYC, 2026-12-07, commit 80b49db, 23.3 min of training steps with the tests beside
it for 3, over the patch-encoder tokenizer): image → caption on 500 test scenes colour 91.1%, shape
90.1%, size 94.8%, position 58.0%, count 91.4% (91.0% of captions parse); caption → image with
CFG 1.5 colour 85.6%, shape 66.9%, position 87.2% (the caption-only vq_ar_shapes: 96.8%, 94.2%,
92.2%: each order here sees half the examples). Position is the caption attribute below 90%: the
model pairs the objects it names with the occupied cells barely better than at random (three
objects: 38.3%, `python -m mmjax.evals.captions RUN`; docs/generation.md has the trials of
loss.image_prefix and loss.caption_rate).
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
