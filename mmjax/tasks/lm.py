"""Language modelling on a dataset's text field (e.g. shapes captions) with a decoder LM.

Batches: {"text_ids": [B, L] int32, "text_len": [B] int32}: BOS + text + EOS, right-padded, from
the data pipeline (`DataConfig.text_field`, `text_add_bos=True`, `text_add_eos=True`).

    inputs   x = ids[:, :-1]                      [B, L-1]
    targets  y = ids[:, 1:]                       [B, L-1]  (next token at every position)
    weights  w[b, j] = 1 if j < text_len[b] - 1   [B, L-1]  (no loss on padding: target j is
                                                            real iff ids[b, j+1] is)
    loss     Σ w·(−log p(y|x) + z·logsumexp²) / Σ w   over the global batch (token mean)

Right padding needs no padding mask in attention: under the causal mask a real position never
sees the padding that follows it, and padded positions carry no loss.

Evaluation (`evaluate`): held-out perplexity exp(Σ nll / Σ tokens) over the eval split (exact: the
padded eval batches are masked), token accuracy, then captions sampled with `mmjax.decode.generate`
(greedy, and temperature/top-p) from the BOS prompt and a few prefixes, decoded with the
tokenizer, so they land in results.json. With `loss.unigram_reference` it also reports the
perplexity of a unigram model of the train split's tokens on the same eval tokens (a reference
point: an LM that learned nothing beyond token frequencies scores about this).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.config import config
from mmjax.models.lm import LM, LMConfig, lm_forward_flops
from mmjax.objectives.lm import lm_cross_entropy, next_token_targets
from mmjax.tasks.base import Task


@config
class LMLossConfig:
    z_loss: float = 0.0  # coefficient of logsumexp(logits)² per token (PaLM uses 1e-4)
    # Samples added to every evaluation ("" = the BOS prompt alone). Greedy once per prompt, then
    # `samples_per_prompt` draws at `sample_temperature` / `sample_top_p`.
    sample_prompts: tuple[str, ...] = ("", "a red", "two objects:")
    samples_per_prompt: int = 2
    sample_temperature: float = 0.8
    sample_top_p: float = 0.9
    sample_seed: int = 0
    # Also report the unigram perplexity of the eval tokens (unigram fitted on the train split).
    unigram_reference: bool = False


def token_mask(text_len: jax.Array, length: int) -> jax.Array:
    """[B] lengths (BOS and EOS included) → [B, length] float32: 1 on real tokens, 0 on padding."""
    return (jnp.arange(length)[None, :] < text_len[:, None]).astype(jnp.float32)


class NextTokenTask(Task):
    """A task trained by masked next-token cross-entropy (the LM, the VLM): subclasses define
    `_token_sums(params, batch, *, train, rng=None, example_mask=None)`, the `lm_cross_entropy`
    sums of a batch, and get the training loss and the evaluation sums from them."""

    def _token_sums(self, params, batch, *, train, rng=None, example_mask=None) -> dict:
        raise NotImplementedError

    def loss_fn(self, params, extra, batch, rng):
        """Mean loss over the supervised tokens of the global batch, (metrics, extra)."""
        s = self._token_sums(params, batch, train=True, rng=rng)
        tokens = jnp.maximum(s["weight_sum"], 1.0)
        nll = s["nll_sum"] / tokens
        metrics = {"nll": nll, "perplexity": jnp.exp(nll), "accuracy": s["correct_sum"] / tokens,
                   "z_loss": s["z_loss_sum"] / tokens, "tokens": s["weight_sum"]}
        return s["loss_sum"] / tokens, (metrics, extra)

    def eval_fn(self, params, extra, batch):
        """Sums over the batch's real examples (batch["mask"]): nll, correct, tokens, count."""
        s = self._token_sums(params, batch, train=False, example_mask=batch["mask"])
        return {"nll": s["nll_sum"], "correct": s["correct_sum"], "tokens": s["weight_sum"],
                "count": jnp.sum(batch["mask"].astype(jnp.float32))}


