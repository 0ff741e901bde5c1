"""A tiny CLIP on scikit-learn's handwritten digits and their captions ("a handwritten digit seven"),
evaluated by zero-shot classification of the 360 held-out digits.

    mmjax train --config experiments/clip_digits.py --workdir runs/clip_digits

The zero-shot classifier never sees a label: each class is the averaged text embedding of prompts
("a handwritten digit {}", "the digit {}", "a {}"), and an image is assigned the class whose
embedding is nearest. The text tower reads UTF-8 bytes. Every batch holds
about 13 images per caption, so in-batch "negatives" include images of the same digit: CLIP's
loss cannot reach zero here, the zero-shot accuracy is what to watch.
"""

from mmjax.data.config import DataConfig
from mmjax.data.digits import DIGIT_WORDS
from mmjax.experiment import ExperimentConfig, TrainConfig
from mmjax.layers import TransformerConfig
from mmjax.models.clip import CLIPConfig
from mmjax.models.text import TextConfig
from mmjax.models.vit import ViTConfig
from mmjax.tasks.contrastive import ContrastiveLossConfig, ZeroShotConfig
from mmjax.train.optim import OptimConfig

MAX_LEN = 32  # the longest caption, "a handwritten digit seven", is 25 bytes + EOS


def get_config() -> ExperimentConfig:
    tower = TransformerConfig(width=64, depth=3, num_heads=4, mlp_dim=128, norm_eps=1e-5)
    return ExperimentConfig(
        name="clip_digits",
        task="contrastive",
        model=CLIPConfig(
            vision=ViTConfig(image_size=8, channels=1, patch_size=2, pool="gap", posemb="sincos2d",
                             encoder=tower),
            text=TextConfig(vocab_size=259, max_len=MAX_LEN, encoder=tower, causal=True, pool="last"),
            embed_dim=64),
        loss=ContrastiveLossConfig(
            kind="clip",
            zero_shot=(
                ZeroShotConfig(name="digit", label_field="label", class_names=DIGIT_WORDS,
                               templates=("a handwritten digit {}", "the digit {}", "a {}")),
            )),
        data=DataConfig(name="digits", value_range="unit", random_shift=1, text_field="caption",
                        tokenizer="bytes", max_text_len=MAX_LEN),
        optim=OptimConfig(name="adamw", peak_lr=2e-3, warmup_steps=100, schedule="cosine",
                          weight_decay=0.05, grad_clip_norm=1.0),
        train=TrainConfig(steps=1000, batch_size=128, eval_batch_size=360, log_every=100,
                          eval_every=500, checkpoint_every=500, keep_checkpoints=2),
    )
