"""The generative families side by side on `shapes`: one metric set over each run's own samples.

    python -m mmjax.evals.generators runs/vae_shapes runs/pixel_ar_shapes runs/vq_ar_shapes \\
        runs/unified_shapes [--num 500] [--json compare.json] [--grids DIR]

Each trained run draws `num` images on device; a row per way of drawing:

    real            test images num..2num−1 against the first num: the metrics' floor at this num
    prior           VAE (`autoencoder`, kind "kl"): z ~ N(0, I) through the decoder
    BOS             pixel AR (`pixel_ar`): palette ids from BOS with the run's sampler
    NULL            vq_ar (caption- or class-conditional, trained with condition dropout): the null
                    condition, no guidance (the unconditional model the CFG runs subtract)
    caption / class vq_ar: the first num test captions (or their scenes' classes), no guidance,
                    and with CFG at the run's pinned scale

and one metric set for all, read by the shapes probe (`mmjax.evals.probe`):

    FD-probe, KID-probe   probe features of the samples against those of the first num test images
                          (the same scenes the conditional rows were prompted with)
    attributes            conditional rows: the probe's reading against the prompted scene (colour,
                          shape, size, position, count, the whole scene; class rows: the class's field)
    bits/dim              the run's own test figure (results.json): pixel AR, of the pixels; vq_ar,
                          its codes' NLL spread over the sub-pixels, a rate over the tokenizer's lossy
                          reconstruction rather than a likelihood of the image; none for the VAE,
                          whose L2 term is no likelihood without a fixed variance
    s/image               wall time of drawing the num images (decode loop and decoder to pixels),
                          the second of two identical calls (the first compiles), divided by num

All runs must be `shapes` runs at one resolution (the probe's). The sampler settings are the run's
own (temperature, top-k, top-p, the CFG scale), as `mmjax sample` uses them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ATTRIBUTES = ("color", "shape", "size", "position", "count", "all")


@dataclasses.dataclass
class Row:
    run: str  # the run directory ("" for the real images)
    family: str  # "real", "VAE", "pixel AR", "VQ AR" or "unified LM"
    mode: str  # how the images were drawn (module docstring)
    images: np.ndarray  # [num, R, R, 3] in [−1, 1]
    seconds_per_image: float | None
    bits_per_dim: float | None = None
    labels: dict[str, np.ndarray] | None = None  # the prompted scenes (conditional rows)
    attributes: tuple[str, ...] = ()  # the attributes the condition fixes
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)


def _timed(draw: Callable[[Any, int], np.ndarray], rng, num: int) -> tuple[np.ndarray, float]:
    """The images of the second of two identical draws and its seconds per image (the first compiles)."""
    np.asarray(draw(rng, num))
    t0 = time.perf_counter()
    images = np.asarray(draw(rng, num), np.float32)
    return images, (time.perf_counter() - t0) / num


def _results(workdir: str) -> dict[str, Any]:
    path = Path(workdir) / "results.json"
    return json.loads(path.read_text()).get("eval", {}) if path.is_file() else {}


def run_config(workdir: str):
    """The validated config of a run directory (FileNotFoundError when it holds none)."""
    from mmjax.experiment import from_json, validate
    path = Path(workdir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{workdir} is not a run directory (no config.json; `mmjax train --workdir` "
                                "writes one)")
    return validate(from_json(json.loads(path.read_text())))


def check_run(cfg, workdir: str, resolution: int) -> None:
    """Raises ValueError naming why `workdir` cannot be compared: not `shapes` at `resolution`, or not
    an image generator (a VQ tokenizer, a classifier, a vq_ar run trained only image → caption)."""
    d = cfg.data
    if d.name != "shapes" or d.image_size != resolution:
        raise ValueError(f"{workdir} is a {d.name!r} run at {d.image_size} px; the comparison reads `shapes` "
                         f"images at {resolution} px with one probe")
    if cfg.task == "autoencoder" and cfg.model.kind != "kl":
        raise ValueError(f"{workdir} is a {cfg.model.kind!r} autoencoder: it has no prior to sample "
                         "(a VQ tokenizer is sampled through a vq_ar run over its codes)")
    if cfg.task not in ("autoencoder", "pixel_ar", "vq_ar"):
        raise ValueError(f"{workdir} is a {cfg.task!r} run, not an image generator (autoencoder with kind 'kl', "
                         "pixel_ar or vq_ar)")
    if cfg.task == "vq_ar" and "caption_to_image" not in cfg.loss.directions:
        raise ValueError(f"{workdir} was not trained caption → image (loss.directions {cfg.loss.directions})")


def run_rows(workdir: str, num: int, *, seed: int = 0, resolution: int) -> list[Row]:
    """The rows (module docstring) of one trained run: its samples drawn, timed, not yet scored."""
    import functools

    import jax

    from mmjax.experiment import load_run
    from mmjax.tasks import get_task_class
    from mmjax.tasks.vq_ar import CLASS_PROBE_ATTRIBUTE

    check_run(run_config(workdir), workdir, resolution)
    cfg, _, params = load_run(workdir)
    task = get_task_class(cfg.task)(cfg)
    rng = jax.random.PRNGKey(seed)
    bpd = _results(workdir).get("bits_per_dim")
    if cfg.task == "autoencoder":
        prior = jax.jit(functools.partial(task.model.apply, method="sample_prior"), static_argnums=2)
        gen = {"params": params["generator"]}
        images, t = _timed(lambda r, n: np.clip(np.asarray(prior(gen, r, n)), -1.0, 1.0), rng, num)
        return [Row(workdir, "VAE", "prior", images, t)]
    if cfg.task == "pixel_ar":
        c = cfg.loss
        images, t = _timed(lambda r, n: task.sample(params, n, rng=r, temperature=c.sample_temperature,
                                                    top_k=c.sample_top_k) * 2.0 - 1.0, rng, num)
        return [Row(workdir, "pixel AR", "BOS", images, t, bpd)]
    c = cfg.loss
    family = "unified LM" if "image_to_caption" in c.directions else "VQ AR"

    def draw(ids, scale):
        def f(r, n):
            assert n == len(ids)
            codes = task.sample_codes(params, ids, rng=r, cfg_scale=scale, temperature=c.temperature,
                                      top_k=c.top_k, top_p=c.top_p)
            return task.decode_codes(codes)
        return f

    rows = []
    if c.cond_dropout > 0:
        images, t = _timed(draw([[task.vocab.null]] * num, None), rng, num)
        rows.append(Row(workdir, family, "NULL", images, t, bpd))
    ids, _, labels, _ = task.prompt_set("test", num)
    if len(ids) < num:
        raise ValueError(f"{workdir}'s test split has {len(ids)} examples, fewer than --num {num}")
    kind = "class" if task.class_field else "caption"
    attrs = (CLASS_PROBE_ATTRIBUTE[task.class_field],) if task.class_field else ATTRIBUTES
    if task.class_field and task.class_field not in CLASS_PROBE_ATTRIBUTE:
        attrs = ()  # a class the probe does not read: FD and time only
    scales = [None] + ([c.cfg_scale] if c.cfg_scale is not None and c.cond_dropout > 0 else [])
    for scale in scales:
        images, t = _timed(draw(ids, scale), rng, num)
        mode = kind if scale is None else f"{kind}, CFG {scale:g}"
        rows.append(Row(workdir, family, mode, images, t, bpd, labels, attrs))
    return rows


def real_images(data_cfg, num: int) -> tuple[np.ndarray, np.ndarray]:
    """The first num and the next up to num test images of the probe's data config, in [−1, 1]."""
    from mmjax.data import pipeline
    images = []
    for batch in pipeline.eval_batches(data_cfg, split=data_cfg.eval_split, global_batch_size=min(2 * num, 500)):
        images.append(np.asarray(batch["image"])[np.asarray(batch["mask"], bool)])
        if sum(len(x) for x in images) >= 2 * num:
            break
    images = np.concatenate(images)
    if len(images) < num + 2:
        raise ValueError(f"the {data_cfg.eval_split!r} split has {len(images)} images; --num {num} needs at least "
                         f"{num + 2} (num to compare against, and 2 more for the real row)")
    return images[:num], images[num: 2 * num]


