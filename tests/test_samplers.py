"""Samplers and classifier-free guidance (mmjax/decode.py) against numpy references and statistics.

References are written here in float64 numpy from the definitions (top-k: the k largest; top-p: the
smallest set of most likely tokens with mass ≥ p; order mask → temperature → top-k → top-p, as HF's
logits processors), never taken from our own output. Sampling is checked with many draws: support
(no token outside the allowed set, ever) and frequencies (a chi-square bound at p = 1e-4).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from mmjax.decode import (
    check_sampling,
    constrain_logits,
    first_argmax,
    greedy,
    guide_logits,
    process_logits,
    sample,
    split_guided,
    top_k_filter,
    top_p_filter,
)

DRAWS = 20_000


def _softmax(x):
    x = np.asarray(x, np.float64)
    finite = np.isfinite(x)
    z = np.where(finite, x - np.max(np.where(finite, x, -np.inf), axis=-1, keepdims=True), -np.inf)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _ref_top_k_set(row, k):
    return set(np.argsort(-np.asarray(row, np.float64), kind="stable")[:k].tolist())


def _ref_top_p_set(row, p):
    """Smallest set of most likely tokens whose mass reaches p (float64), and the margin by which the
    boundary decision is made (so the test can insist float32 cannot flip it)."""
    probs = _softmax(row)
    order = np.argsort(-probs, kind="stable")
    cum = np.cumsum(probs[order])
    n = int(np.searchsorted(cum, p) + 1)  # first index whose cumulative mass ≥ p, +1 for a count
    margin = min(abs(cum[n - 1] - p), abs(cum[n - 2] - p) if n >= 2 else 1.0)
    return set(order[:n].tolist()), margin


def _draw(logits, n, seed=0, **kw):
    """n samples per row: int [n, B]."""
    keys = jax.random.split(jax.random.key(seed), n)
    f = jax.jit(jax.vmap(lambda k: sample(k, logits, **kw)))
    return np.asarray(f(keys))


def _chi2_ok(counts, probs, alpha=1e-4):
    """Pearson's chi-square goodness of fit over the tokens with nonzero probability."""
    keep = probs > 0
    n = counts.sum()
    expected = n * probs[keep]
    stat = float(((counts[keep] - expected) ** 2 / expected).sum())
    crit = float(stats.chi2.ppf(1 - alpha, df=int(keep.sum()) - 1))
    return stat, crit


@pytest.fixture(scope="module")
def logits():
    """Four rows over a vocabulary of 40, spread enough that many tokens have visible mass."""
    return jnp.asarray(np.random.default_rng(0).normal(0, 1.5, size=(4, 40)), jnp.float32)


def test_top_k_never_leaves_the_k_most_likely(logits):
    k = 5
    draws = _draw(logits, DRAWS, seed=1, temperature=1.0, top_k=k)
    for r in range(logits.shape[0]):
        allowed = _ref_top_k_set(logits[r], k)
        seen = set(np.unique(draws[:, r]).tolist())
        assert seen <= allowed, f"row {r}: sampled {seen - allowed} outside the top-{k} {allowed}"
        assert len(seen) == k  # not narrower than k either (each of the 5 has ≥ 1% mass here)
        probs = _softmax(np.asarray(logits[r])[sorted(allowed)])
        counts = np.bincount(draws[:, r], minlength=logits.shape[1])[sorted(allowed)]
        stat, crit = _chi2_ok(counts, probs)
        assert stat < crit, f"row {r}: top-k frequencies off the renormalised softmax (chi2 {stat:.1f} ≥ {crit:.1f})"


def test_top_k_filter_matches_reference_and_keeps_ties():
    x = jnp.asarray([[0.0, 3.0, 1.0, 3.0, 2.0], [5.0, 4.0, 3.0, 2.0, 1.0]])
    out = np.asarray(top_k_filter(x, 2))
    np.testing.assert_array_equal(np.isfinite(out[1]), [True, True, False, False, False])
    np.testing.assert_array_equal(np.isfinite(out[0]), [False, True, False, True, False])
    assert np.isfinite(np.asarray(top_k_filter(x, 99))).all()  # k > V keeps everything (HF clips k to V)