class LMTask(NextTokenTask):
    model_config_cls = LMConfig
    loss_config_cls = LMLossConfig

    def __init__(self, cfg):
        super().__init__(cfg)
        d, loss = cfg.data, cfg.loss
        if d.text_field is None:
            raise ValueError("the lm task trains on a text field: set data.text_field (e.g. 'caption')")
        if not d.text_add_bos:
            raise ValueError("the lm task needs data.text_add_bos=True: the first token is predicted from BOS, "
                             "and sampling starts from it")
        if not d.text_add_eos:
            raise ValueError("the lm task needs data.text_add_eos=True: the model must learn where a text ends")
        if d.max_text_len < 2:
            raise ValueError(f"data.max_text_len={d.max_text_len} leaves no target (BOS + at least one token)")
        if d.max_text_len > cfg.model.max_len:
            raise ValueError(f"data.max_text_len={d.max_text_len} exceeds model.max_len={cfg.model.max_len}")
        if loss.z_loss < 0:
            raise ValueError(f"loss.z_loss must be >= 0, got {loss.z_loss}")
        if loss.samples_per_prompt < 0:
            raise ValueError(f"loss.samples_per_prompt must be >= 0, got {loss.samples_per_prompt}")
        if not 0.0 < loss.sample_top_p <= 1.0:
            raise ValueError(f"loss.sample_top_p must lie in (0, 1], got {loss.sample_top_p}")
        if loss.sample_temperature <= 0:
            raise ValueError(f"loss.sample_temperature must be > 0 (greedy samples are always taken), "
                             f"got {loss.sample_temperature}")
        from mmjax.data.pipeline import tokenizer_for
        from mmjax.data.tokenizers import check_vocab
        self.tokenizer = tokenizer_for(d)  # also needed to decode samples
        check_vocab(self.tokenizer, cfg.model.vocab_size)
        self.model = LM(cfg.model)

    # ------------------------------------------------------------------ training
    def example_batch(self, batch_size):
        length = self.cfg.data.max_text_len
        return {"text_ids": jax.ShapeDtypeStruct((batch_size, length), jnp.int32),
                "text_len": jax.ShapeDtypeStruct((batch_size,), jnp.int32)}

    def init_params(self, rng):
        ids = jnp.zeros((1, self.cfg.data.max_text_len - 1), jnp.int32)
        return self.model.init(rng, ids)["params"]

    def _token_sums(self, params, batch, *, train, rng=None, example_mask=None):
        """`lm_cross_entropy` sums over the batch's real target tokens (padding and, in eval,
        padding examples weigh 0): loss_sum, nll_sum, z_loss_sum, correct_sum, weight_sum."""
        ids = batch["text_ids"]
        mask = token_mask(batch["text_len"], ids.shape[1])
        if example_mask is not None:
            mask = mask * example_mask.astype(jnp.float32)[:, None]
        # weights of the targets ids[:, 1:]: target j counts iff token j+1 is real.
        inputs, targets, weights = next_token_targets(ids, mask)
        rngs = {"dropout": rng} if rng is not None else {}
        logits, _ = self.model.apply({"params": params}, inputs, train=train, rngs=rngs)
        return lm_cross_entropy(logits, targets, weights, z_loss=self.cfg.loss.z_loss)

    def summarize_eval(self, sums):
        tokens = max(sums["tokens"], 1.0)
        nll = sums["nll"] / tokens
        return {"loss": nll, "perplexity": math.exp(nll), "accuracy": sums["correct"] / tokens,
                "tokens": int(sums["tokens"]), "count": int(sums["count"])}

    def train_flops_per_example(self):
        return 3.0 * lm_forward_flops(self.cfg.model, self.cfg.data.max_text_len - 1)

    def check_batch(self, batch, step):
        super().check_batch(batch, step)
        ids, lengths = np.asarray(batch["text_ids"]), np.asarray(batch["text_len"])
        v, length = self.cfg.model.vocab_size, ids.shape[1]
        if ids.size and (ids.min() < 0 or ids.max() >= v):
            raise ValueError(f"batch for step {step}: token ids outside [0, {v}): min {ids.min()}, "
                             f"max {ids.max()}; the tokenizer does not match model.vocab_size")
        if lengths.size and (lengths.min() < 1 or lengths.max() > length):
            raise ValueError(f"batch for step {step}: text_len outside [1, {length}]: min {lengths.min()}, "
                             f"max {lengths.max()}")

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, params, extra, mesh):
        results = super().evaluate(params, extra, mesh)
        if self.cfg.loss.unigram_reference:
            if not hasattr(self, "_unigram"):
                self._unigram = unigram_reference(self.cfg.data)
            results.update(self._unigram)
        results.update(self.sample_captions(params, mesh))
        return results

    def sample_captions(self, params, mesh=None) -> dict[str, list[str]]:
        """Captions generated from each of `loss.sample_prompts` (after BOS), decoded to text:
        {"samples/prompts": prompts, "samples/greedy": one per prompt,
         "samples/sampled": `samples_per_prompt` per prompt, prompt-major}."""
        from mmjax.decode import generate
        c, d = self.cfg.loss, self.cfg.data
        if not c.sample_prompts:
            return {}
        tok = self.tokenizer
        prompts = [tok.encode(p, add_bos=True) for p in c.sample_prompts]
        longest = max(len(p) for p in prompts)
        if longest >= d.max_text_len:
            raise ValueError(f"a sample prompt has {longest} tokens with BOS, no room below "
                             f"data.max_text_len={d.max_text_len}")
        new = d.max_text_len - longest  # samples never run past the trained length

        # Only ids the tokenizer can decode (the model's vocabulary may be padded beyond them), and
        # never BOS or padding: they are not targets in training, so they carry no learned meaning.
        never = tuple(i for i in (tok.bos_id, tok.pad_id) if i is not None and i != tok.eos_id)

        def run(rows, **kw):
            out = generate(self.model, params, rows, max_new_tokens=new, eos_id=tok.eos_id, pad_id=tok.pad_id,
                           token_range=(0, tok.vocab_size), disallowed_ids=never, mesh=mesh, **kw)
            return [tok.decode(r) for r in out.sequences]  # prompt + continuation, specials dropped

        results = {"samples/prompts": list(c.sample_prompts), "samples/greedy": run(prompts, temperature=0.0)}
        if c.samples_per_prompt:
            rows = [p for p in prompts for _ in range(c.samples_per_prompt)]
            results["samples/sampled"] = run(rows, temperature=c.sample_temperature, top_p=c.sample_top_p,
                                             rng=jax.random.PRNGKey(c.sample_seed))
        return results


