"""A tiny LLaVA-style VLM answering questions about the built-in `shapes` scenes (VQA).

    mmjax train --config experiments/clip_shapes.py --workdir runs/clip_shapes     # the image tower
    mmjax train --config experiments/lm_captions.py --workdir runs/lm_captions     # the LM
    mmjax train --config experiments/vlm_shapes.py --workdir runs/vlm_shapes
    mmjax ask --workdir runs/vlm_shapes --image scene.png "what color is the circle?"

Vision tower: clip_shapes' image tower (32×32 through a 64-128 conv stem, 8-px patches: a 4×4
grid, width 128, depth 4, CLS), features of its last block (CLS dropped: 16 image tokens). LM:
lm_captions' decoder (width 128, depth 4, Llama-style, tied embeddings) over the same BPE
("bpe:shapes:512", 418 ids; `<image>` takes id 418, inside the LM's 512 rows and never embedded).
Projector: LLaVA's Linear → GELU → Linear. Everything trains (joint, PaliGemma-style); the
tower and the LM start from the two runs above (`init_from`; a shape that differs stops the run
with every differing path). From scratch: `--config.init_from='()'`.

Sequences: every question of a scene packed after one image (`loss.sequence="vqa_packed"`):
[bos] <image>×16, then per question "question\n" answer [eos], each question seeing only the
image and itself at the positions it has when asked alone, loss on the answers and their eos.
The questions are the scene's stored ones, except that every neighbour question the scene answers
comes first (`loss.all_questions_of=("neighbour",)`: "what shape is directly to the right of the
red circle?" is 3.4% of the stored training questions, 2.6 times as many this way).
Evaluated on `test` and `test_novel` (held-out colour–shape pairs) by greedy exact match, one
question per scene asked alone, overall and per question group (colour, shape, size, count,
position, exists).

Staged LLaVA training: vlm_shapes_stage1.py (projector only) then vlm_shapes_stage2.py (projector +
LM, tower frozen); vlm_shapes_caption.py captions instead of answering. Trials: docs/vlm.md.

Schedule: batch 32, a constant 5e-4 after 50 warm-up steps, then a linear decay to 0 over the
last 500 of 2,200 steps (warmup-stable-decay). The model ties attributes to objects late and
abruptly (train token accuracy 0.93 → 0.97 between steps 1,400 and 2,000); a decaying rate before
that jump stops it (the cosine runs of docs/vlm.md), a rate that stays up through it and then
anneals finishes it. Batch 32 needs half the examples of batch 64 to get there.

Measured (issue 22, 2-core EPYC, 2026-12-07, 13.7 min for this run, 18.3 min with the tower and
LM runs): 98.2% exact match on test (colour 99.3, shape 98.5, size 98.6, count 97.7, position
90.8, exists 98.2%), 94.1% on test_novel. Position ("what shape is directly to the right of the
red circle?": two hops) has 65 of the 2,000 test questions; asked every neighbour question of the
2,000 test scenes (1,072; `python -m mmjax.evals.binding --workdir runs/vlm_shapes --scenes 2000
--attention_scenes 0 --kinds neighbour_above,neighbour_below,neighbour_left,neighbour_right`) the run
answers 91.9% (left and right 85.4%). With the stored questions only
(`--config.loss.all_questions_of='()'`): 96.4%, position 83.1% (left and right 72%, above and
below 95%; docs/vlm.md).
"""

from mmjax.data.config import DataConfig
from mmjax.experiment import ExperimentConfig, TrainConfig
from mmjax.layers import TransformerConfig
from mmjax.models.lm import LMConfig
from mmjax.models.vit import ViTConfig
from mmjax.models.vlm import VLMConfig
from mmjax.tasks.vlm import VLMLossConfig
from mmjax.train.optim import OptimConfig

TOKENIZER = "bpe:shapes:512"  # trained on the train captions: the same tokenizer as lm_captions
IMAGE_ID = 418  # the BPE's 418 ids, then <image>
MAX_LEN = 120  # bos + 16 image tokens + six packed questions with answers: 99% of train scenes fit
EVAL_LEN = 40  # bos + 16 image tokens + one question (≤ 16 tokens with "\n") + answer (≤ 3) + eos
ANSWER_POSITION = 33  # every answer at position 33: after [bos] <image>×16 and the longest question (16)


def model() -> VLMConfig:
    """clip_shapes' image tower and lm_captions' LM, so their runs can initialise this model."""
    return VLMConfig(
        vision=ViTConfig(image_size=32, channels=3, patch_size=8, pool="cls", posemb="sincos2d", pre_norm=True,
                         patch_bias=False, stem=((64, 2), (128, 2)),
                         encoder=TransformerConfig(width=128, depth=4, num_heads=4, mlp_dim=512, norm_eps=1e-5)),
        lm=LMConfig(vocab_size=512, max_len=128,  # ≥ caption prompt + answer; no param depends on it
                    encoder=TransformerConfig(width=128, depth=4, num_heads=4, num_kv_heads=2, mlp_dim=384,
                                              activation="swiglu", norm="rmsnorm", norm_eps=1e-6, use_bias=False,
                                              rope_base=10000.0),
                    tie_embeddings=True),
        image_token_id=IMAGE_ID,
        vision_feature_layers=(-1,),  # the last block: from scratch, -2 would leave it without gradient
        projector="mlp")


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="vlm_shapes",
        task="vlm",
        model=model(),
        loss=VLMLossConfig(sequence="vqa_packed", max_len=MAX_LEN, eval_max_len=EVAL_LEN, max_answer_tokens=4,
                           answer_position=ANSWER_POSITION, eval_splits=("test_novel",),
                           all_questions_of=("neighbour",)),
        data=DataConfig(name="shapes", train_split="train", eval_split="test", value_range="symmetric",
                        tokenizer=TOKENIZER),
        init_from=(("vision", "runs/clip_shapes"), ("lm", "runs/lm_captions")),
        # Constant: binding is learnt late (steps ~1,100-1,700) and not at all once a schedule has decayed.
        optim=OptimConfig(name="adamw", peak_lr=5e-4, warmup_steps=50, schedule="constant", cooldown_steps=500,
                          b2=0.98, weight_decay=0.05, grad_clip_norm=1.0),
        # One evaluation, at the end (4,000 greedy answers take about a minute here).
        train=TrainConfig(steps=2200, batch_size=32, eval_batch_size=500, log_every=50, eval_every=0,
                          checkpoint_every=500, keep_checkpoints=1),
    )
