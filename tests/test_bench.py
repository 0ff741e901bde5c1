"""Smoke test of the ViT benchmark (no timing assertions) and the ViT FLOPs formula against XLA."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import pytest

from mmjax import bench
from mmjax.models.vit import ViT, vit_config, vit_forward_flops


def _positive_finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_bench_smoke_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    # Through the module's argparse entry point and the default path: each case in its own process.
    rc = bench.main(["--variants", "mu/4", "--image-size", "16", "--batch-size", "2", "--steps", "1",
                     "--scan-modes", "off", "--peak-matmul-n", "256", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "mu/4" in printed and "MFU" in printed and f"wrote {out}" in printed

    res = json.loads(out.read_text())
    assert res["settings"] == {"variants": ["mu/4"], "image_size": 16, "batch_size": 2, "steps": 1,
                               "scan_modes": [False], "isolate": True, "dtype": "float32"}
    m = res["machine"]
    assert m["jax_version"] == jax.__version__ and m["backend"] == jax.default_backend()
    assert m["device_kind"] and _positive_finite(m["cpu_count"])
    peak = res["peak"]
    assert _positive_finite(peak["flops_per_s"]) and _positive_finite(peak["flops_per_s_end"])
    assert peak["flops_per_s_best"] == max(peak["flops_per_s"], peak["flops_per_s_end"])
    assert isinstance(peak["unstable"], bool)
    assert "non_finite" not in res

    (case,) = res["cases"]
    assert case["variant"] == "mu/4" and case["scan_layers"] is False and case["isolated_process"] is True
    assert case["dtype"] == "float32" and case["param_dtype"] == "float32"
    assert len(case["step_times_s"]) == 1 and case["step_s"] == case["step_times_s"][0]
    for key in ("num_params", "init_s", "lower_s", "compile_only_s", "compile_s", "step_s", "images_per_s",
                "flops_formula", "flops_xla", "xla_over_formula", "achieved_flops_per_s", "peak_flops_per_s",
                "mfu", "mfu_best_peak", "xla_temp_bytes", "xla_argument_bytes", "xla_output_bytes", "xla_bytes",
                "xla_bytes_no_alias", "rss_at_start_bytes", "max_rss_bytes", "warmup_loss", "last_loss"):
        assert _positive_finite(case[key]), (key, case[key])
    assert math.isclose(case["compile_s"], case["lower_s"] + case["compile_only_s"], rel_tol=1e-9)
    assert math.isclose(case["images_per_s"], 2 / case["step_s"], rel_tol=1e-9)
    cfg = vit_config("mu/4", image_size=16, num_classes=1000)
    assert case["flops_formula"] == 3 * vit_forward_flops(cfg) * 2
    assert case["xla_bytes"] == case["xla_temp_bytes"] + case["xla_argument_bytes"] + case["xla_output_bytes"]
    assert case["max_rss_bytes"] >= case["rss_at_start_bytes"]  # a high-water mark, same process
    assert case["peak_flops_per_s"] == res["peak"]["flops_per_s"]


def test_vit_flops_formula_matches_xla_forward():
    """Wide enough that matmuls dominate (norms, GELU and softmax are a few % of the FLOPs), and
    unscanned: XLA's cost analysis counts a while loop's body only once."""
    cfg = vit_config("mu/4", image_size=16, num_classes=10,
                     encoder={"width": 256, "depth": 2, "mlp_dim": 1024, "num_heads": 4, "scan_layers": False})
    model = ViT(cfg)
    batch = 2
    images = jnp.zeros((batch, 16, 16, 3), jnp.float32)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
    compiled = jax.jit(lambda p, x: model.apply(p, x)[0]).lower(params, images).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla = float(cost["flops"])
    ours = batch * vit_forward_flops(cfg)
    assert abs(ours - xla) / xla < 0.15, (ours, xla)


def test_clip_bench_smoke_same_work_as_hf(tmp_path, capsys):
    """Both sides of the CLIP benchmark on the micro config: the JSON fields, and the same loss at
    step 0 (HF's weights loaded on our side, same batch, same CLIP loss) and after the AdamW
    updates (the same optimizer on every param). Weights are perturbed (init_noise) so that a
    mis-mapped bias or norm, or a wrong pooling position, shows in the loss."""
    import numpy as np

    out = tmp_path / "clip.json"
    rc = bench.main(["--model", "clip", "--configs", "micro", "--steps", "1", "--warmup", "1", "--scan-modes", "off",
                     "--init-noise", "0.2", "--peak-matmul-n", "256", "--no-isolate", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "micro" in printed and "ours/HF" in printed and f"wrote {out}" in printed

    res = json.loads(out.read_text())
    assert res["benchmark"] == "clip_train_step_vs_hf" and "non_finite" not in res
    st = res["settings"]
    assert st["configs"] == ["micro"] and st["steps"] == 1 and st["warmup"] == 1 and st["scan_modes"] == [False]
    assert st["hf_attn_implementation"] == "sdpa" and st["dtype"] == "float32"
    assert _positive_finite(res["peak"]["flops_per_s"]) and res["machine"]["jax_version"] == jax.__version__

    (case,) = res["cases"]
    spec = bench.CLIP_CONFIGS["micro"]
    assert case["config"] == "micro" and case["batch_size"] == spec.batch_size and case["text_len"] == spec.text_len
    assert case["hf_config"]["text_config"]["max_position_embeddings"] == spec.text_len
    ours, hf = case["ours"], case["hf"]
    assert hf["attn_implementation"] == "sdpa" and hf["torch_num_threads"] >= 1
    for side in (ours, hf):
        assert len(side["step_times_s"]) == 1 and side["step_s"] == side["step_times_s"][0]
        for key in ("step_s", "images_per_s", "flops_formula", "achieved_flops_per_s", "mfu", "mfu_best_peak",
                    "max_rss_bytes", "loss_step0", "last_loss"):
            assert _positive_finite(side[key]), (key, side[key])
        assert math.isclose(side["images_per_s"], spec.batch_size / side["step_s"], rel_tol=1e-9)
    for key in ("compile_s", "flops_xla", "xla_bytes", "num_params"):
        assert _positive_finite(ours[key]), (key, ours[key])
    # The same model on both sides: the same number of params, the same FLOPs formula.
    assert ours["num_params"] == hf["num_params"] == hf["num_trainable_params"]
    assert ours["flops_formula"] == hf["flops_formula"]
    assert math.isclose(case["ratio_ours_over_hf"], ours["images_per_s"] / hf["images_per_s"], rel_tol=1e-9)
    # Not at chance level (log B): the perturbed weights make the check sensitive.
    assert abs(hf["loss_step0"] - np.log(spec.batch_size)) > 0.05
    assert abs(ours["loss_step0"] - hf["loss_step0"]) < 1e-4, (ours["loss_step0"], hf["loss_step0"])
    assert case["loss_step0_abs_diff"] == abs(ours["loss_step0"] - hf["loss_step0"])
    # One AdamW update later (lr 1e-3 on every param, Adam's first step moves each by ~lr): the loss
    # moved, and moved the same way on both sides.
    assert abs(hf["last_loss"] - hf["loss_step0"]) > 1e-3
    assert abs(ours["last_loss"] - hf["last_loss"]) < 1e-3, (ours["last_loss"], hf["last_loss"])


def test_clip_bench_rejects_unknown_config():
    with pytest.raises(ValueError, match="unknown CLIP benchmark config 'XL/99'"):
        bench.run_clip_bench(configs=("XL/99",), out=None, verbose=False)


def test_datasheet_peaks():
    assert bench.datasheet_peak("NVIDIA H200", "gpu", "bfloat16")["flops_per_s"] == 989.4e12
    h100 = bench.datasheet_peak("NVIDIA H100 80GB HBM3", "gpu", "float32")
    assert h100["key"] == "tf32" and h100["flops_per_s"] == 494.7e12  # XLA's default fp32 precision there
    assert bench.datasheet_peak("NVIDIA H100 PCIe", "gpu", "bfloat16")["flops_per_s"] is None
    assert bench.datasheet_peak("NVIDIA A100-SXM4-80GB", "gpu", "bfloat16")["flops_per_s"] == 312e12
    assert bench.datasheet_peak("TPU v5 lite", "tpu", "bfloat16")["flops_per_s"] == 197e12
    assert bench.datasheet_peak("TPU v5", "tpu", "float32")["flops_per_s"] == 459e12  # v5p; bf16 passes
    assert bench.datasheet_peak("TPU v6 lite", "tpu", "bfloat16")["flops_per_s"] == 918e12
    assert bench.datasheet_peak("TPU v4", "tpu", "bfloat16")["flops_per_s"] == 275e12
    assert bench.datasheet_peak("cpu", "cpu", "float32")["flops_per_s"] is None
    with pytest.raises(ValueError, match="dtype"):
        bench.datasheet_peak("NVIDIA H200", "gpu", "float16")


@pytest.mark.slow
def test_gpu_suite_tiny_on_cpu(tmp_path, capsys):
    """`--suite gpu` at tiny sizes, all in this process: the ViT and CLIP train steps against HF
    (bf16, same weights: close step-0 losses), batch-2 decoding against HF generate, one table
    and one JSON with the summary rows; on a CPU the datasheet peak is None."""
    out = tmp_path / "gpu.json"
    rc = bench.main(["--suite", "gpu", "--vit-variant", "mu/4", "--clip-config", "micro", "--image-size", "16",
                     "--batch-size", "4", "--steps", "1", "--warmup", "1", "--decode-model", "micro",
                     "--decode-batch-size", "2", "--decode-prompt-len", "3", "--decode-new-tokens", "6",
                     "--decode-repeats", "1", "--peak-matmul-n", "256", "--no-isolate", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "mmjax suite 'gpu' (bfloat16" in printed and "ours/HF" in printed and f"wrote {out}" in printed
    for name in ("vit_train", "clip_train", "decode"):
        assert name in printed

    res = json.loads(out.read_text())
    assert res["benchmark"] == "suite_gpu" and res["failed"] == [] and "non_finite" not in res
    st = res["settings"]
    assert st["dtype"] == "bfloat16" and st["cases"] == ["vit", "clip", "decode"] and st["hf"] is True
    assert st["vit_variant"] == "mu/4" and st["clip_config"] == "micro" and st["batch_size"] == 4
    peak = res["peak"]
    assert peak["dtype"] == "bfloat16" and _positive_finite(peak["flops_per_s"])
    assert peak["datasheet"] == {**peak["datasheet"], "device_kind": res["machine"]["device_kind"],
                                 "flops_per_s": None}
    assert set(res["cases"]) == {"vit_train", "clip_train", "decode"}

    rows = {s["case"]: s for s in res["summary"]}
    assert list(rows) == ["vit_train", "clip_train", "decode"]
    for name, row in rows.items():
        assert row["dtype"] == "bfloat16"
        for key in ("ours", "hf", "ratio_ours_over_hf", "ours_mfu", "hf_mfu", "ours_compile_s"):
            assert _positive_finite(row[key]), (name, key, row[key])
        assert math.isclose(row["ratio_ours_over_hf"], row["ours"] / row["hf"], rel_tol=1e-9)
        assert row["ours_mfu_datasheet"] is None and row["hf_mfu_datasheet"] is None

    for name, model in (("vit_train", "vit"), ("clip_train", "clip")):
        case = res["cases"][name]
        ours, hf = case["ours"], case["hf"]
        assert case["model"] == model and case["batch_size"] == 4 and case["dtype"] == "bfloat16"
        assert rows[name]["unit"] == "images/s" and rows[name]["ours"] == ours["images_per_s"]
        assert ours["num_params"] == hf["num_params"] and ours["flops_formula"] == hf["flops_formula"]
        assert hf["autocast"] == "bfloat16" and hf["attn_implementation"] == "sdpa"
        assert ours["mfu"] == pytest.approx(ours["achieved_flops_per_s"] / peak["flops_per_s"], rel=1e-12)
        # The same weights and batch on both sides, bf16 compute on both.
        assert case["loss_step0_abs_diff"] < 0.02 * hf["loss_step0"], (name, ours["loss_step0"], hf["loss_step0"])
        assert rows[name]["check_value"] == case["loss_step0_abs_diff"]

    dec = res["cases"]["decode"]
    (c,) = dec["cases"]
    assert dec["preset"] == "micro" and dec["model"]["dtype"] == "bfloat16" and c["batch_size"] == 2
    assert dec["model"]["flops_per_token"] == 2 * dec["model"]["matmul_params"] > 0
    assert rows["decode"]["unit"] == "tokens/s" and rows["decode"]["ours"] == c["ours"]["tokens_per_s"]
    assert rows["decode"]["ours_mfu"] == pytest.approx(
        dec["model"]["flops_per_token"] * c["ours"]["tokens_per_s"] / peak["flops_per_s"])
    assert 0 <= rows["decode"]["check_value"] == c["tokens_match"] <= 1