def unigram_reference(data) -> dict[str, float]:
    """Perplexity of unigram models on the eval split's target tokens (every token after BOS,
    EOS included: the tokens the LM is scored on), tokenised exactly as the pipeline does (same
    truncation; texts the pipeline would skip as too long are left out).

        unigram_perplexity         p(t) = (count_train(t) + 1) / (N_train + V)   (add-one, V = tokenizer vocab)
        unigram_perplexity_oracle  p(t) = count_eval(t) / N_eval  (fitted on the eval tokens themselves:
                                   no unigram model does better on them)
    """
    from mmjax.data import pipeline, registry, transforms
    tokenize = transforms.TokenizeText(pipeline.tokenizer_spec(data), data.max_text_len, data.text_add_bos,
                                       data.text_add_eos, data.on_long_text)
    vocab = pipeline.tokenizer_for(data).vocab_size

    def counts(split: str) -> np.ndarray:
        source = registry.open_split(data.name, split, data.data_dir)
        out = np.zeros(vocab, np.int64)
        for i in range(len(source)):
            try:
                ex = tokenize.map({"text": source[i][data.text_field]})
            except transforms.BadExample:  # too long under on_long_text="skip"/"error": not scored either
                continue
            n = int(ex["text_len"])
            np.add.at(out, ex["text_ids"][1:n], 1)
        return out

    train, test = counts(data.train_split), counts(data.eval_split)
    p = (train + 1.0) / (train.sum() + len(train))
    nll = -(test * np.log(p)).sum() / test.sum()
    q = test[test > 0] / test.sum()
    return {"unigram_perplexity": float(np.exp(nll)),
            "unigram_perplexity_oracle": float(np.exp(-(q * np.log(q)).sum()))}


__all__ = ["LMLossConfig", "LMTask", "NextTokenTask", "token_mask", "unigram_reference"]