@pytest.mark.parametrize("p", [0.3, 0.75, 0.9, 0.99])
def test_top_p_kept_set_is_smallest_with_mass_at_least_p(p):
    rng = np.random.default_rng(int(p * 100))
    checked = 0
    for _ in range(30):
        row = rng.normal(0, 2.0, size=64)
        ref, margin = _ref_top_p_set(row, p)
        if margin < 1e-5:  # a boundary float32 cannot resolve; draw another row (count below)
            continue
        kept = np.isfinite(np.asarray(top_p_filter(jnp.asarray(row[None], jnp.float32), p))[0])
        assert set(np.flatnonzero(kept).tolist()) == ref
        checked += 1
    assert checked >= 25


def test_top_p_frequencies_match_renormalised_distribution():
    row = jnp.asarray([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0]])
    p = 0.8
    ref, margin = _ref_top_p_set(row[0], p)
    assert margin > 1e-3 and len(ref) == 4
    draws = _draw(row, DRAWS, seed=2, temperature=1.0, top_p=p)[:, 0]
    assert set(np.unique(draws).tolist()) <= ref
    keep = sorted(ref)
    probs = _softmax(np.asarray(row[0])[keep])
    counts = np.bincount(draws, minlength=row.shape[1])[keep]
    stat, crit = _chi2_ok(counts, probs)
    assert stat < crit, f"top-p frequencies off the renormalised distribution: chi2 {stat:.1f} ≥ {crit:.1f}"


def test_temperature_frequencies_match_softmax_over_tau():
    row = jnp.asarray([[1.0, 0.5, 0.0, -0.5, -1.0, -2.0]])
    tau = 0.6
    draws = _draw(row, DRAWS, seed=3, temperature=tau)[:, 0]
    probs = _softmax(np.asarray(row[0], np.float64) / tau)
    stat, crit = _chi2_ok(np.bincount(draws, minlength=6), probs)
    assert stat < crit


def test_near_zero_temperature_is_greedy(logits):
    big = jnp.asarray(np.random.default_rng(5).normal(size=(32, 300)), jnp.float32)
    for x in (logits, big):
        want = np.argmax(np.asarray(x), axis=-1)
        got = _draw(x, 50, seed=4, temperature=1e-6)
        assert (got == want[None]).all()
        np.testing.assert_array_equal(np.asarray(sample(jax.random.key(0), x, temperature=0.0)), want)
        np.testing.assert_array_equal(np.asarray(greedy(x)), want)


def test_first_argmax_is_numpy_argmax_with_ties_inf_and_nan():
    rng = np.random.default_rng(11)
    x = rng.integers(0, 4, size=(64, 50)).astype(np.float32)   # many ties: the first maximum wins
    x[3] = -np.inf                                              # a fully masked row → 0, as np.argmax
    x[5, [7, 20]] = np.nan                                      # NaN wins, the first one (as np.argmax)
    x[6, 49] = np.inf
    np.testing.assert_array_equal(np.asarray(jax.jit(first_argmax)(jnp.asarray(x))), np.argmax(x, axis=-1))


def test_sampling_draws_what_jax_random_categorical_draws(logits):
    """The sampler is the Gumbel-max draw of jax.random.categorical: the same key gives the same ids."""
    for seed in range(20):
        key = jax.random.key(seed)
        want = jax.random.categorical(key, process_logits(logits, temperature=0.7), axis=-1)
        np.testing.assert_array_equal(np.asarray(sample(key, logits, temperature=0.7)), np.asarray(want))


def test_token_range_and_disallowed_ids_are_respected(logits):
    lo, hi, banned = 10, 20, (12, 15)
    draws = _draw(logits, 5000, seed=6, temperature=2.0, token_range=(lo, hi), disallowed_ids=banned)
    assert draws.min() >= lo and draws.max() < hi
    assert not np.isin(draws, banned).any()
    assert len(np.unique(draws)) == hi - lo - len(banned)  # and every allowed id does occur at τ = 2
    masked = np.asarray(logits).copy()
    masked[:, :lo] = masked[:, hi:] = -np.inf
    masked[:, list(banned)] = -np.inf
    np.testing.assert_array_equal(np.asarray(greedy(logits, token_range=(lo, hi), disallowed_ids=banned)),
                                  np.argmax(masked, axis=-1))
    np.testing.assert_array_equal(np.asarray(constrain_logits(logits, token_range=(lo, hi), disallowed_ids=banned)),
                                  masked.astype(np.float32))