def compare(workdirs: list[str], num: int, *, seed: int = 0, probe_config=None, log=print) -> list[Row]:
    """Every run's rows and the real row, scored against the first `num` test images (module docstring)."""
    from mmjax.evals.images import frechet_distance, kid
    from mmjax.evals.probe import load_or_train_probe, probe_data_config

    if not workdirs:
        raise ValueError("give at least one run directory")
    first = run_config(workdirs[0])
    resolution = first.data.image_size
    for w in workdirs:  # every run checked before the probe is loaded (or trained)
        check_run(run_config(w), w, resolution)
    data_cfg = probe_data_config(resolution, first.data.data_dir)
    reference, held_out = real_images(data_cfg, num)
    probe = load_or_train_probe(data_cfg, config=probe_config, log=log)
    f_ref = probe.features(reference)
    rows = [Row("", "real", f"{len(held_out)} other test images", held_out, None)]
    for w in workdirs:
        rows += run_rows(w, num, seed=seed, resolution=resolution)
        if log:
            log(f"{w}: drew {', '.join(r.mode for r in rows if r.run == w)}")
    for r in rows:
        f = probe.features(r.images)
        r.metrics["fd_probe"] = float(frechet_distance(f, f_ref))
        r.metrics["kid_probe"] = float(kid(f, f_ref)[0])
        if r.labels is not None and r.attributes:
            acc = probe.attribute_accuracy(r.images, r.labels)
            r.metrics |= {f"probe_{k}": float(acc[k]) for k in r.attributes}
    return rows


