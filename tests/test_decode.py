"""generate() (mmjax/decode.py) against HF transformers' LlamaForCausalLM.generate on the same random
weights (saved with save_pretrained, loaded with mmjax.load_pretrained), across meshes, with
classifier-free guidance, embedding prompts, constraints and bad input.

HF runs in fp32 with left padding and an attention mask, do_sample=False: its tokens are the golden
values. Weights are redrawn with std 0.1 (norm scales around 1) so that logits are spread and greedy
choices are not near-ties that fp32 rounding could flip.
"""

from __future__ import annotations

import contextlib
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as T

import mmjax
from mmjax.config import replace_in
from mmjax.data.tokenizers import ByteTokenizer
from mmjax.decode import generate, prepare_generate
from mmjax.layers import TransformerConfig
from mmjax.models.lm import LM
from mmjax.ops import OpsPolicy
from mmjax.ops import cpu as ops_cpu
from mmjax.sharding import MeshConfig, make_mesh

VOCAB, PAD, NEW = 128, 0, 32
PROMPTS = [[5, 17, 99, 3, 42, 8, 77], [11, 2], [64, 64, 1, 120], [9]]  # mixed lengths, 1..7


@pytest.fixture(scope="module")
def hf_and_ours(tmp_path_factory):
    cfg = T.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96,
                        rope_theta=10_000.0, tie_word_embeddings=False, pad_token_id=PAD, bos_token_id=1,
                        eos_token_id=2, attn_implementation="eager")
    hf, model, params = _hf_and_converted(cfg, tmp_path_factory.mktemp("llama"), seed=0)
    assert isinstance(model, LM)
    return hf, model, params


def _hf_and_converted(cfg, path, seed):
    """A random HF Llama (weights redrawn with std 0.1, norm scales around 1; see the module docstring),
    saved to `path` and loaded back with mmjax.load_pretrained: (hf, model, params)."""
    torch.manual_seed(seed)
    hf = T.LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_((1.0 if "norm" in name else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
    hf.eval()
    hf.save_pretrained(path)
    model, params = mmjax.load_pretrained(path)
    return hf, model, params


def _hf_generate(hf, prompts, new, eos=None):
    """HF greedy generation, left-padded with an attention mask: generated ids [B, new] (pad after EOS)."""
    t0 = max(len(p) for p in prompts)
    ids = np.full((len(prompts), t0), PAD, np.int64)
    mask = np.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, t0 - len(p):] = p
        mask[i, t0 - len(p):] = 1
    with torch.no_grad():
        out = hf.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), do_sample=False,
                          max_new_tokens=new, min_new_tokens=0 if eos is not None else new, eos_token_id=eos,
                          pad_token_id=PAD, num_beams=1, top_k=None, top_p=None, temperature=None)
    gen = out[:, t0:].numpy()
    return np.pad(gen, ((0, 0), (0, new - gen.shape[1])), constant_values=PAD)  # HF stops when all rows end


@contextlib.contextmanager
def _no_recompile(caplog):
    """Fails if the generation loop (`run` in mmjax/decode.py) is compiled inside the block."""
    caplog.clear()
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        yield
    compiled = [r.getMessage()[:80] for r in caplog.records if "Compiling jit(run)" in r.getMessage()]
    assert not compiled, f"generate recompiled: {compiled}"


@pytest.fixture(scope="module")
def hf_greedy(hf_and_ours):
    return _hf_generate(hf_and_ours[0], PROMPTS, NEW)


def test_greedy_matches_hf_generate_token_for_token(hf_and_ours, hf_greedy):
    _, model, params = hf_and_ours
    assert len(np.unique(hf_greedy)) > 10  # a varied continuation, not one repeated id
    out = generate(model, params, PROMPTS, max_new_tokens=NEW, pad_id=PAD)
    np.testing.assert_array_equal(out.tokens, hf_greedy)
    np.testing.assert_array_equal(out.lengths, [NEW] * len(PROMPTS))
    for p, seq, gen in zip(PROMPTS, out.sequences, hf_greedy):
        np.testing.assert_array_equal(seq, np.concatenate([p, gen]))


