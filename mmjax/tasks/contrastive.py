"""Image–text contrastive training (CLIP softmax or SigLIP sigmoid loss) with zero-shot and
retrieval evaluation.

Batches: {"image": [B, H, W, C] float32, "text_ids": [B, L] int32, "text_len": [B] int32}, and
with `data.text_negatives` (hard negative captions, NegCLIP-style) also "neg_text_ids" [B, L],
"neg_text_len" [B] and "neg_valid" [B] int32 in training batches ([B, K, L], [B, K], [B, K] with
`data.text_negatives_per_text` K > 1).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.config import config
from mmjax.evals import class_embeddings, retrieval_recall, zero_shot_accuracy
from mmjax.models.clip import CLIP, CLIPConfig, l2_normalize
from mmjax.models.vit import vit_forward_flops
from mmjax.tasks.base import Task


@config
class ZeroShotConfig:
    """Zero-shot classification of one label field, e.g. shapes' "color" of single-object scenes."""

    name: str
    label_field: str  # an extra field of the dataset; [N] or [N, K] (then `label_index` is used)
    class_names: tuple[str, ...]
    templates: tuple[str, ...] = ("a photo of a {}.",)
    label_index: int = 0
    only_where: tuple[str, int] | None = None  # (field, value): e.g. ("num_objects", 1)


@config
class ContrastiveLossConfig:
    kind: Literal["clip", "siglip", "siglip_chunked"] = "clip"
    zero_shot: tuple[ZeroShotConfig, ...] = ()
    eval_splits: tuple[str, ...] = ()  # extra splits to evaluate besides data.eval_split


def _text_flops(cfg: CLIPConfig, length: int) -> float:
    """Forward matmul FLOPs of the text tower over `length` tokens (same formula as the ViT)."""
    e = cfg.text.encoder
    d, m = e.width, e.mlp_dim or 4 * e.width
    h = e.num_heads
    dh = e.head_dim or d // h
    hkv = e.num_kv_heads or h
    proj = 2 * d * h * dh + 2 * d * hkv * dh
    return float(e.depth * (2 * length * (proj + 2 * d * m) + 4 * length * length * h * dh))


