"""Visual question answering and captioning with a LLaVA-style VLM (`mmjax.models.vlm`).

Examples become sequences on the host (`mmjax.data.vlm.ShapesToVLM`, passed to the pipeline as
this task's example transform):

    ids            [B, T]  [bos] <image>×N question "\\n" answer [eos] [pad ...]
    loss_weights   [B, T]  1 on the answer tokens and their eos, else 0 (aligned with ids)
    prefix_len     [B]     positions before the answer (attention="prefix" only)
    image [B, H, W, C], or crops [B, 1 + g², S, S, C] with multi-crop (data.multi_crop_grid = g)

The loss is the LM task's masked next-token cross-entropy (`mmjax.objectives.lm`), so image,
prompt and padding positions leave it through the weights:

    inputs, targets, w = next_token_targets(ids, loss_weights)     (w_t = loss_weights_{t+1})
    loss = Σ w·(−log p(targets | image, inputs)) / Σ w             over the global batch

Evaluation on `data.eval_split` and each of `loss.eval_splits` (e.g. "test_novel"): the answer
tokens' perplexity and token accuracy, then greedy answers from `vlm.generate` on ids[:prefix_len],
decoded and normalised: exact-match accuracy overall and per question group (`vqa_accuracy`), or
for captioning the attributes parsed back from the generated captions
(`caption_attribute_accuracy` against the scene's label fields). One question per example, drawn
with a fixed seed, so every evaluation scores the same questions.

Training stages are optimizer settings, not code: `optim.freeze` regexes over the param paths
vision/..., projector/..., lm/... (stage 1: projector only; stage 2: projector + LM; joint: all).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.config import config
from mmjax.models.lm import lm_forward_flops
from mmjax.models.vit import vit_forward_flops
from mmjax.models.vlm import VLM, VLMConfig, check_image_tokens, image_tokens_per_image, vlm_multicrop_layout
from mmjax.objectives.lm import lm_cross_entropy, next_token_targets
from mmjax.tasks.lm import NextTokenTask

MULTICROP_TOKENS = ("<im_start>", "<im_end>", "<im_col>")
LABEL_FIELDS = ("num_objects", "shape", "color", "size", "position")


@config
class VLMLossConfig:
    """The sequences, the loss and the evaluation of the vlm task.

    sequence: "vqa" (one question per example, drawn per step), "vqa_turns" (every question of the
      example as turns of one sequence, in an order drawn per step; evaluated one question per
      prompt, as "vqa"), "vqa_packed" (the same turns, each seeing only the image and itself at a
      single question's positions: per turn exactly the "vqa" sequence, for one image's cost; causal
      attention only) or "caption" (prompt `caption_prompt`, answer the caption).
    max_len: T, the padded sequence length (image block included).
    eval_max_len: T of the evaluation sequences (None: max_len); vqa_turns trains on long sequences
      but is scored one question per prompt, which needs far fewer positions.
    caption_rate: with vqa_turns / vqa_packed, the fraction of training examples that are the caption
      turn instead (`ShapesToVLM.caption_rate`); the run is then scored on both: VQA as usual, and
      its captions (the caption prompt alone, at the positions training gave it) under "caption/".
    prompt_template, caption_prompt, system: as `ShapesToVLM` (the template ends the prompt, so the
      answer starts after its separator).
    max_answer_tokens: greedy tokens generated per question at evaluation (eos included).
    caption_tokens: greedy tokens generated per caption at evaluation (None: max_answer_tokens).
    answer_position: A, the position of every answer's first token (sequences "vqa", "vqa_packed",
      "caption"): the prompt is placed just before it, so each image token lies at one RoPE distance
      from the answer whatever the prompt's length (`mmjax.data.vlm`); None: contiguous positions.
      Needs A ≥ the image block's end + the longest prompt (a longer prompt fails loudly).
    eval_splits: splits evaluated besides data.eval_split (results prefixed "<split>/").
    eval_generate: generate and score answers (off: perplexity and token accuracy only).
    eval_seed: the seed of the question drawn per eval example.
    eval_max_examples: score only the first batches of each split, until this many examples (None: all).
    caption_targets: what caption turns answer: "dataset" (the example's caption, objects in a random
      order and phrasing) or "reading_order" (`shapes.reading_order_caption` of its labels: the count,
      then each object in reading order of its cell, "<cell> there is <size> <color> <shape>").
    all_questions_of: question kinds of `shapes.QUESTION_KINDS` trained on every question of that kind a
      scene answers (`ShapesToVLM.all_questions_of`; vqa_turns / vqa_packed): e.g. ("neighbour",),
      3.4% of the stored training questions. Evaluation still asks the stored questions.
    tokenizer_field: the text field a dataset BPE ("bpe:<dataset>:<V>") is trained on; "caption"
      makes it the LM task's tokenizer, so an LM run's embeddings fit (init_from).
    """

    sequence: Literal["vqa", "vqa_turns", "vqa_packed", "caption"] = "vqa"
    max_len: int = 48
    eval_max_len: int | None = None
    caption_rate: float = 0.0
    prompt_template: str = "{prompt}\n"
    caption_prompt: str = "describe the image."
    system: str = ""
    z_loss: float = 0.0
    max_answer_tokens: int = 6
    caption_tokens: int | None = None
    answer_position: int | None = None
    eval_splits: tuple[str, ...] = ()
    eval_generate: bool = True
    eval_seed: int = 0
    eval_max_examples: int | None = None
    tokenizer_field: str = "caption"
    caption_targets: str = "dataset"
    all_questions_of: tuple[str, ...] = ()


class VLMTask(NextTokenTask):
    model_config_cls = VLMConfig
    loss_config_cls = VLMLossConfig

    def __init__(self, cfg):
        super().__init__(cfg)
        from mmjax.data.vlm import ShapesToVLM, vlm_tokenizer
        m, d, loss = cfg.model, cfg.data, cfg.loss
        if d.text_field is not None:
            raise ValueError(f"the vlm task builds its own sequences: set data.text_field=None (got "
                             f"{d.text_field!r}; captions are read with loss.sequence='caption')")
        if d.multi_crop_grid != m.multicrop_grid:
            raise ValueError(f"data.multi_crop_grid={d.multi_crop_grid} but model.multicrop_grid={m.multicrop_grid}: "
                             "the model must pool and lay out the crops the data makes; set both")
        if d.multi_crop_grid and d.image_size != m.vision.image_size:
            raise ValueError(f"multi-crop crops are data.image_size={d.image_size} px but the tower takes "
                             f"{m.vision.image_size} px; set data.image_size to the tower's size (the tiles "
                             "carry the higher resolution)")
        if loss.sequence == "vqa_packed" and m.attention != "causal":
            raise ValueError("loss.sequence='vqa_packed' needs model.attention='causal': a prefix-LM would let the "
                             "image attend to every packed question")
        # What evaluation scores: the kind of sequence trained on, and captions too when some are.
        self.eval_kinds = ("caption",) if loss.sequence == "caption" else ("vqa", "caption") if loss.caption_rate \
            else ("vqa",)
        self.generate_tokens = {"vqa": loss.max_answer_tokens, "caption": loss.caption_tokens or loss.max_answer_tokens}
        if loss.max_answer_tokens < 1 or (loss.caption_tokens or 1) < 1 or loss.z_loss < 0:
            raise ValueError("loss.max_answer_tokens and loss.caption_tokens must be >= 1 and loss.z_loss >= 0")
        longest = max(self.generate_tokens[k] for k in self.eval_kinds)
        if loss.max_len - 1 + longest > m.lm.max_len:
            raise ValueError(f"model.lm.max_len={m.lm.max_len} is below loss.max_len - 1 + {longest} generated tokens "
                             f"= {loss.max_len - 1 + longest} (the inputs, and a prompt plus its generated answer); "
                             "raise it (RoPE has no table: no param changes)")
        if loss.answer_position is not None and loss.answer_position + longest > m.lm.max_len:
            raise ValueError(f"loss.answer_position={loss.answer_position} + {longest} generated tokens "
                             f"exceeds model.lm.max_len={m.lm.max_len}: generated answers would run past it")
        self.model = VLM(m)
        specials = ("<image>",) + (MULTICROP_TOKENS if m.multicrop_grid else ())
        from mmjax.data.registry import resolve_tokenizer
        spec = resolve_tokenizer(d.tokenizer, d.data_dir, loss.tokenizer_field)
        self.tokenizer = tok = vlm_tokenizer(spec, specials)
        image_id = tok.token_to_id("<image>")
        if image_id != m.image_token_id:
            raise ValueError(f"model.image_token_id={m.image_token_id} but the tokenizer {d.tokenizer!r} with "
                             f"{specials} gives <image> the id {image_id}: set model.image_token_id={image_id}")
        # Every id the LM embeds or predicts must have a row: the tokenizer's text ids and the
        # multi-crop markers (the placeholder itself is never embedded).
        needed = tok.vocab_size - 1 if image_id == tok.vocab_size - 1 else tok.vocab_size
        if needed > m.lm.vocab_size:
            raise ValueError(f"model.lm.vocab_size={m.lm.vocab_size} does not cover the {needed} ids the LM embeds "
                             f"or predicts (the tokenizer's, with {specials[1:] or 'no'} extra specials); raise it")
        self.vocab_needed = needed
        if m.multicrop_grid:
            start, end, col = (tok.token_to_id(t) for t in MULTICROP_TOKENS)
            image_tokens = tuple(int(i) for i in vlm_multicrop_layout(m, start_id=start, end_id=end, col_id=col).ids)
        else:
            image_tokens = image_tokens_per_image(m)
        self.transform = ShapesToVLM(tokenizer=spec, image_tokens=image_tokens, max_len=loss.max_len,
                                     task=loss.sequence, system=loss.system, caption_prompt=loss.caption_prompt,
                                     prompt_template=loss.prompt_template, caption_rate=loss.caption_rate,
                                     answer_position=loss.answer_position, caption_targets=loss.caption_targets,
                                     all_questions_of=loss.all_questions_of,
                                     extra_special_tokens=MULTICROP_TOKENS if m.multicrop_grid else ())
        # vqa_turns trains on every question of a scene at once; it is scored as it is used, one
        # question per prompt (single-question "vqa" sequences, the question drawn with eval_seed).
        # Captions of a mixed run are scored in sequences as long as training's.
        self.eval_transforms = {kind: dataclasses.replace(
            self.transform, caption_rate=0.0, task=kind, all_questions_of=(),
            max_len=loss.eval_max_len or loss.max_len if kind == self.eval_kinds[0] else loss.max_len)
            for kind in self.eval_kinds}
        self.eval_transform = self.eval_transforms[self.eval_kinds[0]]
        self.image_key = "crops" if m.multicrop_grid else "image"
        # Where the image block ends in every sequence: [bos] [system] image (the prompt follows).
        block = image_tokens if isinstance(image_tokens, tuple) else (image_id,) * image_tokens
        self.image_end = int(self.transform.add_bos) + len(tok.encode(loss.system)) + len(block)
        self.raw_fields = ("caption",) if loss.sequence == "caption" else ("questions", "answers")
        if loss.caption_rate:
            self.raw_fields += ("caption",)
        if (loss.caption_targets == "reading_order" and "caption" in self.raw_fields) or loss.all_questions_of:
            self.raw_fields += tuple(f for f in LABEL_FIELDS if f not in self.raw_fields)   # built from the labels
        self.eval_fields = self.raw_fields + (LABEL_FIELDS if "caption" in self.eval_kinds else ())  # to score captions

    # ------------------------------------------------------------------ data
    def train_iterator(self, *, global_batch_size: int, seed: int):
        from mmjax.data import pipeline
        return pipeline.train_iterator(self.cfg.data, global_batch_size=global_batch_size, seed=seed,
                                       example_transform=self.transform, keep_fields=self.raw_fields)

    def eval_batches(self, split: str, global_batch_size: int | None = None, kind: str | None = None):
        """Evaluation batches of `split` as `kind` ("vqa" / "caption"; None: the run's own) sequences."""
        from mmjax.data import pipeline
        if kind is not None and kind not in self.eval_transforms:
            raise ValueError(f"this run is scored as {self.eval_kinds}, not {kind!r}")
        return pipeline.eval_batches(self.cfg.data, split=split,
                                     global_batch_size=global_batch_size or self.cfg.train.eval_batch_size,
                                     example_transform=self.eval_transforms[kind or self.eval_kinds[0]],
                                     keep_fields=tuple(dict.fromkeys(self.eval_fields + ("num_objects",))),  # by count
                                     transform_seed=self.cfg.loss.eval_seed)

    def example_batch(self, batch_size):
        m, t = self.cfg.model, self.cfg.loss.max_len
        v = m.vision
        shape = ((batch_size, 1 + m.multicrop_grid ** 2) if m.multicrop_grid else (batch_size,)) + (
            v.image_size, v.image_size, v.channels)
        out = {self.image_key: jax.ShapeDtypeStruct(shape, jnp.float32),
               "ids": jax.ShapeDtypeStruct((batch_size, t), jnp.int32),
               "loss_weights": jax.ShapeDtypeStruct((batch_size, t), jnp.float32)}
        if m.attention == "prefix":
            out["prefix_len"] = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
        if self.cfg.loss.sequence == "vqa_packed":
            out["segment_ids"] = jax.ShapeDtypeStruct((batch_size, t), jnp.int32)
        if self.cfg.loss.sequence == "vqa_packed" or self.cfg.loss.answer_position is not None:
            out["positions"] = jax.ShapeDtypeStruct((batch_size, t), jnp.int32)
        return out

    def check_batch(self, batch, step):
        super().check_batch(batch, step)
        m = self.cfg.model
        ids = np.asarray(batch["ids"])
        text = ids[ids != m.image_token_id]
        if text.size and (text.min() < 0 or text.max() >= m.lm.vocab_size):
            raise ValueError(f"batch for step {step}: text ids outside [0, {m.lm.vocab_size}): min {text.min()}, "
                             f"max {text.max()}")
        check_image_tokens(ids, m.image_token_id, image_tokens_per_image(m))
        if not (np.asarray(batch["loss_weights"]).sum(axis=1) > 0).all():
            raise ValueError(f"batch for step {step}: a row has no supervised token (all loss weights 0)")

    # ------------------------------------------------------------------ training
    def init_params(self, rng):
        ex = self.example_batch(1)
        images = jnp.zeros(ex[self.image_key].shape, jnp.float32)
        ids = np.zeros((1, self.cfg.loss.max_len - 1), np.int32)
        ids[0, 1:1 + image_tokens_per_image(self.cfg.model)] = self.cfg.model.image_token_id
        return self.model.init(rng, images, jnp.asarray(ids))["params"]

    def _token_sums(self, params, batch, *, train, rng=None, example_mask=None):
        """`lm_cross_entropy` sums over the supervised targets (answers + eos; in eval, padding
        examples weigh 0)."""
        w = batch["loss_weights"]
        if example_mask is not None:
            w = w * example_mask.astype(jnp.float32)[:, None]
        inputs, targets, target_w = next_token_targets(batch["ids"], w)
        # Placeholder targets weigh 0, but their id may lie outside the vocabulary: make it a text id.
        targets = jnp.where(targets == self.cfg.model.image_token_id, 0, targets)
        prefix = batch["prefix_len"] if self.cfg.model.attention == "prefix" else None
        # Packed turns' segments, and positions (packed, or answer_position), cut like the ids.
        packed = {k: batch[k][:, :-1] for k in ("segment_ids", "positions") if k in batch}
        rngs = {"dropout": rng} if rng is not None else {}
        logits, _ = self.model.apply({"params": params}, batch[self.image_key], inputs, prefix_len=prefix,
                                     train=train, rngs=rngs, **packed)
        return lm_cross_entropy(logits, targets, target_w, z_loss=self.cfg.loss.z_loss)

    def train_flops_per_example(self):
        m = self.cfg.model
        crops = 1 + m.multicrop_grid ** 2
        n, dv = image_tokens_per_image(m), m.vision.encoder.width
        layers = len(m.vision_feature_layers) if m.vision_feature_layers else 1
        proj = 2 * n * dv * layers * m.lm.encoder.width * (2 if m.projector == "mlp" else 1)
        return 3.0 * (crops * vit_forward_flops(m.vision) + proj + lm_forward_flops(m.lm, self.cfg.loss.max_len - 1))

    # ------------------------------------------------------------------ evaluation
    def answer(self, params, images, ids, prefix_len, *, max_new_tokens: int | None = None, mesh=None) -> list[str]:
        """Greedy answers: row b's prompt is ids[b, :prefix_len[b]] (image block + question);
        decoded text, special tokens dropped."""
        from mmjax.data.vlm import prompt_positions
        from mmjax.models.vlm import generate
        tok = self.tokenizer
        n = max_new_tokens or self.cfg.loss.max_answer_tokens
        image_id = self.cfg.model.image_token_id
        # Never bos, padding or the placeholder: none of them is ever a supervised target.
        never = tuple(sorted({i for i in (tok.bos_id, tok.pad_id, image_id)
                              if i is not None and i < self.vocab_needed} - {tok.eos_id}))
        positions = prompt_positions(prefix_len, self.image_end, self.cfg.loss.answer_position, ids.shape[1] + n)
        out = generate(self.model, params, images, ids, lengths=np.asarray(prefix_len, np.int32),
                       max_new_tokens=n, temperature=0.0, positions=positions,
                       eos_id=tok.eos_id, pad_id=tok.pad_id, token_range=(0, self.vocab_needed),
                       disallowed_ids=never, mesh=mesh)
        return [tok.decode(r) for r in out.sequences]

    def evaluate(self, params, extra, mesh):
        results = {}
        for i, split in enumerate((self.cfg.data.eval_split, *self.cfg.loss.eval_splits)):
            prefix = "" if i == 0 else f"{split}/"
            for kind in self.eval_kinds:
                out = self.evaluate_split(params, extra, mesh, split, kind)
                if kind != self.eval_kinds[0]:  # a mixed run's captions: "caption/loss", ...
                    out = {k if k.startswith(f"{kind}/") else f"{kind}/{k}": v for k, v in out.items()}
                results.update({prefix + k: v for k, v in out.items()})
        return results

    def evaluate_split(self, params, extra, mesh, split: str, kind: str | None = None) -> dict:
        """Answer-token perplexity and accuracy on `kind` ("vqa" / "caption"; None: the run's own)
        sequences, then (eval_generate) generated answers or captions scored."""
        kind = kind or self.eval_kinds[0]
        from mmjax import sharding as shd
        from mmjax.data import vlm as vdata
        if not hasattr(self, "_eval_step"):
            self._eval_step = jax.jit(self.eval_fn)
        keys = set(self.example_batch(1)) | {"mask"}
        sums: dict[str, float] = {}
        predictions, references, groups, labels, objects = [], [], [], [], []
        for local in self.eval_batches(split, kind=kind):
            if self.cfg.loss.eval_max_examples is not None and sums.get("count", 0) >= self.cfg.loss.eval_max_examples:
                break
            batch = {k: v for k, v in local.items() if k in keys}
            out = jax.device_get(self._eval_step(params, extra, shd.make_global_batch(batch, mesh)))
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            if not self.cfg.loss.eval_generate:
                continue
            real = np.flatnonzero(local["mask"])
            if not real.size:
                continue
            # Padding rows answer a copy of a real one: every batch keeps one shape (one compile).
            rows = np.concatenate([real, np.full(len(local["mask"]) - real.size, real[0])])
            answers = self.answer(params, local[self.image_key][rows], local["ids"][rows],
                                  local["prefix_len"][rows], max_new_tokens=self.generate_tokens[kind], mesh=mesh)
            predictions += answers[:real.size]
            ids, p, n = local["ids"][real], local["prefix_len"][real], local["length"][real]
            references += [self.tokenizer.decode(ids[r, p[r]:n[r]]) for r in range(len(real))]
            if kind == "caption":
                labels += [vdata.labels_of({k: local[k][r] for k in LABEL_FIELDS}) for r in real]
            else:
                groups += [int(g) for g in local["question_group"][real]]
                objects += [int(n) for n in local["num_objects"][real]] if "num_objects" in local else []
        tokens = max(sums["tokens"], 1.0)
        results = {"loss": sums["nll"] / tokens, "perplexity": math.exp(sums["nll"] / tokens),
                   "token_accuracy": sums["correct"] / tokens, "count": int(sums["count"])}
        if predictions:
            if kind == "caption":
                scores = vdata.caption_attribute_accuracy(predictions, labels)
                results.update({f"caption/{k}": v for k, v in scores.items()})
                results["caption/attribute_accuracy"] = float(np.mean([scores[a] for a in vdata.CAPTION_ATTRIBUTES]))
            else:
                results.update({f"vqa/{k}": v for k, v in vdata.vqa_accuracy(predictions, references, groups,
                                                                                   objects or None).items()})
            results["samples"] = [f"{r} → {q}" for q, r in list(zip(predictions, references))[:8]]
        return results


def ask_prompt(task: VLMTask, question: str) -> np.ndarray:
    """The ids of one question as the task trains them: [bos] [system] image block, the question in
    the prompt template, ready to generate the answer from. int32 [1, L]."""
    from mmjax.data.vlm import build_vlm_sequence
    tok, t = task.tokenizer, task.transform
    prompt = tok.encode(t.prompt_template.format(prompt=question))
    seq = build_vlm_sequence(t.image_tokens, prompt, [0], max_len=10 ** 6, image_id=task.cfg.model.image_token_id,
                             pad_id=tok.pad_id, bos_id=tok.bos_id if t.add_bos else None, eos_id=None,
                             system_ids=tok.encode(t.system))
    return seq["ids"][None, :int(seq["prefix_len"])]


def image_for(task: VLMTask, image: np.ndarray) -> np.ndarray:
    """A decoded image (float [H, W, C] in [0, 1]) as the task's pipeline gives it to the model:
    resized, multi-cropped and normalised. float32 [1, ...]."""
    from mmjax.data import transforms
    d = task.cfg.data
    size = task.cfg.model.vision.image_size
    ex = {"image": transforms.resize_to_square(np.asarray(image, np.float32), size if not d.multi_crop_grid
                                               else size * d.multi_crop_grid, d.resize_mode)}
    if d.multi_crop_grid:
        ex = transforms.MultiCrop(size, d.multi_crop_grid).map(ex)
    ex = transforms.ToValueRange(d.value_range).map(ex)
    return np.asarray(ex[task.image_key], np.float32)[None]


__all__ = ["VLMLossConfig", "VLMTask", "ask_prompt", "image_for"]