def test_plain_and_weight_major_kernels_both_match_hf(hf_and_ours, hf_greedy):
    """On the CPU, generation decodes with output-major kernel copies (mmjax.decode), a model without CPU
    kernels with the params as stored: both give HF's tokens, single rows included."""
    import mmjax.decode as dec
    _, model, params = hf_and_ours
    assert dec._weight_major(model, len(PROMPTS), NEW, None) and dec._weight_major(model, 1, NEW, None)
    assert not dec._weight_major(model, len(PROMPTS), 1, None)  # one token: no loop to amortise the copies
    plain = type(model)(replace_in(model.cfg, TransformerConfig, ops=OpsPolicy(cpu_kernels=False)))
    assert not dec._weight_major(plain, len(PROMPTS), NEW, None)
    np.testing.assert_array_equal(generate(plain, params, PROMPTS, max_new_tokens=NEW, pad_id=PAD).tokens, hf_greedy)
    row = generate(model, params, PROMPTS[:1], max_new_tokens=NEW, pad_id=PAD)
    np.testing.assert_array_equal(row.tokens, hf_greedy[:1])


def test_tied_head_greedy_matches_hf(tmp_path):
    """A tied-embedding Llama: the decoding head is the embedding [V, D] itself (already output-major)."""
    cfg = T.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                        tie_word_embeddings=True, pad_token_id=PAD, attn_implementation="eager")
    hf, model, params = _hf_and_converted(cfg, tmp_path, seed=1)
    assert model.cfg.tie_embeddings and "head" not in params
    want = _hf_generate(hf, PROMPTS[:2], 16)
    np.testing.assert_array_equal(generate(model, params, PROMPTS[:2], max_new_tokens=16, pad_id=PAD).tokens, want)


def test_eos_stops_each_row_like_hf(hf_and_ours, hf_greedy, caplog):
    hf, model, params = hf_and_ours
    eos = int(hf_greedy[0, 5])  # a token row 0 emits early; other rows may emit it later or never
    want = _hf_generate(hf, PROMPTS, NEW, eos=eos)
    generate(model, params, PROMPTS, max_new_tokens=NEW, pad_id=PAD)  # compiled already by the greedy test
    with _no_recompile(caplog):  # eos_id and the constraint mask are runtime inputs
        out = generate(model, params, PROMPTS, max_new_tokens=NEW, eos_id=eos, pad_id=PAD, token_range=(0, VOCAB))
    np.testing.assert_array_equal(out.tokens, want)
    first = [int(np.flatnonzero(r == eos)[0]) + 1 if (r == eos).any() else NEW for r in hf_greedy]
    np.testing.assert_array_equal(out.lengths, first)
    assert out.sequences[0][-1] == eos and len(out.sequences[0]) == len(PROMPTS[0]) + first[0]


def test_array_prompts_with_lengths_equal_list_prompts(hf_and_ours, hf_greedy):
    _, model, params = hf_and_ours
    arr = np.full((len(PROMPTS), 9), 7, np.int32)  # right-padded with a real id: `lengths` must hide it
    for i, p in enumerate(PROMPTS):
        arr[i, : len(p)] = p
    out = generate(model, params, arr, lengths=[len(p) for p in PROMPTS], max_new_tokens=NEW, pad_id=PAD)
    np.testing.assert_array_equal(out.tokens, hf_greedy)


def test_embedding_prompts_equal_id_prompts(hf_and_ours, hf_greedy):
    _, model, params = hf_and_ours
    t = max(len(p) for p in PROMPTS)
    ids = np.zeros((len(PROMPTS), t), np.int32)
    for i, p in enumerate(PROMPTS):
        ids[i, : len(p)] = p
    emb = model.apply({"params": params}, jnp.asarray(ids), method=LM.embed)  # [B, T, D]
    out = generate(model, params, emb, lengths=[len(p) for p in PROMPTS], max_new_tokens=NEW, pad_id=PAD)
    np.testing.assert_array_equal(out.tokens, hf_greedy)
    np.testing.assert_array_equal(out.sequences[1], hf_greedy[1])  # embedding prompts: generated ids only


