"""Optimizer factory: schedules, clipping, weight-decay mask, freezing and lr multipliers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.train.optim import OptimConfig, make_optimizer, make_schedule, param_paths

PARAMS = {"encoder": {"block_0": {"mlp": {"fc1": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}}}},
          "head": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}}


def test_schedules_match_formulas():
    s = make_schedule(OptimConfig(peak_lr=1.0, warmup_steps=10, schedule="cosine", end_lr_ratio=0.1), 110)
    assert float(s(0)) == 0.0 and float(s(5)) == pytest.approx(0.5)
    assert float(s(10)) == pytest.approx(1.0)
    assert float(s(60)) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 0.5)))
    assert float(s(110)) == pytest.approx(0.1)
    lin = make_schedule(OptimConfig(peak_lr=2.0, schedule="linear"), 100)
    assert float(lin(25)) == pytest.approx(1.5)
    with pytest.raises(ValueError, match="warmup_steps=10 must be below"):
        make_schedule(OptimConfig(warmup_steps=10), 10)
    # warmup-stable-decay: 10 warm-up steps, constant to step 80, then linear to 0.1 at step 110
    wsd = make_schedule(OptimConfig(peak_lr=1.0, warmup_steps=10, schedule="constant", cooldown_steps=30,
                                    end_lr_ratio=0.1), 110)
    assert float(wsd(5)) == pytest.approx(0.5) and float(wsd(80)) == pytest.approx(1.0)
    assert float(wsd(95)) == pytest.approx(1.0 - 0.9 * 15 / 30) and float(wsd(110)) == pytest.approx(0.1)
    for bad in (OptimConfig(schedule="cosine", cooldown_steps=5), OptimConfig(schedule="constant", warmup_steps=10,
                                                                               cooldown_steps=95)):
        with pytest.raises(ValueError, match="cooldown_steps=.* needs schedule='constant' and must fit"):
            make_schedule(bad, 100)


def test_paths():
    paths = jax.tree.leaves(param_paths(PARAMS))
    assert "encoder/block_0/mlp/fc1/kernel" in paths and "head/bias" in paths


def _update(cfg, grads=None, params=PARAMS):
    tx, _ = make_optimizer(cfg, 100, params)
    grads = grads if grads is not None else jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    return updates


def test_sgd_weight_decay_mask_freeze_and_multipliers():
    cfg = OptimConfig(name="sgd", momentum=0.0, peak_lr=0.1, schedule="constant", weight_decay=0.5,
                      grad_clip_norm=None, freeze=(r"encoder/.*",), lr_mults=((r"head/bias", 3.0),))
    u = _update(cfg)
    # Frozen: no update at all.
    np.testing.assert_array_equal(u["encoder"]["block_0"]["mlp"]["fc1"]["kernel"], 0.0)
    # head/kernel: -lr · (g + wd · p) = -0.1 · (1 + 0.5); kernels are decayed by the default mask.
    np.testing.assert_allclose(u["head"]["kernel"], -0.15, rtol=1e-6)
    # head/bias: not decayed, lr × 3.
    np.testing.assert_allclose(u["head"]["bias"], -0.3, rtol=1e-6)


def test_clipping_uses_global_norm_of_trainable_grads():
    cfg = OptimConfig(name="sgd", momentum=0.0, peak_lr=1.0, schedule="constant", grad_clip_norm=1.0,
                      freeze=(r"encoder/.*",))
    grads = jax.tree.map(lambda p: 2.0 * jnp.ones_like(p), PARAMS)
    u = _update(cfg, grads)
    head_norm = np.sqrt(4.0 * (6 + 2))  # the frozen encoder grads do not count
    np.testing.assert_allclose(u["head"]["kernel"], -2.0 / head_norm, rtol=1e-6)


def test_adamw_first_step_is_sign_times_lr():
    cfg = OptimConfig(name="adamw", peak_lr=0.01, schedule="constant", weight_decay=0.0, grad_clip_norm=None)
    grads = jax.tree.map(lambda p: -3.0 * jnp.ones_like(p), PARAMS)
    u = _update(cfg, grads)
    np.testing.assert_allclose(u["head"]["bias"], 0.01, rtol=1e-5)


def test_regex_that_matches_nothing_is_an_error():
    with pytest.raises(ValueError, match=r"'decoder/.\*' matches no param"):
        make_optimizer(OptimConfig(freeze=(r"decoder/.*",)), 10, PARAMS)
    with pytest.raises(ValueError, match="unknown optimizer 'lamb'"):
        make_optimizer(OptimConfig(name="lamb"), 10, PARAMS)
