"""A tiny decoder LM trained on the built-in `shapes` captions.

    mmjax train --config experiments/lm_captions.py --workdir runs/lm_captions

Llama-style decoder (RMSNorm, SwiGLU, RoPE, GQA with 4 query / 2 key-value heads), width 128,
depth 4, over a byte-level BPE trained locally on the train captions ("bpe:shapes:512": ids run
out of merges at 418, a caption is at most 45 tokens with BOS and EOS). Each example is
BOS + caption + EOS; the loss is the next-token cross-entropy on every real token. Evaluated on
`test` (scenes never seen in training) by held-out perplexity, against the perplexity of a
unigram model of the train tokens on the same test tokens, and by sampled captions (greedy and
temperature 0.8 / top-p 0.9, from BOS and from a few prefixes) written into results.json.

Measured (300 steps of 64 captions; a 2-core CPU shared with other jobs, load average 4-6, so
the times are noisy): test perplexity 3.05 (token accuracy 51.1%) against a unigram perplexity of
36.5 (36.47 even for a unigram fitted on the test tokens themselves). Wall time of the whole run
(unigram count, two evaluations with samples and the compiles included): 2 min 47 s and 3 min 41 s
in two identical runs (2 min 9-13 s of user CPU time). Train loss 3.53 at step 50, 1.23 at 100,
1.13 at 300: most is learned in the first 100 steps (400 steps reach 3.00 in 6 min 42 s).
Sampled captions read like the dataset's ("three shapes: a large orange circle is in the bottom
left corner, in the top right corner there is a large blue triangle and in the top left there is
a large cyan cross"), though some break its rules (two objects in one cell); greedy ones loop on
the most likely phrase ("a small white diamond is in the top left corner, a small white diamond
is in the top left corner ...").
"""

from mmjax.data.config import DataConfig
from mmjax.experiment import ExperimentConfig, TrainConfig
from mmjax.layers import TransformerConfig
from mmjax.models.lm import LMConfig
from mmjax.tasks.lm import LMLossConfig
from mmjax.train.optim import OptimConfig

TOKENIZER = "bpe:shapes:512"
VOCAB = 512  # ≥ the tokenizer's 418 ids (checked when the task starts)
MAX_LEN = 48  # BOS + caption + EOS; the longest caption takes 45


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="lm_captions",
        task="lm",
        model=LMConfig(
            vocab_size=VOCAB,
            encoder=TransformerConfig(width=128, depth=4, num_heads=4, num_kv_heads=2, mlp_dim=384,
                                      activation="swiglu", norm="rmsnorm", norm_eps=1e-6, use_bias=False,
                                      rope_base=10000.0),
            tie_embeddings=True),
        loss=LMLossConfig(
            z_loss=1e-4,
            sample_prompts=("", "a red", "two objects:", "a small blue circle", "three"),
            samples_per_prompt=2,
            unigram_reference=True),
        data=DataConfig(name="shapes", train_split="train", eval_split="test", text_field="caption",
                        tokenizer=TOKENIZER, max_text_len=MAX_LEN, text_add_bos=True, text_add_eos=True),
        optim=OptimConfig(name="adamw", peak_lr=3e-3, warmup_steps=40, schedule="cosine", end_lr_ratio=0.05,
                          b2=0.98, weight_decay=0.1, grad_clip_norm=1.0),
        train=TrainConfig(steps=300, batch_size=64, eval_batch_size=500, log_every=50,
                          eval_every=150, checkpoint_every=0, keep_checkpoints=1),
    )