def test_prompt_positions_with_a_gap_match_hf_with_position_ids(hf_and_ours):
    """positions: each row's prompt placed with a gap (as a VLM's answer_position does), generated
    tokens continuing from its last prompt position; golden: HF greedy, step by step, given the same
    position_ids."""
    hf, model, params = hf_and_ours
    prompts, new, gap = [PROMPTS[0], PROMPTS[2]], 8, 5
    t = max(len(p) for p in prompts)
    positions = np.zeros((2, t + new), np.int32)
    golden = []
    for r, p in enumerate(prompts):
        pos = [j if j < 2 else j + gap for j in range(len(p) + new)]          # 0, 1, then a jump of 5
        positions[r, :len(pos)] = pos
        ids = list(p)
        with torch.no_grad():
            for _ in range(new):
                logits = hf(input_ids=torch.tensor([ids]), position_ids=torch.tensor([pos[:len(ids)]])).logits
                ids.append(int(logits[0, -1].argmax()))
        golden.append(ids[len(p):])
    out = generate(model, params, prompts, max_new_tokens=new, pad_id=PAD, positions=positions)
    np.testing.assert_array_equal(out.tokens, np.asarray(golden))
    plain = generate(model, params, prompts, max_new_tokens=new, pad_id=PAD)
    assert not np.array_equal(plain.tokens, out.tokens)  # the positions changed the answer
    with pytest.raises(ValueError, match="at least max"):
        generate(model, params, prompts, max_new_tokens=new, positions=positions[:, :-1])
    with pytest.raises(ValueError, match=r"\[0, max_len=96\)"):
        generate(model, params, prompts, max_new_tokens=new, positions=positions + 90)


def test_mesh_2x2x2_gives_the_same_tokens_as_one_device(hf_and_ours, hf_greedy):
    _, model, params = hf_and_ours
    # Sampling (top-k + top-p) on the mesh draws the same tokens as on one device: the sharded forward
    # gives the same logits up to rounding and the keys are the same.
    mesh = make_mesh(MeshConfig(shape=(2, 2, 2)))
    kw = dict(max_new_tokens=NEW, pad_id=PAD, temperature=0.9, top_k=20, top_p=0.9, rng=jax.random.key(3))
    one = generate(model, params, PROMPTS, **kw)
    sharded = generate(model, params, PROMPTS, mesh=mesh, **kw)
    np.testing.assert_array_equal(sharded.tokens, one.tokens)
    assert not np.array_equal(one.tokens, hf_greedy)  # it did sample


@pytest.mark.skipif(ops_cpu.machine_limit() is not None,
                    reason=f"the CPU kernel cannot be built on this machine: {ops_cpu.machine_limit()}")
def test_batched_decode_uses_the_cpu_kernel_on_one_device_not_on_a_mesh(hf_and_ours):
    """On a mesh of several devices the kernel's custom call would gather the sharded weights every step."""
    _, model, params = hf_and_ours
    mesh = make_mesh(MeshConfig(shape=(2, 2, 2)))
    for m, used in ((None, True), (mesh, False)):
        plan = prepare_generate(model, params, PROMPTS, max_new_tokens=4, pad_id=PAD, mesh=m)
        assert ("mmjax_rowdot" in plan.lower().compile().as_text()) is used