class ContrastiveTask(Task):
    model_config_cls = CLIPConfig
    loss_config_cls = ContrastiveLossConfig

    def __init__(self, cfg):
        super().__init__(cfg)
        if cfg.data.text_field is None:
            raise ValueError("contrastive training needs data.text_field (e.g. 'caption')")
        if cfg.data.max_text_len > cfg.model.text.max_len:
            raise ValueError(f"data.max_text_len={cfg.data.max_text_len} exceeds the text tower's "
                             f"position table ({cfg.model.text.max_len})")
        if cfg.loss.kind != "clip" and cfg.model.logit_bias_init is None:
            raise ValueError("the SigLIP loss needs model.logit_bias_init (e.g. -10)")
        if cfg.data.text_negatives and cfg.loss.kind == "siglip_chunked":
            raise ValueError("data.text_negatives (hard negative texts) work with the 'clip' and 'siglip' "
                             "losses, not 'siglip_chunked'")
        self.model = CLIP(cfg.model)

    def example_batch(self, batch_size):
        v, length = self.cfg.model.vision, self.cfg.data.max_text_len
        batch = {"image": jax.ShapeDtypeStruct((batch_size, v.image_size, v.image_size, v.channels), jnp.float32),
                 "text_ids": jax.ShapeDtypeStruct((batch_size, length), jnp.int32),
                 "text_len": jax.ShapeDtypeStruct((batch_size,), jnp.int32)}
        if self.cfg.data.text_negatives:
            k = self.cfg.data.text_negatives_per_text
            per = () if k == 1 else (k,)
            batch.update(neg_text_ids=jax.ShapeDtypeStruct((batch_size, *per, length), jnp.int32),
                         neg_text_len=jax.ShapeDtypeStruct((batch_size, *per), jnp.int32),
                         neg_valid=jax.ShapeDtypeStruct((batch_size, *per), jnp.int32))
        return batch

    def init_params(self, rng):
        ex = self.example_batch(1)
        return self.model.init(rng, jnp.zeros(ex["image"].shape), jnp.zeros(ex["text_ids"].shape, jnp.int32))["params"]

    def _embed(self, params, batch, train, rng=None):
        """aux of the model (normalised "image", "text", "temperature", "bias"), plus "neg_text"
        when the batch has negative texts: they go through the text tower in the same call,
        interleaved with the positives ([B, 1 + K, L] → [(1 + K)B, L]), so each row stays on its device;
        "neg_text" is [B, E] for one negative per text, [B, K, E] for K."""
        ids, lengths = batch["text_ids"], batch["text_len"]
        negatives = "neg_text_ids" in batch
        if negatives:
            b, length = ids.shape
            neg_ids, neg_len = batch["neg_text_ids"], batch["neg_text_len"]
            per = neg_ids.shape[1:-1]  # () or (K,)
            k = neg_ids.shape[1] if per else 1
            ids = jnp.concatenate([ids[:, None], neg_ids.reshape(b, k, length)], axis=1).reshape((1 + k) * b, length)
            lengths = jnp.concatenate([lengths[:, None], neg_len.reshape(b, k)], axis=1).reshape((1 + k) * b)
        valid = jnp.arange(ids.shape[1])[None, :] < lengths[:, None]
        rngs = {"dropout": rng} if rng is not None else {}
        _, _, aux = self.model.apply({"params": params}, batch["image"], ids, valid=valid, train=train, rngs=rngs)
        if negatives:
            groups = aux["text"].reshape(b, 1 + k, -1)
            aux = {**aux, "text": groups[:, 0], "neg_text": groups[:, 1:].reshape(b, *per, -1)}
        return aux

    def loss_fn(self, params, extra, batch, rng):
        from mmjax.objectives import contrastive
        aux = self._embed(params, batch, True, rng)
        zi, zt, t, b = aux["image"], aux["text"], aux["temperature"], aux["bias"]
        neg = {"zt_neg": aux["neg_text"], "neg_valid": batch["neg_valid"]} if "neg_text" in aux else {}
        if self.cfg.loss.kind == "clip":
            loss, metrics = contrastive.clip_loss(zi, zt, t, **neg)
        elif self.cfg.loss.kind == "siglip":
            loss, metrics = contrastive.siglip_loss(zi, zt, t, b, **neg)
        else:
            mesh = jax.sharding.get_abstract_mesh()
            loss, metrics = contrastive.siglip_loss_chunked(zi, zt, t, b, mesh=mesh)
        return loss, (dict(metrics, temperature=t, bias=b), extra)

    def eval_fn(self, params, extra, batch):
        aux = self._embed(params, batch, False)
        return {"image": aux["image"], "text": aux["text"]}

    def train_flops_per_example(self):
        c = self.cfg
        # the negative texts of an example go through the tower too
        texts = 1 + (c.data.text_negatives_per_text if c.data.text_negatives else 0)
        return 3.0 * (vit_forward_flops(c.model.vision) + texts * _text_flops(c.model, c.data.max_text_len))

    def check_batch(self, batch, step):
        super().check_batch(batch, step)
        v = self.cfg.model.text.vocab_size
        for key in ("text_ids", "neg_text_ids"):
            ids = np.asarray(batch.get(key, np.zeros((0,), np.int32)))
            if ids.size and (ids.min() < 0 or ids.max() >= v):
                raise ValueError(f"batch for step {step}: {key} outside [0, {v}): min {ids.min()}, "
                                 f"max {ids.max()}; the tokenizer does not match the text tower")

    # ------------------------------------------------------------------ evaluation
    def _embed_texts(self, params, texts: list[str]) -> np.ndarray:
        from mmjax.data.pipeline import tokenizer_for
        d = self.cfg.data
        tok = tokenizer_for(d)
        ids, lengths = tok.encode_batch(texts, max_len=d.max_text_len, add_bos=d.text_add_bos, add_eos=d.text_add_eos)
        if not hasattr(self, "_text_step"):
            def f(params, ids, lengths):
                valid = jnp.arange(ids.shape[1])[None, :] < lengths[:, None]
                return l2_normalize(self.model.apply({"params": params}, ids, valid=valid, method=CLIP.encode_text))
            self._text_step = jax.jit(f)
        out = []
        for i in range(0, len(texts), 256):  # fixed chunks: one compiled shape (the last is padded)
            chunk_ids, chunk_len = ids[i:i + 256], lengths[i:i + 256]
            n = len(chunk_ids)
            pad = 256 - n
            chunk_ids = np.pad(chunk_ids, ((0, pad), (0, 0)), constant_values=tok.pad_id)
            chunk_len = np.pad(chunk_len, (0, pad), constant_values=1)
            out.append(np.asarray(self._text_step(params, chunk_ids, chunk_len))[:n])
        return np.concatenate(out)

    def evaluate(self, params, extra, mesh):
        from jax.experimental import multihost_utils

        from mmjax import sharding as shd
        from mmjax.data import pipeline
        from mmjax.evals import collect
        if not hasattr(self, "_eval_step"):
            self._eval_step = jax.jit(self.eval_fn)
        results: dict[str, float] = {}
        c = self.cfg
        for split in (c.data.eval_split, *c.loss.eval_splits):
            def run(local):
                out = self._eval_step(params, extra, shd.make_global_batch(
                    {k: v for k, v in local.items() if k in ("image", "text_ids", "text_len")}, mesh))
                out = multihost_utils.process_allgather(out, tiled=True)
                gathered = multihost_utils.process_allgather(
                    {k: v for k, v in local.items() if k not in ("image", "text_ids", "text_len")}, tiled=True)
                return {**out, **gathered}

            batches = pipeline.eval_batches(c.data, split=split, global_batch_size=c.train.eval_batch_size)
            emb = collect(run, ({**b, "mask": np.asarray(multihost_utils.process_allgather(b["mask"], tiled=True))}
                                for b in batches))
            for k, v in retrieval_recall(emb["image"], emb["text"]).items():
                results[f"{split}/{k}"] = v
            for zs in c.loss.zero_shot:
                labels = emb[zs.label_field]
                labels = labels[:, zs.label_index] if labels.ndim == 2 else labels
                keep = np.ones(len(labels), bool)
                if zs.only_where is not None:
                    keep = emb[zs.only_where[0]] == zs.only_where[1]
                classes = class_embeddings(lambda texts: self._embed_texts(params, texts), zs.class_names,
                                           zs.templates)
                acc = zero_shot_accuracy(emb["image"][keep], labels[keep], classes,
                                         ks=(1, min(5, len(zs.class_names))))
                results[f"{split}/zeroshot_{zs.name}_top1"] = acc["top1"]
                results[f"{split}/zeroshot_{zs.name}_count"] = acc["count"]
            results[f"{split}/count"] = len(emb["image"])
        return results
