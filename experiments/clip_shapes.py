"""A tiny CLIP trained on the built-in `shapes` scenes and their captions.

    mmjax train --config experiments/clip_shapes.py --workdir runs/clip_shapes

Image tower: ViT on 32×32 with a token grid of 4×4 patches (N = 64), reached through a conv stem
(3×3 convs 32 → 64 → 128 channels, strides 1, 2, 2, then 1×1 "patches"), CLS pooled. Text tower:
BPE tokens (trained locally on the train captions), 2 layers, bidirectional, mean-pooled over the
valid tokens. Hard negatives: every caption also enters the loss with one shape word swapped for
another (NegCLIP). Evaluated by caption retrieval and zero-shot classification of single-object
scenes (color, shape, position) on `test` and on `test_novel`, whose color–shape pairs never occur
in training.

Status (measured on the 2-core CPU, 500 steps of batch 128, 11 min 21 s including the evals):
test R@1 72.0% / 94.4% image→text / text→image (chance 0.05%), zero-shot colour 94.6%, position
100%, shape 62.6% (chance 16.7%); test_novel: R@1 60.8% / 68.1%, colour 99.8%, position 100%,
shape 44.5%. The issue's targets for shape (≥ 90%) and colour (≥ 95% on test) are not met; the
time is near the ~10 min asked.

Text tower variants, same everything else (test; shape / colour / R@1 i→t / time):
    4 layers, causal, pooled at the last position    30.0% / 94.6% / 70.6% / 14.6 min
    4 layers, bidirectional, mean-pooled             48.4% / 97.9% / 70.9% / ~14 min
    2 layers, bidirectional, mean-pooled (this)      62.6% / 94.6% / 72.0% / 11.4 min
    1 layer,  bidirectional, mean-pooled             53.8% / 91.5% / 72.3% /  8.9 min
    2 layers, mean-pooled, image tower GAP-pooled    34.7% / 91.0% / 69.8% / 11.5 min

Five hard negatives per caption (`text_negatives_per_text=5` in the DataConfig below: distinct
shape-word swaps drawn without replacement, so a one-object caption meets all five other shapes),
this config otherwise, measured on a slower 2-core machine (AMD EPYC, AVX2) where this config's
step takes ~2 s against ~3.9 s with five: test shape 72.8%, colour 89.1%, position 100%, R@1
72.3% / 93.8%; test_novel shape 70.7% (44.5% with one negative), colour 100%, position 100%,
R@1 58.7% / 66.6%; 33.9 min. With two (~2.5 s per step there): test shape 60.7%, colour 97.0%,
position 100%, R@1 72.7% / 94.9%; test_novel shape 57.4%, colour 99.8%; 22.7 min. More negatives
help shape on test_novel most (44.5 → 57.4 → 70.7%); on test, shape moves only with five and colour
goes 94.6 → 97.0 → 89.1% (seed-to-seed noise is not measured). The text tower's extra work makes
the step 1.3× (two) and 2× (five) longer, so one negative stays the default here.

What the shape figure hides, and what was tried (figures on `test`, single objects):
- The image tower does carry shape: ranking the six captions that differ only in the shape word
  (the true size, colour and cell kept) picks the right shape for 87% of the images with the 4-layer
  mean-pooled text tower (92.5% with GAP pooling), and the best of all 864 one-object captions has
  the right shape for 80–83%. Prompt ensembles that average embeddings ("a {}", or every
  "a {size} {colour} {}") lose much of that: the zero-shot read-out needs text embeddings that add
  up attributes, and the text towers that compose most additively (mean-pooled, shallow) score
  best. Template sets chosen on train images change shape accuracy by only a few points.
- Learning shape is slow at this resolution: a small object is about 6 px wide and its shape lives
  in a few edge pixels. Trained as a supervised classifier, the plain patch-4 ViT did not move from
  chance in 250 steps (colour took 50); with the conv stem it reached ~75% in 400 steps.
- Hard negatives took the train accuracy of caption vs shape-swapped caption from 0.55 to 0.89.
  Without them colour and cell already tell the captions of a batch apart (train in-batch
  accuracy > 95%), so the loss puts little pressure on shape.
- Captions with random subsets of the attributes ("a circle", "a red object"), meant to make the
  zero-shot prompts in-distribution, lowered shape to 20% at step 500 (with the causal text
  tower), and were dropped.
"""

import dataclasses

from mmjax.data.config import DataConfig
from mmjax.data.shapes import COLORS, SHAPES, position_phrases
from mmjax.experiment import ExperimentConfig, TrainConfig
from mmjax.layers import TransformerConfig
from mmjax.models.clip import CLIPConfig
from mmjax.models.text import TextConfig
from mmjax.models.vit import ViTConfig
from mmjax.tasks.contrastive import ContrastiveLossConfig, ZeroShotConfig
from mmjax.train.optim import OptimConfig

# A byte-level BPE trained on the shapes train captions (cached in the data dir on first use): it
# runs out of merges at 418 ids; captions take at most 43 tokens with EOS (the bytes need 200).
TOKENIZER = "bpe:shapes:512"
VOCAB = 512
MAX_LEN = 48


def get_config() -> ExperimentConfig:
    tower = TransformerConfig(width=128, depth=4, num_heads=4, mlp_dim=512, norm_eps=1e-5)
    single = ("num_objects", 1)
    return ExperimentConfig(
        name="clip_shapes",
        task="contrastive",
        model=CLIPConfig(
            vision=ViTConfig(image_size=32, channels=3, patch_size=4, pool="cls", posemb="sincos2d", pre_norm=True,
                             patch_bias=False, stem=((32, 1), (64, 2), (128, 2)), encoder=tower),
            text=TextConfig(vocab_size=VOCAB, max_len=MAX_LEN, encoder=dataclasses.replace(tower, depth=2),
                            causal=False, pool="mean"),
            embed_dim=128),
        loss=ContrastiveLossConfig(
            kind="clip",
            eval_splits=("test_novel",),
            zero_shot=(
                ZeroShotConfig(name="color", label_field="color", class_names=tuple(COLORS),
                               templates=("a {} object", "a photo of a {} shape", "something {}"),
                               only_where=single),
                ZeroShotConfig(name="shape", label_field="shape", class_names=tuple(SHAPES),
                               templates=("a {}", "a photo of a {}", "a small {}", "a large {}"),
                               only_where=single),
                ZeroShotConfig(name="position", label_field="position",
                               class_names=tuple(position_phrases(i)[0] for i in range(9)),
                               templates=("an object {}", "something {}", "a shape {}"),
                               only_where=single),
            )),
        data=DataConfig(name="shapes", train_split="train", eval_split="test", value_range="symmetric",
                        text_field="caption", tokenizer=TOKENIZER, max_text_len=MAX_LEN,
                        extra_fields=("color", "shape", "position", "num_objects"),
                        text_negatives=(tuple(SHAPES),)),
        optim=OptimConfig(name="adamw", peak_lr=1e-3, warmup_steps=50, schedule="cosine",
                          weight_decay=0.1, grad_clip_norm=1.0),
        train=TrainConfig(steps=500, batch_size=128, eval_batch_size=500, log_every=50,
                          eval_every=500, checkpoint_every=250, keep_checkpoints=2),
    )
