"""A tiny LLaVA-style VLM answering questions about the built-in `shapes` scenes (VQA).

    mmjax train --config experiments/vlm_shapes.py --workdir runs/vlm_shapes
    mmjax ask --workdir runs/vlm_shapes --image scene.png "what color is the circle?"

Vision tower: clip_shapes' image tower (32×32 through a 64-128 conv stem, 8-px patches: a 4×4
grid, width 128, depth 4, CLS), features of its last block (CLS dropped: 16 image tokens). LM:
lm_captions' decoder (width 128, depth 4, Llama-style, tied embeddings) over the same BPE
("bpe:shapes:512", 418 ids; `<image>` takes id 418, inside the LM's 512 rows and never embedded).
Projector: LLaVA's Linear → GELU → Linear. Each training example is one of the scene's questions
(drawn per step): [bos] <image>×16 question "\\n" answer [eos], loss on the answer and its eos only.
Evaluated on `test` and `test_novel` (held-out colour–shape pairs) by greedy exact match, overall
and per question group (colour, shape, size, count, position, exists).

By default everything trains from scratch, jointly: the config then runs in any fresh checkout.
With the clip_shapes and lm_captions runs at hand, start from them instead:

    mmjax train --config experiments/vlm_shapes.py --workdir runs/vlm_shapes_init \\
        '--config.init_from=(("vision", "runs/clip_shapes"), ("lm", "runs/lm_captions"))'

(the tower comes from the CLIP run's "vision" subtree, the LM from the LM run; a shape that differs
stops the run with every differing path). Staged training (LLaVA): vlm_shapes_stage1.py (projector
only) then vlm_shapes_stage2.py (projector + LM); vlm_shapes_joint.py trains all from both runs;
vlm_shapes_caption.py captions instead of answering.

Status (issue 22): not tuned yet. From scratch, 1,500 steps of batch 64 (0.23 s/step on the 2-core
EPYC) reached 53.7% exact match on `test` (shape 16.7%: chance), 53.4% on `test_novel`.
vlm_shapes_joint.py (tower and LM from clip_shapes / lm_captions, same 1,500 steps, 6.8 min):
68.0% on test (colour 62.6, shape 43.3, size 84.2, count 78.7, position 23.1, exists 52.5%),
62.5% on test_novel: the pretrained tower knows shapes and colours, but which object sits where
(position, exists, colour of a named shape) is barely learnt from one answer token per image.
All six questions of a scene per sequence (loss.sequence="vqa_turns", max_len 128, lm.max_len 160)
gave 73.1% on test (colour 71.2, shape 64.0, size 86.5, count 76.6, position 53.8, exists 54.8%),
69.0% on test_novel, in 16 min (0.45 s/step and a slower evaluation).
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
MAX_LEN = 40  # bos + 16 image tokens + question (≤ 16 tokens with "\n") + answer (≤ 3) + eos


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
        loss=VLMLossConfig(sequence="vqa", max_len=MAX_LEN, max_answer_tokens=4, eval_splits=("test_novel",)),
        data=DataConfig(name="shapes", train_split="train", eval_split="test", value_range="symmetric",
                        tokenizer=TOKENIZER),
        optim=OptimConfig(name="adamw", peak_lr=1e-3, warmup_steps=50, schedule="cosine", end_lr_ratio=0.05,
                          b2=0.98, weight_decay=0.05, grad_clip_norm=1.0),
        train=TrainConfig(steps=1500, batch_size=64, eval_batch_size=500, log_every=50, eval_every=500,
                          checkpoint_every=500, keep_checkpoints=1),
    )
