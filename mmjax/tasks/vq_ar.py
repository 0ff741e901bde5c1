"""Text-conditional autoregressive generation over VQ image tokens (LlamaGen's recipe).

A frozen VQ tokenizer (an `autoencoder` run with model.kind="vq", named by loss.tokenizer_workdir)
turns each image into an h×w grid of codes on device, inside the loss; the decoder LM models

    seq = [caption (right-aligned in Lc slots, pads hidden) | BOI | c_0, c_1, ..., c_{hw−1}]
    loss = −(1 / hw) Σ_i log p(c_i | caption, c_<i)                 image codes only (nats per code)

in one vocabulary (`ImageTextVocab`): text ids [0, Vt), then BOI, EOI, NULL, then the K codes.
Every example's caption is replaced by the NULL condition (one NULL token before BOI) with
probability loss.cond_dropout (0.1), so the same model is also the unconditional model that
classifier-free guidance needs.

Positions: 2D RoPE (`LMConfig.rope_2d`) with text slot j at (j, j), BOI at (Lc, Lc) and code
(r, c) at (Lc + 1 + r, Lc + 1 + c): the grid keeps its rows and columns apart. Since captions are
right-aligned, BOI and every code sit at fixed positions whatever the caption's length.

Sampling (`sample`): prompts caption + BOI, null prompts NULL + BOI, one doubled batch through
`mmjax.decode.generate` with cfg_scale s: logits = uncond + s·(cond − uncond), then temperature /
top-k / top-p, constrained to the code ids, hw tokens, on device; codes → pixels with the
tokenizer's decoder. cfg_scale None: the conditional model alone (no doubled batch).

Class-conditional (loss.class_field, LlamaGen's c2i): the condition is one class token instead of
the caption, [CLASS_k | BOI | codes] with k an integer batch field (e.g. "num_objects" on shapes)
and the class ids after the codes in the vocabulary; dropout, NULL, CFG and sampling are the same.

Evaluation: test NLL per code (conditional, and with the NULL condition), bits/dim of the codes
(the NLL of an image's hw codes / (3·H·W·ln 2): what coding the tokenizer's version of the image
costs, comparable to the pixel AR's bits/dim as a rate, not as a likelihood of the pixels); then
images generated from the first loss.eval_prompts captions of each split, with and without CFG
(and for each scale of loss.cfg_sweep on data.eval_split), read back by the shapes probe: the
attribute accuracy against the scene the caption describes, FD-probe and KID-probe against the
real images of those captions, and the sampling time per image.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.config import ConfigError, config
from mmjax.models.lm import LM, LMConfig, lm_forward_flops
from mmjax.objectives.lm import lm_cross_entropy, next_token_targets
from mmjax.tasks.lm import NextTokenTask

DIRECTIONS = ("caption_to_image", "image_to_caption")
PROBE_ATTRIBUTES = ("color", "shape", "size", "position", "count", "all")  # captions never name the background


class _FieldAsInt32(grain.transforms.Map):
    """Casts one integer field to int32 (the decoder hands scalar labels over as int64)."""

    def __init__(self, field: str):
        self.field = field

    def map(self, example):
        return {**example, self.field: np.asarray(example[self.field], np.int32)}


# A class field the shapes probe reads back: class-conditional samples are scored on that attribute.
CLASS_PROBE_ATTRIBUTE = {"num_objects": "count", "background": "background"}


@dataclasses.dataclass(frozen=True)
class ImageTextVocab:
    """One vocabulary for text and image codes: text ids [0, text_size), then the sentinels BOI
    (begin of image), EOI (end of image) and NULL (the dropped condition), then codebook_size codes,
    then num_classes class tokens (class-conditional runs)."""

    text_size: int
    codebook_size: int
    num_classes: int = 0

    @property
    def boi(self) -> int:
        return self.text_size

    @property
    def eoi(self) -> int:
        return self.text_size + 1

    @property
    def null(self) -> int:
        return self.text_size + 2

    @property
    def code_offset(self) -> int:
        return self.text_size + 3

    @property
    def class_offset(self) -> int:
        return self.code_offset + self.codebook_size

    @property
    def size(self) -> int:
        return self.class_offset + self.num_classes

    @property
    def code_range(self) -> tuple[int, int]:
        return self.code_offset, self.class_offset


@config
class VQARLossConfig:
    """tokenizer_workdir: the VQ tokenizer's run directory (task 'autoencoder', model.kind 'vq').
    directions: the orders trained, each training example in one of them (caption_rate): "caption_to_image"
      ([caption | BOI | codes]) and "image_to_caption" ([BOI | codes | EOI | caption | EOS]);
      with both, caption-first sequences end with EOI too (one model, both ways: Chameleon).
    all_tokens: every real token after the first is a target, in both orders (Chameleon); False:
      only what the order conditions (the codes and EOI after a caption, the caption and EOS after
      an image).
    caption_rate: with both directions, the probability that a training example is read image →
      caption (else caption → image).
    caption_targets: what image → caption sequences teach the model to write: "dataset" (each example's
      own caption, in the random object order and phrasing of the dataset's grammar) or
      "reading_order" (`shapes.reading_order_caption`: the count, then each object in reading order of
      its cell as "<cell> there is <size> <color> <shape>"; built from the label fields). Caption →
      image always conditions on the dataset's captions.
    image_prefix: image → caption reads the image block [BOI | codes | EOI] both ways (a prefix-LM
      mask, PaliGemma), so every code sees the whole object before a word names it; the codes are
      not targets in that order (all_tokens off), so nothing is leaked. Caption → image stays causal.
    cond_dropout: probability that a training example's caption becomes the NULL condition.
    cfg_scale, temperature, top_k, top_p: the pinned sampler (cfg_scale None: no guidance).
    eval_prompts: captions of each split whose images are generated and probed at evaluation (0: none).
    eval_splits: splits besides data.eval_split whose captions are also sampled (e.g. test_novel).
    cfg_sweep: guidance scales also evaluated on data.eval_split (the pinned scale and no-CFG always are).
    samples: images written to images/samples_<step>.png (the first test captions, with the sampler).
    probe: read generated images back with the shapes probe (off: sampling time and codes used only).
    class_field: class-conditional instead (no caption): the integer batch field (listed in
      data.extra_fields) whose value k in [0, num_classes) becomes the one condition token CLASS_k."""

    tokenizer_workdir: str = ""
    directions: tuple[str, ...] = ("caption_to_image",)
    all_tokens: bool = False
    image_prefix: bool = False
    caption_rate: float = 0.5
    caption_targets: str = "dataset"
    cond_dropout: float = 0.1
    z_loss: float = 0.0
    cfg_scale: float | None = 3.0
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    eval_prompts: int = 500
    eval_splits: tuple[str, ...] = ()
    cfg_sweep: tuple[float, ...] = ()
    samples: int = 16
    sample_seed: int = 0
    probe: bool = True
    class_field: str | None = None
    num_classes: int = 0


def load_vq_tokenizer(workdir: str):
    """(Autoencoder model, params as numpy, the run's config) of a VQ tokenizer run directory."""
    from mmjax.experiment import load_run
    from mmjax.models.autoencoder import Autoencoder
    if not workdir:
        raise ConfigError("loss.tokenizer_workdir is empty: name a VQ tokenizer run directory "
                          "(e.g. runs/vqgan_shapes from experiments/vqgan_shapes.py)")
    try:
        cfg, _, params = load_run(workdir)
    except FileNotFoundError as e:
        raise ConfigError(f"loss.tokenizer_workdir: {e}") from None
    if cfg.task != "autoencoder" or cfg.model.kind != "vq":
        raise ConfigError(f"loss.tokenizer_workdir={workdir} is a {cfg.task!r} run"
                          f"{' of kind ' + repr(cfg.model.kind) if cfg.task == 'autoencoder' else ''}, "
                          "not a VQ tokenizer (task 'autoencoder', model.kind 'vq')")
    # The autoencoder task keeps the discriminator beside the generator; only the generator tokenizes.
    params = params.get("generator", params)
    return Autoencoder(cfg.model), params, cfg


class VQARTask(NextTokenTask):
    model_config_cls = LMConfig
    loss_config_cls = VQARLossConfig

    def __init__(self, cfg):
        super().__init__(cfg)
        d, m, loss = cfg.data, cfg.model, cfg.loss
        self.class_field = loss.class_field
        if self.class_field is not None:
            if loss.num_classes < 1 or self.class_field not in d.extra_fields or d.text_field is not None:
                raise ConfigError(f"loss.class_field={self.class_field!r} makes the run class-conditional: set "
                                  "loss.num_classes >= 1, list the field in data.extra_fields and leave "
                                  f"data.text_field None (got num_classes={loss.num_classes}, extra_fields="
                                  f"{d.extra_fields}, text_field={d.text_field!r})")
            if loss.directions != ("caption_to_image",):
                raise ConfigError("a class-conditional run generates images from classes: loss.directions must "
                                  "be ('caption_to_image',)")
        elif d.text_field is None:
            raise ConfigError("the vq_ar task is caption-conditional: set data.text_field (e.g. 'caption'), or "
                              "loss.class_field for a class-conditional run")
        if d.text_add_bos or d.text_add_eos:
            raise ConfigError("the vq_ar task ends the caption with BOI itself: set data.text_add_bos=False and "
                              "data.text_add_eos=False")
        if not 0.0 <= loss.cond_dropout < 1.0 or loss.z_loss < 0 or loss.eval_prompts < 0 or loss.samples < 0:
            raise ConfigError("loss.cond_dropout must lie in [0, 1), loss.z_loss, eval_prompts and samples >= 0")
        if (loss.cfg_scale is not None or loss.cfg_sweep) and loss.cond_dropout == 0:
            raise ConfigError("classifier-free guidance (loss.cfg_scale / cfg_sweep) needs loss.cond_dropout > 0: "
                              "the NULL condition is never trained otherwise")
        bad = [x for x in loss.directions if x not in DIRECTIONS]
        if bad or not loss.directions or len(set(loss.directions)) != len(loss.directions):
            raise ConfigError(f"loss.directions={loss.directions!r} must be distinct names from {DIRECTIONS}")
        if "caption_to_image" not in loss.directions and (loss.cfg_scale is not None or loss.cfg_sweep):
            raise ConfigError("loss.cfg_scale / cfg_sweep guide caption → image sampling, which "
                              "loss.directions does not train; set loss.cfg_scale=None and cfg_sweep=()")
        if not 0.0 < loss.caption_rate < 1.0:
            raise ConfigError(f"loss.caption_rate={loss.caption_rate} must lie in (0, 1): each direction "
                              "needs examples")
        if loss.image_prefix and ("image_to_caption" not in loss.directions or loss.all_tokens):
            raise ConfigError("loss.image_prefix makes the image block of image → caption sequences attend both "
                              "ways: it needs 'image_to_caption' in loss.directions and loss.all_tokens=False "
                              "(codes that see the codes after them cannot also be their targets)")
        from mmjax.data.vlm import CAPTION_TARGETS, ReadingOrderTarget
        if loss.caption_targets not in CAPTION_TARGETS:
            raise ConfigError(f"loss.caption_targets={loss.caption_targets!r} must be one of {CAPTION_TARGETS}")
        if loss.caption_targets == "reading_order":
            from mmjax.evals.probe import LABEL_FIELDS
            missing = [k for k in LABEL_FIELDS if k not in d.extra_fields]
            if "image_to_caption" not in loss.directions or d.name != "shapes" or missing:
                raise ConfigError("loss.caption_targets='reading_order' writes the captions of image → caption from "
                                  "a shapes scene's labels: it needs 'image_to_caption' in loss.directions, "
                                  f"data.name='shapes' and the label fields in data.extra_fields (missing {missing})")
            self.example_transform = ReadingOrderTarget()
        elif self.class_field is not None:
            self.example_transform = _FieldAsInt32(self.class_field)
        if not m.rope_2d:
            raise ConfigError("the vq_ar task places codes on their grid with 2D RoPE: set model.rope_2d=True")
        self.ae, self.ae_params, ae_cfg = load_vq_tokenizer(loss.tokenizer_workdir)
        if d.image_size != ae_cfg.data.image_size or d.value_range != ae_cfg.data.value_range:
            raise ConfigError(f"data.image_size={d.image_size}, value_range={d.value_range!r} must be the "
                              f"tokenizer's ({ae_cfg.data.image_size}, {ae_cfg.data.value_range!r})")
        self.grid = ae_cfg.model.latent_shape(d.image_size)                      # (h, w)
        self.codes = self.grid[0] * self.grid[1]
        from mmjax.data.pipeline import tokenizer_for
        self.tokenizer = None if self.class_field else tokenizer_for(d)
        self.vocab = ImageTextVocab(self.tokenizer.vocab_size if self.tokenizer else 0,
                                    ae_cfg.model.quantizer.codebook_size, loss.num_classes if self.class_field else 0)
        if m.vocab_size < self.vocab.size:
            raise ConfigError(f"model.vocab_size={m.vocab_size} is below the {self.vocab.size} ids of text "
                              f"({self.vocab.text_size}) + BOI, EOI, NULL + {self.vocab.codebook_size} codes"
                              + (f" + {self.vocab.num_classes} classes" if self.class_field else ""))
        self.cond_len = 1 if self.class_field else d.max_text_len
        self.both = len(loss.directions) == 2
        # [caption | BOI | codes], or with both orders [BOI | codes | EOI | caption | EOS] (the longer one)
        self.seq_len = self.cond_len + 1 + self.codes + (2 if self.both else 0)
        if m.max_len < self.seq_len:
            raise ConfigError(f"model.max_len={m.max_len} is below the {self.seq_len} positions of a sequence "
                              f"(Lc={self.cond_len} caption slots, {self.codes} codes and the sentinels)")
        top = int(max(self.positions(x).max() for x in loss.directions))
        if m.learned_positions and top >= m.max_len:
            raise ConfigError(f"model.max_len={m.max_len} is too small for the learned position tables: the "
                              f"{' and '.join(loss.directions)} layout places tokens up to position {top} "
                              f"(set max_len >= {top + 1})")
        self.model = LM(m)
        self._probe = None

    # ------------------------------------------------------------------ sequences
    def _image_positions(self, start: int) -> np.ndarray:
        """[hw + 2, 2]: BOI at (s, s), code (r, c) at (s + 1 + r, s + 1 + c), EOI at (s + 1 + m, s + 1 + m),
        m = max(h, w): the next text position after the grid."""
        h, w = self.grid
        r, c = np.divmod(np.arange(h * w), w)
        m = max(h, w)
        return np.concatenate([[[start, start]], np.stack([start + 1 + r, start + 1 + c], 1),
                               [[start + 1 + m, start + 1 + m]]]).astype(np.int32)

    def positions(self, direction: str = "caption_to_image") -> np.ndarray:
        """int32 [T, 2] for every slot of a sequence (2D RoPE; text on the diagonal):
        caption_to_image: text slot j at (j, j), then the image block from Lc (BOI at (Lc, Lc));
        image_to_caption: the same image block from Lc, then text from Lc + 2 + max(h, w).

        The image block sits at the same positions in both orders, so a cell has one row and one
        column embedding (learned_positions) whichever order it is read in, and none of them is also
        a caption slot's (with the block at 0, code rows 1..h would share the caption's (j, j))."""
        lc, t = self.cond_len, self.seq_len
        img = self._image_positions(lc)
        if direction == "caption_to_image":
            pos = np.concatenate([np.repeat(np.arange(lc)[:, None], 2, 1), img])
        else:
            text = img[-1, 0] + 1 + np.arange(t - len(img))
            pos = np.concatenate([img, np.repeat(text[:, None], 2, 1)])
        return pos[:t].astype(np.int32) if len(pos) >= t else np.concatenate(
            [pos, pos[-1] + 1 + np.repeat(np.arange(t - len(pos))[:, None], 2, 1)]).astype(np.int32)

    @property
    def image_prefix_len(self) -> int:
        """Slots of an image → caption sequence that attend both ways: [BOI | codes | EOI] with
        loss.image_prefix, else 0 (causal)."""
        return self.codes + 2 if self.cfg.loss.image_prefix else 0

    def sequences(self, text_ids, text_len, codes, drop):
        """caption_to_image: text_ids [B, Lc] (right-padded), text_len [B], codes [B, h, w], drop bool [B]
        (NULL condition) → (seq int32 [B, T], valid bool [B, T]: False on the hidden pads, weights [B, T]:
        1 on the slots that are targets). T = Lc + 1 + hw (+ EOI and a pad with both orders)."""
        b, lc = text_ids.shape
        v = self.vocab
        src = jnp.arange(lc)[None, :] - (lc - text_len)[:, None]               # right-align the caption
        valid = src >= 0
        cond = jnp.where(valid, jnp.take_along_axis(text_ids, jnp.maximum(src, 0), axis=1), 0)
        last = jnp.arange(lc)[None, :] == lc - 1
        cond = jnp.where(drop[:, None], jnp.where(last, v.null, 0), cond)
        valid = jnp.where(drop[:, None], last, valid)
        # caption tokens after the first are targets only with all_tokens (a dropped caption has none)
        text_w = (src > 0) & ~drop[:, None] & self.cfg.loss.all_tokens
        parts = [cond, jnp.full((b, 1), v.boi, jnp.int32), codes.reshape(b, -1).astype(jnp.int32) + v.code_offset]
        n_img = 1 + self.codes + (1 if self.both else 0)
        if self.both:
            parts += [jnp.full((b, 1), v.eoi, jnp.int32), jnp.zeros((b, 1), jnp.int32)]
        seq = jnp.concatenate(parts, axis=1).astype(jnp.int32)
        tail = self.seq_len - lc - n_img                                         # the trailing pad slot
        valid = jnp.concatenate([valid, jnp.ones((b, n_img), bool), jnp.zeros((b, tail), bool)], axis=1)
        weights = jnp.concatenate([text_w, jnp.zeros((b, 1), bool), jnp.ones((b, n_img - 1), bool),
                                   jnp.zeros((b, tail), bool)], axis=1)
        return seq, valid, weights.astype(jnp.float32)

    def image_first_sequences(self, text_ids, text_len, codes):
        """image_to_caption: [BOI | codes | EOI | caption | EOS | pads] → (seq, valid, weights) [B, T]:
        the caption and EOS are targets (and the codes and EOI with all_tokens); pads trail (causal:
        no real token sees them), so every slot is valid."""
        b, lc = text_ids.shape
        v = self.vocab
        eos = self.tokenizer.eos_id
        j = jnp.arange(lc + 1)[None, :]
        text = jnp.where(j < text_len[:, None], jnp.pad(text_ids, ((0, 0), (0, 1))), 0)
        text = jnp.where(j == text_len[:, None], eos, text)
        seq = jnp.concatenate([jnp.full((b, 1), v.boi, jnp.int32), codes.reshape(b, -1).astype(jnp.int32)
                               + v.code_offset, jnp.full((b, 1), v.eoi, jnp.int32), text], axis=1).astype(jnp.int32)
        img_w = jnp.full((b, self.codes + 1), self.cfg.loss.all_tokens)
        weights = jnp.concatenate([jnp.zeros((b, 1), bool), img_w, j <= text_len[:, None]], axis=1)
        return seq, jnp.ones(seq.shape, bool), weights.astype(jnp.float32)

    def tokenize(self, tok_params, images):
        from mmjax.models.autoencoder import tokenize
        return tokenize(self.ae, tok_params, images)

    # ------------------------------------------------------------------ training
    def example_batch(self, batch_size):
        s = self.cfg.data.image_size
        out = {"image": jax.ShapeDtypeStruct((batch_size, s, s, 3), jnp.float32)}
        if self.class_field:
            return out | {self.class_field: jax.ShapeDtypeStruct((batch_size,), jnp.int32)}
        out |= {"text_ids": jax.ShapeDtypeStruct((batch_size, self.cond_len), jnp.int32),
                "text_len": jax.ShapeDtypeStruct((batch_size,), jnp.int32)}
        if self.cfg.loss.caption_targets == "reading_order":
            out |= {"target_ids": jax.ShapeDtypeStruct((batch_size, self.cond_len), jnp.int32),
                    "target_len": jax.ShapeDtypeStruct((batch_size,), jnp.int32)}
        return out

    def train_iterator(self, *, global_batch_size: int, seed: int):
        from mmjax.data import pipeline
        return pipeline.train_iterator(self.cfg.data, global_batch_size=global_batch_size, seed=seed,
                                       example_transform=self.example_transform)

    def check_batch(self, batch, step):
        super().check_batch(batch, step)
        if self.class_field:
            k = np.asarray(batch[self.class_field])
            if k.size and (k.min() < 0 or k.max() >= self.vocab.num_classes):
                raise ValueError(f"batch for step {step}: {self.class_field!r} holds classes outside "
                                 f"[0, {self.vocab.num_classes}) (min {k.min()}, max {k.max()}): raise "
                                 "loss.num_classes")

    def condition(self, batch):
        """(text_ids [B, Lc], text_len [B]) of a batch: the caption, or the one class token CLASS_k."""
        if self.class_field:
            k = jnp.asarray(batch[self.class_field]).astype(jnp.int32)
            return (k + self.vocab.class_offset)[:, None], jnp.ones_like(k)
        return batch["text_ids"], batch["text_len"]

    def init_params(self, rng):
        return self.model.init(rng, jnp.zeros((1, self.seq_len - 1), jnp.int32),
                               positions=jnp.asarray(self.positions()[None, :-1]))["params"]

    def init_extra(self, params):
        # The frozen tokenizer travels with the state (replicated, never differentiated, checkpointed):
        # the jitted step takes it as an input rather than as constants baked into the program.
        return {"tokenizer": jax.tree.map(jnp.asarray, self.ae_params)}

    def _token_sums(self, params, batch, *, direction, train, rng=None, example_mask=None, extra=None, drop=None):
        """lm_cross_entropy sums of one order ("caption_to_image", "image_to_caption", or "mixed": each
        example's order drawn among loss.directions; drop: the NULL condition per example, drawn with
        loss.cond_dropout when training and not given)."""
        codes = self.tokenize(extra["tokenizer"], batch["image"])
        b = codes.shape[0]
        if drop is None:
            drop = (jax.random.bernoulli(jax.random.fold_in(rng, 1), self.cfg.loss.cond_dropout, (b,))
                    if train and rng is not None else jnp.zeros((b,), bool))
        text_ids, text_len = self.condition(batch)
        if direction == "mixed" and not self.both:
            direction = self.cfg.loss.directions[0]
        parts, pos, prefix = [], [], []
        if direction in ("caption_to_image", "mixed"):
            parts.append(self.sequences(text_ids, text_len, codes, drop))
            pos.append(self.positions("caption_to_image"))
            prefix.append(0)
        if direction in ("image_to_caption", "mixed"):
            if self.cfg.loss.caption_targets == "reading_order":
                text_ids, text_len = batch["target_ids"], batch["target_len"]
            parts.append(self.image_first_sequences(text_ids, text_len, codes))
            pos.append(self.positions("image_to_caption"))
            prefix.append(self.image_prefix_len)
        if direction == "mixed":  # per example, one order or the other
            first = jax.random.bernoulli(jax.random.fold_in(rng, 2), 1.0 - self.cfg.loss.caption_rate, (b,))
            pick = lambda x, y: jnp.where(first.reshape((b,) + (1,) * (x.ndim - 1)), x, y)
            seq, valid, weights = (pick(x, y) for x, y in zip(*parts))
            positions = pick(jnp.broadcast_to(jnp.asarray(pos[0]), (b,) + pos[0].shape), jnp.asarray(pos[1]))
            prefix_len = jnp.where(first, *prefix).astype(jnp.int32)
        else:
            (seq, valid, weights), positions = parts[0], jnp.broadcast_to(jnp.asarray(pos[0]), (b,) + pos[0].shape)
            prefix_len = jnp.full((b,), prefix[0], jnp.int32)
        if example_mask is not None:
            weights = weights * example_mask.astype(jnp.float32)[:, None]
        inputs, targets, w = next_token_targets(seq, weights)
        rngs = {"dropout": rng} if rng is not None else {}
        logits, _ = self.model.apply({"params": params}, inputs, positions=positions[:, :-1],
                                     kv_valid=valid[:, :-1], prefix_len=prefix_len if self.cfg.loss.image_prefix
                                     else None, train=train, rngs=rngs)
        return lm_cross_entropy(logits, targets, w, z_loss=self.cfg.loss.z_loss)

    def loss_fn(self, params, extra, batch, rng):
        s = self._token_sums(params, batch, direction="mixed", train=True, rng=rng, extra=extra)
        tokens = jnp.maximum(s["weight_sum"], 1.0)
        nll = s["nll_sum"] / tokens
        metrics = {"nll": nll, "accuracy": s["correct_sum"] / tokens, "z_loss": s["z_loss_sum"] / tokens}
        return s["loss_sum"] / tokens, (metrics, extra)

    def eval_fn(self, params, extra, batch):
        """Sums over the real examples, per trained order: caption → image with the caption and with the
        NULL condition (nll, nll_null, ...), image → caption (text_nll, ...)."""
        mask = batch["mask"]
        b = mask.shape[0]
        out = {"count": jnp.sum(mask.astype(jnp.float32))}
        kw = {"train": False, "example_mask": mask, "extra": extra}
        if "caption_to_image" in self.cfg.loss.directions:
            cond = self._token_sums(params, batch, direction="caption_to_image", drop=jnp.zeros((b,), bool), **kw)
            null = self._token_sums(params, batch, direction="caption_to_image", drop=jnp.ones((b,), bool), **kw)
            out |= {"nll": cond["nll_sum"], "nll_null": null["nll_sum"], "correct": cond["correct_sum"],
                    "tokens": cond["weight_sum"]}
        if "image_to_caption" in self.cfg.loss.directions:
            t = self._token_sums(params, batch, direction="image_to_caption", **kw)
            out |= {"text_nll": t["nll_sum"], "text_correct": t["correct_sum"], "text_tokens": t["weight_sum"]}
        return out

    def train_flops_per_example(self):
        from mmjax.models.autoencoder import forward_flops
        s = self.cfg.data.image_size
        return 3.0 * lm_forward_flops(self.cfg.model, self.seq_len - 1) + forward_flops(self.ae.config, s) / 2

    # ------------------------------------------------------------------ sampling
    def prompts(self, captions_ids) -> tuple[list[np.ndarray], np.ndarray]:
        """Caption id lists → (prompts caption + BOI, positions [B, Lc + 1 + hw, 2] in generate's layout:
        a prompt of length L at positions Lc − L + 1 .. Lc, then the codes' grid positions)."""
        pos = self.positions()
        prompts, rows = [], []
        for ids in captions_ids:
            ids = np.asarray(ids, np.int32)
            if len(ids) > self.cond_len:
                raise ValueError(f"a caption of {len(ids)} tokens is longer than the {self.cond_len} condition "
                                 "slots (data.max_text_len)")
            prompts.append(np.append(ids, self.vocab.boi).astype(np.int32))
            lp = len(ids) + 1
            rows.append(np.concatenate([pos[self.cond_len + 1 - lp: self.cond_len + 1], pos[self.cond_len + 1:],
                                        np.zeros((self.cond_len + 1 - lp, 2), np.int32)]))
        return prompts, np.stack(rows)

    def sample_codes(self, params, captions_ids, *, rng, cfg_scale=None, temperature=1.0, top_k=None,
                     top_p=None, mesh=None) -> np.ndarray:
        """Codes [B, h, w] drawn for each caption (id lists) on device; cfg_scale None: no guidance."""
        from mmjax.decode import generate
        prompts, pos = self.prompts(captions_ids)
        kw = {}
        if cfg_scale is not None:  # the null condition: [NULL, BOI], one prompt shared by every row
            null_prompts, null_pos = self.prompts([[self.vocab.null]])
            kw = {"cfg_scale": float(cfg_scale), "null_prompts": null_prompts, "null_positions": null_pos}
        out = generate(self.model, params, prompts, max_new_tokens=self.codes, temperature=temperature, top_k=top_k,
                       top_p=top_p, rng=rng, token_range=self.vocab.code_range, positions=pos, mesh=mesh, **kw)
        return (out.tokens - self.vocab.code_offset).reshape(-1, *self.grid)

    def decode_codes(self, codes, tok_params=None) -> np.ndarray:
        """Codes [B, h, w] → images [B, H, W, 3] in the data's range ([−1, 1]) through the tokenizer's decoder."""
        from mmjax.models.autoencoder import detokenize
        if not hasattr(self, "_detok"):
            self._detok = jax.jit(lambda p, c: detokenize(self.ae, p, c))
        p = self.ae_params if tok_params is None else tok_params
        return np.asarray(jnp.clip(self._detok(p, jnp.asarray(codes)), -1.0, 1.0))

    def condition_ids(self, conditions) -> list[list[int]]:
        """Caption strings (or class ids, class-conditional) → the condition's token ids per row."""
        if self.class_field:
            bad = [k for k in conditions if not 0 <= int(k) < self.vocab.num_classes]
            if bad:
                raise ValueError(f"classes {bad} are outside [0, {self.vocab.num_classes}) "
                                 f"(this run's {self.class_field!r} classes)")
            return [[self.vocab.class_offset + int(k)] for k in conditions]
        if any(not isinstance(c, str) for c in conditions):
            raise ValueError("this run is caption-conditional: give captions (strings), not classes")
        return [self.tokenizer.encode(c) for c in conditions]

    def sample(self, params, conditions: list, *, rng, cfg_scale=None, temperature=1.0, top_k=None,
               top_p=None, mesh=None) -> np.ndarray:
        """Images [B, H, W, 3] in [−1, 1] generated for caption strings (class ids: class-conditional)."""
        ids = self.condition_ids(conditions)
        return self.decode_codes(self.sample_codes(params, ids, rng=rng, cfg_scale=cfg_scale, temperature=temperature,
                                                   top_k=top_k, top_p=top_p, mesh=mesh))

    def caption_images(self, params, images, *, tok_params=None, mesh=None) -> list[str]:
        """Greedy captions of images [B, H, W, 3] (the data's range): [BOI | codes | EOI] as the prompt,
        then text ids only (EOS ends a caption), decoded to strings."""
        from mmjax.decode import generate
        if "image_to_caption" not in self.cfg.loss.directions:
            raise ValueError("this run was not trained image → caption (loss.directions)")
        p = self.ae_params if tok_params is None else tok_params
        if not hasattr(self, "_tok"):
            self._tok = jax.jit(self.tokenize)
        codes = np.asarray(self._tok(p, jnp.asarray(images))).reshape(len(images), -1)
        v, tok = self.vocab, self.tokenizer
        prompts = np.concatenate([np.full((len(codes), 1), v.boi), codes + v.code_offset,
                                  np.full((len(codes), 1), v.eoi)], axis=1).astype(np.int32)
        never = tuple(i for i in (tok.bos_id, tok.pad_id) if i is not None and i != tok.eos_id)
        out = generate(self.model, params, prompts, max_new_tokens=self.cond_len + 1, eos_id=tok.eos_id,
                       pad_id=tok.pad_id, token_range=(0, v.text_size), disallowed_ids=never,
                       positions=self.positions("image_to_caption")[None], mesh=mesh,
                       prefix_len=self.image_prefix_len or None)
        return [tok.decode(r[prompts.shape[1]:]) for r in out.sequences]

    # ------------------------------------------------------------------ evaluation
    def probe(self):
        if self._probe is None:
            from mmjax.evals.probe import load_or_train_probe
            self._probe = load_or_train_probe(self.cfg.data)
        return self._probe

    def prompt_set(self, split: str, n: int):
        """The first n examples of a split: caption id lists, real images, label fields, caption strings."""
        from mmjax.data import pipeline
        from mmjax.evals.probe import LABEL_FIELDS
        fields = tuple(dict.fromkeys(LABEL_FIELDS + ((self.class_field,) if self.class_field else ())))
        fields = tuple(k for k in fields if k in self.cfg.data.extra_fields)
        ids, images, labels, texts = [], [], {k: [] for k in fields}, []
        for batch in pipeline.eval_batches(self.cfg.data, split=split, global_batch_size=min(n, 500),
                                           keep_fields=fields):
            keep = np.asarray(batch["mask"], bool)
            for row in np.nonzero(keep)[0]:
                if self.class_field:
                    k = int(batch[self.class_field][row])
                    ids.append(np.asarray([self.vocab.class_offset + k], np.int32))
                    texts.append(f"{self.class_field} {k}")
                else:
                    ids.append(np.asarray(batch["text_ids"][row][: batch["text_len"][row]]))
                    texts.append(self.tokenizer.decode(ids[-1]))
                images.append(np.asarray(batch["image"][row]))
                for k in fields:
                    labels[k].append(np.asarray(batch[k][row]))
            if len(ids) >= n:
                break
        return ids[:n], np.stack(images[:n]), {k: np.stack(v[:n]) for k, v in labels.items()}, texts[:n]

    def score_samples(self, params, split: str, cfg_scale, *, extra=None, mesh=None) -> dict[str, float]:
        """Probe accuracy, FD-probe and KID-probe of images generated for the split's first captions
        (class-conditional: the accuracy of the attribute the class fixes, when the probe reads it)."""
        from mmjax.evals.images import frechet_distance, kid
        c = self.cfg.loss
        ids, real, labels, _ = self.prompt_set(split, c.eval_prompts)
        t0 = time.perf_counter()
        codes = self.sample_codes(params, ids, rng=jax.random.PRNGKey(c.sample_seed), cfg_scale=cfg_scale,
                                  temperature=c.temperature, top_k=c.top_k, top_p=c.top_p, mesh=mesh)
        images = self.decode_codes(codes, None if extra is None else extra["tokenizer"])
        out = {"seconds_per_image": (time.perf_counter() - t0) / len(ids)}
        if c.probe:
            probe = self.probe()
            acc = probe.attribute_accuracy(images, labels)
            if not self.class_field:
                out |= {f"probe_{k}": float(acc[k]) for k in PROBE_ATTRIBUTES}
            elif self.class_field in CLASS_PROBE_ATTRIBUTE:
                out["class_accuracy"] = float(acc[CLASS_PROBE_ATTRIBUTE[self.class_field]])
            f_gen, f_real = probe.features(images), probe.features(real)
            out["fd_probe"] = float(frechet_distance(f_gen, f_real))
            out["kid_probe"] = float(kid(f_gen, f_real)[0])
        out["codes_used"] = len(np.unique(codes))
        return out

    def evaluate(self, params, extra, mesh):
        results = super().evaluate(params, extra, mesh)
        c, d = self.cfg.loss, self.cfg.data
        if c.eval_prompts and "image_to_caption" in c.directions:
            from mmjax.data.vlm import caption_attribute_accuracy, labels_of
            for split in (d.eval_split,) + tuple(c.eval_splits):
                prefix = "" if split == d.eval_split else f"{split}/"
                _, real, labels, _ = self.prompt_set(split, c.eval_prompts)
                captions = self.caption_images(params, real, tok_params=extra["tokenizer"], mesh=mesh)
                scenes = [labels_of({k: v[i] for k, v in labels.items()}) for i in range(len(captions))]
                for k, v in caption_attribute_accuracy(captions, scenes).items():
                    results[f"{prefix}captions/{k}"] = v
                results[f"{prefix}captions/samples"] = captions[:8]
        if c.eval_prompts and "caption_to_image" in c.directions:
            for split in (d.eval_split,) + tuple(c.eval_splits):
                prefix = "" if split == d.eval_split else f"{split}/"
                scales = {"cfg": c.cfg_scale, "nocfg": None}
                if split == d.eval_split:
                    scales.update({f"cfg{s:g}": s for s in c.cfg_sweep})
                for name, scale in scales.items():
                    if name == "cfg" and scale is None:
                        continue
                    for k, v in self.score_samples(params, split, scale, extra=extra, mesh=mesh).items():
                        results[f"{prefix}{name}/{k}"] = v
        return results

    def summarize_eval(self, sums):
        out = {"count": int(sums["count"])}
        if "tokens" in sums:
            tokens = max(sums["tokens"], 1.0)
            nll = sums["nll"] / tokens
            pixels = 3 * self.cfg.data.image_size ** 2
            # codes per image × nats per code over the image's sub-pixels; with both orders the target
            # slots also hold EOI, which is nearly free: the rate of the codes alone is what is reported
            per = self.codes + (1 if self.both else 0)
            out |= {"nll_per_code": nll, "nll_per_code_null": sums["nll_null"] / tokens,
                    "bits_per_dim": nll * per / (pixels * math.log(2)), "code_accuracy": sums["correct"] / tokens}
        if "text_tokens" in sums:
            tokens = max(sums["text_tokens"], 1.0)
            out |= {"caption_nll": sums["text_nll"] / tokens, "caption_perplexity": math.exp(sums["text_nll"] / tokens),
                    "caption_token_accuracy": sums["text_correct"] / tokens}
        return out

    def save_eval_artifacts(self, params, extra, mesh, directory, step):
        """images/samples_<step>.png: images for the first `loss.samples` test captions (the pinned
        sampler), each beside the real image of that caption; the captions in samples_<step>.txt."""
        from mmjax.data.grid import save_image_grid
        c = self.cfg.loss
        if c.samples <= 0 or "caption_to_image" not in c.directions:
            return
        ids, real, _, texts = self.prompt_set(self.cfg.data.eval_split, c.samples)
        codes = self.sample_codes(params, ids, rng=jax.random.PRNGKey(c.sample_seed + step), cfg_scale=c.cfg_scale,
                                  temperature=c.temperature, top_k=c.top_k, top_p=c.top_p, mesh=mesh)
        images = self.decode_codes(codes, extra["tokenizer"])
        path = Path(directory) / "images" / f"samples_{step:06d}.png"
        pairs = np.stack([images, real], 1).reshape(-1, *images.shape[1:])   # sample, then the real image
        save_image_grid(pairs, path, ncols=8, value_range=(-1, 1))
        path.with_suffix(".txt").write_text("".join(f"{i}: {t}\n" for i, t in enumerate(texts)))


__all__ = ["CLASS_PROBE_ATTRIBUTE", "ImageTextVocab", "VQARLossConfig", "VQARTask", "load_vq_tokenizer"]