def table(rows: list[Row]) -> str:
    """The rows as one markdown table (percentages for the attributes, — where a figure is undefined)."""
    head = ["family", "run", "samples", "bits/dim", "FD-probe", "KID-probe", "colour", "shape", "size", "position",
            "count", "whole scene", "s/image"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    def pct(m, k):
        v = m.get(f"probe_{k}")
        return "—" if v is None else f"{100 * v:.1f}"

    for r in rows:
        m = r.metrics
        cells = [r.family, r.run or "—", r.mode, "—" if r.bits_per_dim is None else f"{r.bits_per_dim:.4f}",
                 f"{m['fd_probe']:.3f}", f"{m['kid_probe']:.4f}", *(pct(m, k) for k in ATTRIBUTES),
                 "—" if r.seconds_per_image is None else f"{r.seconds_per_image:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmjax.evals.generators", description=__doc__.split("\n\n")[0])
    p.add_argument("workdirs", nargs="+", help="trained runs: VAE (autoencoder, kind 'kl'), pixel_ar, vq_ar")
    p.add_argument("--num", type=int, default=500, help="images drawn per row, and test images compared against")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the rows' figures here")
    p.add_argument("--grids", default=None, help="write each row's first 16 images as <DIR>/<run>_<mode>.png, "
                   "and every row's first 8 in <DIR>/families.png")
    args = p.parse_args(argv)
    if args.num < 2:
        p.error("--num must be >= 2 (a covariance needs two feature vectors)")
    try:
        rows = compare(args.workdirs, args.num, seed=args.seed)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(rows))
    if args.grids:
        import re

        from mmjax.data.grid import save_image_grid
        for r in rows:
            name = re.sub(r"[^A-Za-z0-9.]+", "_", f"{Path(r.run).name or 'real'}_{r.mode}").strip("_")
            save_image_grid(r.images[:16], Path(args.grids) / f"{name}.png", ncols=8, value_range=(-1, 1))
        # all rows in one picture, 8 images each, the first two tiles of a row captioned family and mode
        save_image_grid(np.concatenate([r.images[:8] for r in rows]), Path(args.grids) / "families.png", ncols=8,
                        value_range=(-1, 1), captions=[c for r in rows for c in [r.family, r.mode] + [""] * 6])
    if args.json:
        out = [{"run": r.run, "family": r.family, "mode": r.mode, "num": len(r.images), "bits_per_dim": r.bits_per_dim,
                "seconds_per_image": r.seconds_per_image, **r.metrics} for r in rows]
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