def test_classifier_free_guidance_scale_one_is_conditional_zero_is_unconditional(hf_and_ours, hf_greedy):
    hf, model, params = hf_and_ours
    null = [[1]]  # one null prompt shared by every row
    cond = generate(model, params, PROMPTS, max_new_tokens=NEW, pad_id=PAD, cfg_scale=1.0, null_prompts=null)
    np.testing.assert_array_equal(cond.tokens, hf_greedy)
    uncond = generate(model, params, PROMPTS, max_new_tokens=NEW, pad_id=PAD, cfg_scale=0.0, null_prompts=null)
    want = _hf_generate(hf, null, NEW)
    np.testing.assert_array_equal(uncond.tokens, np.repeat(want, len(PROMPTS), axis=0))
    np.testing.assert_array_equal(uncond.sequences[2][: len(PROMPTS[2])], PROMPTS[2])


def test_guided_first_token_is_the_guided_argmax(hf_and_ours):
    """s = 3: the first token is argmax(u + 3(c − u)) over HF's last-position logits for both prompts."""
    hf, model, params = hf_and_ours
    null = [1]
    with torch.no_grad():
        u = hf(input_ids=torch.tensor([null])).logits[0, -1].numpy()
        for prompt in [*PROMPTS, [3, 4, 5], [100, 7, 31, 8]]:
            c = hf(input_ids=torch.tensor([prompt])).logits[0, -1].numpy()
            want = int(np.argmax(u + 3.0 * (c - u)))
            if want not in (int(np.argmax(c)), int(np.argmax(u))):
                break  # a prompt where guidance changes the choice, so the test can see it
        else:
            raise AssertionError("no candidate prompt where guidance changes the first token")
    out = generate(model, params, [prompt], max_new_tokens=1, cfg_scale=3.0, null_prompts=[null])
    assert int(out.tokens[0, 0]) == want


def test_sampling_respects_token_range_and_disallowed_ids(hf_and_ours, caplog):
    _, model, params = hf_and_ours
    kw = dict(max_new_tokens=NEW, temperature=1.5, top_k=20, top_p=0.9, token_range=(40, 60),
              disallowed_ids=[41, 50])
    out = generate(model, params, PROMPTS, rng=jax.random.key(1), **kw)
    assert out.tokens.min() >= 40 and out.tokens.max() < 60
    assert not np.isin(out.tokens, [41, 50]).any()
    again = generate(model, params, PROMPTS, rng=jax.random.key(1), **kw)
    np.testing.assert_array_equal(again.tokens, out.tokens)  # explicit keys: reproducible
    other = generate(model, params, PROMPTS, rng=jax.random.key(2), **kw)
    assert not np.array_equal(other.tokens, out.tokens)
    with _no_recompile(caplog):  # new values of temperature, top_p and the range reuse the compiled loop
        moved = generate(model, params, PROMPTS, **{**kw, "temperature": 0.8, "top_p": 0.5, "token_range": (60, 90)})
    assert moved.tokens.min() >= 60 and moved.tokens.max() < 90


@pytest.mark.parametrize("kw, err, match", [
    (dict(prompts=[[1, 2], []]), ValueError, r"prompts\[1\] is an empty prompt"),
    (dict(prompts=[]), ValueError, "prompts is empty"),
    (dict(prompts=np.zeros((2, 3), np.int32), lengths=[3, 0]), ValueError, "empty prompt"),
    (dict(prompts=[[1] * 90]), ValueError, "KV cache"),            # 90 + 8 > max_len 96
    (dict(cache_len=10), ValueError, "KV cache"),                  # 7 + 8 > 10
    (dict(max_new_tokens=0), ValueError, "max_new_tokens"),
    (dict(top_p=1.2, temperature=1.0), ValueError, "top_p"),
    (dict(top_k=0, temperature=1.0), ValueError, "top_k"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(prompts=[[1, 2, VOCAB]]), ValueError, "token ids must lie in"),
    (dict(prompts=[[1, -3]]), ValueError, "token ids must lie in"),
    (dict(tokenizer=ByteTokenizer()), ValueError, "vocabulary has only 128"),
    (dict(eos_id=VOCAB), ValueError, "eos_id"),
    (dict(cfg_scale=2.0), ValueError, "null_prompts"),
    (dict(null_prompts=[[1]]), ValueError, "cfg_scale"),
    (dict(cfg_scale=2.0, null_prompts=[[1]], positions=np.zeros((4, 15), np.int32)), ValueError, "null_positions"),
    (dict(prompts=["hello"]), TypeError, "tokenizer"),
    (dict(prompts=np.zeros((2, 3, 5), np.float32)), ValueError, "D=32"),
])
def test_bad_input_is_named(hf_and_ours, kw, err, match):
    _, model, params = hf_and_ours
    kw = {"prompts": PROMPTS, "max_new_tokens": 8, **kw}
    with pytest.raises(err, match=match):
        generate(model, params, kw.pop("prompts"), **kw)


