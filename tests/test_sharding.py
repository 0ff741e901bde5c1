"""Sharded training equals one device; params are really sharded as the rules say."""


import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mmjax import sharding as shd
from mmjax.experiment import ExperimentConfig, TrainConfig, validate
from mmjax.layers import TransformerConfig
from mmjax.models.vit import ViTConfig
from mmjax.tasks import ClassificationTask
from mmjax.train.loop import create_sharded_state
from mmjax.train.optim import OptimConfig, make_optimizer
from mmjax.train.step import jit_train_step, make_train_step

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")


def _cfg(mesh_shape, scan=False, optimizer="sgd"):
    # SGD for the equality tests: Adam divides by sqrt(v), which turns float noise in gradients that
    # are zero in exact arithmetic (the key bias: softmax ignores a per-query constant) into
    # lr-sized updates, on one device and on a mesh alike.
    return validate(ExperimentConfig(
        model=ViTConfig(image_size=8, channels=3, patch_size=2, num_classes=10,
                        encoder=TransformerConfig(width=32, depth=2, num_heads=4, mlp_dim=64,
                                                  scan_layers=scan)),
        optim=OptimConfig(name=optimizer, peak_lr=0.5, warmup_steps=1, weight_decay=0.1),
        train=TrainConfig(steps=5, batch_size=16, seed=3),
        mesh=shd.MeshConfig(shape=mesh_shape)))


def _batches(n=5, b=16):
    rs = np.random.RandomState(0)
    return [{"image": rs.rand(b, 8, 8, 3).astype(np.float32), "label": rs.randint(0, 10, b).astype(np.int32)}
            for _ in range(n)]


def _run(cfg, devices):
    mesh = shd.make_mesh(cfg.mesh, devices)
    task = ClassificationTask(cfg)
    with jax.set_mesh(mesh), shd.logical_rules(cfg.mesh.rules):
        tx, sched = make_optimizer(cfg.optim, cfg.train.steps)
        init_fn, _, state_sh, _ = create_sharded_state(task, cfg, mesh, tx)
        state = init_fn(jax.random.PRNGKey(cfg.train.seed))
        batch_sh = {k: shd.batch_sharding(mesh, v.ndim) for k, v in _batches(1)[0].items()}
        step = jit_train_step(make_train_step(task.loss_fn, tx, sched), state_sh, batch_sh)
        losses = []
        for b in _batches():
            state, m = step(state, shd.make_global_batch(b, mesh))
            losses.append(float(m["loss"]))
    return losses, state


@pytest.fixture(scope="module")
def single():
    return _run(_cfg((1, 1, 1)), jax.devices()[:1])


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 2, 2), (1, 4, 2)])
def test_mesh_matches_single_device(single, mesh_shape):
    losses1, state1 = single
    losses, state = _run(_cfg(mesh_shape), jax.devices())
    np.testing.assert_allclose(losses, losses1, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(state1.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)

    p = state.params
    data, fsdp, tensor = mesh_shape
    # Rules: embed → fsdp, heads / mlp → tensor (each only where it divides).
    q = p["encoder"]["block_0"]["attn"]["query"]["kernel"]  # [embed, heads, head_dim]
    fc1 = p["encoder"]["block_0"]["mlp"]["fc1"]["kernel"]  # [embed, mlp]
    want_embed = "fsdp" if fsdp > 1 else None
    want_tensor = "tensor" if tensor > 1 else None
    assert q.sharding.spec == P(want_embed, want_tensor, None)
    assert fc1.sharding.spec == P(want_embed, want_tensor)
    # SGD's momentum follows its param.
    mom = [x for x in jax.tree.leaves(state.opt_state) if getattr(x, "shape", None) == fc1.shape]
    assert mom and all(x.sharding.spec == fc1.sharding.spec for x in mom)
    # A shard really holds a fraction of the array.
    shard = q.addressable_shards[0].data
    assert shard.size == q.size // max(fsdp, 1) // max(tensor, 1)


def test_scanned_params_and_adam_state_shard_by_rules():
    cfg = _cfg((1, 4, 2), scan=True, optimizer="adamw")
    mesh = shd.make_mesh(cfg.mesh)
    task = ClassificationTask(cfg)
    with jax.set_mesh(mesh), shd.logical_rules(cfg.mesh.rules):
        tx, _ = make_optimizer(cfg.optim, 5)
        _, abstract, _, _ = create_sharded_state(task, cfg, mesh, tx)
    q = abstract.params["encoder"]["blocks"]["block"]["attn"]["query"]["kernel"]
    assert q.shape == (2, 32, 4, 8) and q.sharding.spec == P(None, "fsdp", "tensor", None)
    moments = [x for x in jax.tree.leaves(abstract.opt_state) if x.shape == q.shape]
    # mu and nu of the query, key and value kernels (same shape here).
    assert len(moments) == 6 and all(m.sharding.spec == q.sharding.spec for m in moments)
    assert abstract.step.sharding.spec == P()


def test_rules_fall_back_when_not_divisible():
    spec = shd.logical_to_spec(("embed", "classes"), (30, 10), {"data": 1, "fsdp": 4, "tensor": 2})
    assert spec == P(None, None)  # 30 is not divisible by fsdp=4
    spec = shd.logical_to_spec(("embed", "mlp"), (32, 64), {"data": 1, "fsdp": 4, "tensor": 2})
    assert spec == P("fsdp", "tensor")
    with pytest.raises(KeyError, match="no sharding rule"):
        shd.logical_to_spec(("nonesuch",), (4,), {"data": 1, "fsdp": 4, "tensor": 1})


def test_mesh_shape_errors():
    assert shd.resolve_mesh_shape((-1, 2, 2), 8) == (2, 2, 2)
    with pytest.raises(ValueError, match="at most one"):
        shd.resolve_mesh_shape((-1, -1, 2), 8)
    with pytest.raises(ValueError, match="needs 12 devices"):
        shd.resolve_mesh_shape((3, 2, 2), 8)