def _ref_process(row, *, lo, hi, tau, k, p):
    """mask → temperature → top-k → top-p in float64, from the definitions."""
    x = np.asarray(row, np.float64).copy()
    x[:lo] = x[hi:] = -np.inf
    x = x / tau
    keep_k = _ref_top_k_set(x, k)
    x = np.where(np.isin(np.arange(x.size), list(keep_k)), x, -np.inf)
    keep_p, margin = _ref_top_p_set(x, p)
    return np.where(np.isin(np.arange(x.size), list(keep_p)), x, -np.inf), margin


def test_composition_order_matches_reference():
    rng = np.random.default_rng(7)
    for _ in range(10):
        row = rng.normal(0, 1.0, size=50)
        kw = dict(lo=5, hi=45, tau=0.5, k=12, p=0.7)
        want, margin = _ref_process(row, **kw)
        assert margin > 1e-5
        got = np.asarray(process_logits(jnp.asarray(row[None], jnp.float32), temperature=kw["tau"], top_k=kw["k"],
                                        top_p=kw["p"], token_range=(kw["lo"], kw["hi"])))[0]
        np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
        np.testing.assert_allclose(got[np.isfinite(got)], want[np.isfinite(want)], rtol=1e-5)


def test_temperature_comes_before_top_p():
    # At τ = 1 the two leaders hold ≥ 0.8 of the mass only with a third token; at τ = 0.25 they do alone.
    row = jnp.asarray([[2.0, 1.9, 1.0, 0.0, -1.0]])
    assert np.isfinite(np.asarray(process_logits(row, temperature=1.0, top_p=0.8))).sum() == 3
    assert np.isfinite(np.asarray(process_logits(row, temperature=0.25, top_p=0.8))).sum() == 2


def test_classifier_free_guidance_combination():
    rng = np.random.default_rng(8)
    cond, uncond = rng.normal(size=(3, 11)), rng.normal(size=(3, 11))
    for s in (0.0, 1.0, 3.5):
        got = np.asarray(guide_logits(jnp.asarray(cond, jnp.float32), jnp.asarray(uncond, jnp.float32), s))
        np.testing.assert_allclose(got, uncond + s * (cond - uncond), rtol=1e-5, atol=1e-5)
    doubled = jnp.asarray(np.concatenate([cond, uncond]), jnp.float32)
    np.testing.assert_allclose(np.asarray(split_guided(doubled, 1.0)), cond, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(split_guided(doubled, 0.0)), uncond, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="odd batch"):
        split_guided(doubled[:5], 2.0)


@pytest.mark.parametrize("kw, err, match", [
    (dict(temperature=-0.1), ValueError, "temperature"),
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(temperature="hot"), TypeError, "temperature"),
    (dict(top_k=0), ValueError, "top_k"),
    (dict(top_k=2.5), TypeError, "top_k"),
    (dict(top_p=0.0), ValueError, "top_p"),
    (dict(top_p=1.5), ValueError, "top_p"),
    (dict(token_range=(5, 5)), ValueError, "token_range"),
    (dict(token_range=(0, 11)), ValueError, "token_range"),
    (dict(token_range=(0,)), TypeError, "token_range"),
    (dict(disallowed_ids=[3, 10]), ValueError, "disallowed_ids"),
    (dict(token_range=(2, 4), disallowed_ids=[2, 3]), ValueError, "forbid every token"),
])
def test_bad_sampler_settings_are_named(kw, err, match):
    with pytest.raises(err, match=match):
        check_sampling(vocab_size=10, **kw)
    check_sampling(vocab_size=10, temperature=0.7, top_k=3, top_p=1.0, token_range=(0, 10), disallowed_ids=[9])
