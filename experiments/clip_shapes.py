"""A tiny CLIP trained on the built-in `shapes` scenes and their captions.

    mmjax train --config experiments/clip_shapes.py --workdir runs/clip_shapes

Image tower: ViT on 32×32 with a token grid of 4×4 patches (N = 64), reached through a conv stem
(3×3 convs 32 → 64 → 128 channels, strides 1, 2, 2, then 1×1 "patches"). Text tower: BPE tokens
(trained locally on the train captions), causal, pooled at the last valid token (the EOS). Hard
negatives: every caption also enters the loss with one shape word swapped for another (NegCLIP).
Evaluated by caption retrieval and zero-shot classification of single-object scenes (color,
shape, position) on `test` and on `test_novel`, whose color–shape pairs never occur in training.

Status (measured on the quiet 2-core CPU, 500 steps of batch 128, 14 min 36 s including the evals):
test R@1 70.6% / 89.2% image→text / text→image (chance 0.05%), zero-shot colour 94.6%, position
100%, shape 30.0% (chance 16.7%); test_novel: R@1 61.8% / 69.6%, colour 96.7%, position
100%, shape 26.9%. The issue's targets for shape (≥ 90%) and time (~10 min) are not met, and colour is just under
95% (it was 100% without the stem).

What the shape figure hides, and what was tried (figures on `test`, single objects):
- The image tower does carry shape: ranking the six captions that differ only in the shape word
  (the true size, colour and cell kept) picks the right shape for 81.6% of the images, and
  the best of all 864 one-object captions has the right shape for 71.2%. Prompt ensembles that
  average embeddings ("a {}", or every "a {size} {colour} {}") lose that: the model matches whole
  descriptions rather than adding up attributes.
- Learning shape is slow at this resolution: a small object is about 6 px wide and its shape lives
  in a few edge pixels. Trained as a supervised classifier, the plain patch-4 ViT did not move from
  chance in 250 steps (colour took 50); with the conv stem it reached ~75% in 400 steps. In this
  run the stem took shape from 24.7% to 30.0% and retrieval from 62% / 81% to 70.6% / 89.2%, at
  ~25% more time per step.
- Hard negatives took the train accuracy of caption vs shape-swapped caption from 0.55 to 0.89.
  Without them colour and cell already tell the captions of a batch apart (train in-batch
  accuracy > 95%), so the loss puts little pressure on shape.
- Captions with random subsets of the attributes ("a circle", "a red object"), meant to make the
  zero-shot prompts in-distribution, lowered shape to 20% at step 500, and were dropped.
"""

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
            text=TextConfig(vocab_size=VOCAB, max_len=MAX_LEN, encoder=tower, causal=True, pool="last"),
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
