"""Image classification with a ViT: batches {"image": [B, H, W, C] float32, "label": [B] int32}."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.config import config
from mmjax.models.vit import ViT, ViTConfig, vit_forward_flops
from mmjax.objectives.classification import softmax_xent
from mmjax.tasks.base import Task


@config
class ClassificationLossConfig:
    label_smoothing: float = 0.0


class ClassificationTask(Task):
    model_config_cls = ViTConfig
    loss_config_cls = ClassificationLossConfig

    def __init__(self, cfg):
        super().__init__(cfg)
        if cfg.model.num_classes is None:
            raise ValueError("classification needs model.num_classes")
        self.model = ViT(cfg.model)
        self.label_smoothing = cfg.loss.label_smoothing

    def example_batch(self, batch_size):
        m = self.cfg.model
        return {"image": jax.ShapeDtypeStruct((batch_size, m.image_size, m.image_size, m.channels), jnp.float32),
                "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32)}

    def init_params(self, rng):
        images = jnp.zeros(self.example_batch(1)["image"].shape, jnp.float32)
        return self.model.init(rng, images)["params"]

    def loss_fn(self, params, extra, batch, rng):
        logits, _ = self.model.apply({"params": params}, batch["image"], train=True, rngs={"dropout": rng})
        loss, correct = softmax_xent(logits, batch["label"], label_smoothing=self.label_smoothing)
        return jnp.mean(loss), ({"accuracy": jnp.mean(correct)}, extra)

    def eval_fn(self, params, extra, batch):
        logits, _ = self.model.apply({"params": params}, batch["image"], train=False)
        mask = batch["mask"].astype(jnp.float32)
        loss, correct = softmax_xent(logits, batch["label"], mask=mask)
        return {"loss": jnp.sum(loss), "correct": jnp.sum(correct), "count": jnp.sum(mask)}

    def summarize_eval(self, sums):
        n = max(sums["count"], 1.0)
        return {"accuracy": sums["correct"] / n, "loss": sums["loss"] / n, "count": int(sums["count"])}

    def train_flops_per_example(self):
        return 3.0 * vit_forward_flops(self.cfg.model)

    def check_batch(self, batch, step):
        super().check_batch(batch, step)
        labels = np.asarray(batch["label"])
        n = self.cfg.model.num_classes
        if labels.size and (labels.min() < 0 or labels.max() >= n):
            raise ValueError(f"batch for step {step}: labels outside [0, {n}): "
                             f"min {labels.min()}, max {labels.max()}")