def test_decode_bench_runs_both_sides_on_one_model(tmp_path):
    """python -m mmjax.bench_decode on a tiny model: both sides decode the same weights to the same
    greedy tokens (HF's are the reference), and the reported figures are consistent with each other."""
    import json

    from mmjax import bench_decode
    out = tmp_path / "bench.json"
    assert bench_decode.main(["--width", "32", "--depth", "2", "--heads", "4", "--mlp", "64", "--vocab", "128",
                              "--batch-sizes", "2", "--prompt-len", "5", "--new-tokens", "24", "--repeats", "2",
                              "--torch-threads", "1", "--settle-s", "0.01", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    (case,) = res["cases"]
    assert case["tokens_match"] == 1.0 and case["rows_identical"] == 2
    for side in ("ours", "hf"):
        s = case[side]
        assert s["total_s"] == min(s["total_s_all"]) > 0 and len(s["total_s_all"]) == 2
        assert s["tokens_per_s"] == pytest.approx(2 * 24 / s["total_s"])
        # 24 tokens, not a handful: under load, total − first token of a few sub-ms steps was once < 0.
        assert s["per_token_s"] == pytest.approx((s["total_s"] - s["first_token_s"]) / 23)
        # FLOPs a step does: 2 × the weights it multiplies with (all but the input embedding and the norms).
        assert s["achieved_flops_per_s"] == pytest.approx(res["model"]["flops_per_token"] * s["tokens_per_s"])
        if s["per_token_s"] <= 0:  # a 1-token call timed slower than the 24-token one (load on a tiny model):
            assert s["weight_gb_per_s"] is None and s["of_read_roof"] is None        # no rate is made up
            continue
        assert s["of_read_roof"] == pytest.approx(s["weight_gb_per_s"] * 1e9 / res["read_bandwidth"]["bytes_per_s"])
        # Weights a step streams: all but the untied input embedding [128, 32], in fp32.
        step_bytes = 4 * (res["model"]["params"] - 128 * 32)
        assert s["weight_gb_per_s"] == pytest.approx(step_bytes / s["per_token_s"] / 1e9)
    assert case["ours"]["compile_s"] > 0 and case["hf"]["torch_threads"] == 1
    assert res["model"]["dtype"] == "float32" and res["hf_device"] == "cpu"
    assert res["model"]["flops_per_token"] == 2 * (res["model"]["params"] - 128 * 32 - 2 * 2 * 32 - 32)
    assert res["read_bandwidth"]["bytes_per_s"] > 1e8 and res["weight_major_rows"] == 1 and res["settle_s"] == 0.01
    assert res["cpu_kernel"] == (ops_cpu.unavailable_reason() or "mmjax.ops.cpu.rowdot")
    assert case["ratio_tokens_per_s"] == pytest.approx(case["ours"]["tokens_per_s"] / case["hf"]["tokens_per_s"])
    assert res["model"]["vocab"] == 128 and res["model"]["params"] == 2 * 128 * 32 + 2 * (4 * 32 * 32 + 3 * 32 * 64
                                                                                          + 2 * 32) + 32
    with pytest.raises(ValueError, match="new_tokens"):
        bench_decode.run(new_tokens=1, verbose=False)
