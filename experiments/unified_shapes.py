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
the logits of the large joint vocabulary from drifting). Caption → image conditions on the
dataset's captions (any object order and phrasing); image → caption is taught to write the
scene's reading-order caption (`loss.caption_targets="reading_order"`, `shapes.reading_order_caption`:
"two objects: at the top left there is a small red circle; in the center there is a large blue
square"), so each object is described after its cell is named and no word depends on which object
a caption happened to mention first. Caption → image samples are constrained to code ids for
exactly 64 steps (EOI follows by construction); image → caption decodes text ids only, greedy,
until EOS. Evaluated both ways on `test` and `test_novel`: generated images read back by the shapes
probe, generated captions parsed back with the dataset's grammar.

Trained with vq_ar_shapes' recipe (4,400 steps of 32, constant 2e-3, cool-down over the last 900).
Measured (2-core EPYC, 2026-12-07, 23.9 min of training steps (the tests beside it for a few),
over the patch-encoder tokenizer, `--config.loss.tokenizer_workdir=runs/vqgan_patch`): image →
caption on 500 test scenes colour 99.9%, shape 99.4%, size 100%, position 100%, count 100% (98.6%
of the captions state the whole scene exactly); test_novel shape 83.9% (unseen colour–shape
pairs), colour 96.2%, position 100%. Caption → image with CFG 1.5: colour 94.3%, shape 88.6%,
position 90.4%, FD-probe 1.18 (the caption-only vq_ar_shapes: 96.8%, 94.2%, 92.2%). With the
dataset's own captions as targets (`caption_targets="dataset"`) the captions place objects at
58.0%: the model pairs objects and cells barely better than at random (docs/generation.md).
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
    loss = dataclasses.replace(cfg.loss, directions=("caption_to_image", "image_to_caption"), z_loss=1e-4,
                               caption_targets="reading_order")
    return dataclasses.replace(cfg, name="unified_shapes", model=model, loss=loss)
