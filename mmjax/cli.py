"""The `mmjax` command.

    mmjax train --config experiments/vit_digits.py --workdir runs/vit_digits [--config.KEY=VALUE ...]
    mmjax bench [--model vit|clip] [--dtype bfloat16] [...]     train steps vs HF, MFU
    mmjax bench --suite gpu [--out bench_gpu.json]              ViT-B/16, CLIP-B/16, decode vs PyTorch
    mmjax bench-data [--name shapes] [...]
    mmjax bench-decode [--batch-sizes 8,1] [...]
    mmjax ask --workdir runs/vlm_shapes --image scene.png "what color is the circle?"
    mmjax sample --workdir runs/pixel_ar_shapes --num 16 --out grid.png

Environment: MMJAX_HUGEPAGE_MALLOC=1 re-executes any command under glibc malloc tunables for
XLA:CPU (huge pages); the benchmarks do so by default when the backend would be the CPU
(MMJAX_HUGEPAGE_MALLOC=0 turns that off). See mmjax/runtime.py and docs/cpu.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    rest, overrides = [], []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--config."):
            body = a[len("--config."):]
            if "=" not in body:
                if i + 1 >= len(argv):
                    raise SystemExit(f"error: {a} needs a value")
                body, i = f"{body}={argv[i + 1]}", i + 1
            overrides.append(body)
        else:
            rest.append(a)
        i += 1
    return rest, overrides


TRAIN_DESCRIPTION = "Trains (or resumes) the experiment that --config defines, in --workdir."
TRAIN_USAGE = "mmjax train [-h] --config CONFIG --workdir WORKDIR [--config.KEY=VALUE ...]"
TRAIN_EPILOG = """config overrides:
  --config.KEY=VALUE    set one field of the experiment config; repeatable, and `--config.KEY
                        VALUE` works too. KEY is the field's dotted path in the config, VALUE a
                        Python literal (numbers, True/False, None, tuples) or a bare word.

example:
  mmjax train --config experiments/vit_digits.py --workdir runs/vit_small \\
      --config.train.steps=500 --config.optim.peak_lr=1e-3 \\
      --config.model.encoder.depth=2 '--config.mesh.shape=(-1,1,1)'

A workdir that already holds a run resumes it, and refuses a config that differs from the saved
one in anything but how the run executes (mesh.*, train.log_every, ...)."""


def _error(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench-data"]:
        from mmjax.data.bench import main as bench_data
        bench_data(argv[1:])
        return 0
    if argv[:1] == ["bench"]:
        from mmjax.bench import main as bench
        return bench(argv[1:])
    if argv[:1] == ["bench-decode"]:
        from mmjax.bench_decode import main as bench_decode
        return bench_decode(argv[1:])
    parser = argparse.ArgumentParser(prog="mmjax", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train an experiment config (--config.KEY=VALUE overrides its fields)",
                        usage=TRAIN_USAGE, description=TRAIN_DESCRIPTION, epilog=TRAIN_EPILOG,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    tr.add_argument("--config", required=True, help="experiments/NAME.py defining get_config()")
    tr.add_argument("--workdir", required=True, help="run directory (resumed if it holds checkpoints)")
    ask_p = sub.add_parser("ask", help="answer a question about an image with a trained VLM run (greedy)")
    ask_p.add_argument("--workdir", required=True, help="a `vlm` run directory (its config + latest checkpoint)")
    ask_p.add_argument("--image", required=True, help="an image file (PNG, JPEG, ...)")
    ask_p.add_argument("--max-new-tokens", type=int, default=None, help="default: the run's loss.max_answer_tokens")
    ask_p.add_argument("question", help='e.g. "what color is the circle?"')
    sm = sub.add_parser("sample", help="draw images from a trained image-generation run into a PNG grid")
    sm.add_argument("--workdir", required=True,
                    help="a `pixel_ar` or `vq_ar` run directory (its config + latest checkpoint)")
    sm.add_argument("--prompt", default=None, help="the caption to draw (vq_ar runs: caption-conditional)")
    sm.add_argument("--class", dest="class_id", type=int, default=None,
                    help="the class to draw (class-conditional vq_ar runs: loss.class_field)")
    sm.add_argument("--num", type=int, default=16, help="images to draw (default 16)")
    sm.add_argument("--out", required=True, help="the PNG grid to write")
    sm.add_argument("--temperature", type=float, default=None, help="default: the run's loss.sample_temperature")
    sm.add_argument("--top-k", type=int, default=None, help="default: the run's pinned top-k")
    sm.add_argument("--cfg-scale", type=float, default=None,
                    help="classifier-free guidance scale (vq_ar; default: the run's loss.cfg_scale; 1: none)")
    sm.add_argument("--seed", type=int, default=0)
    sub.add_parser("bench-data", help="input-pipeline throughput (see mmjax bench-data --help)")
    sub.add_parser("bench", help="train-step benchmarks: ViT, CLIP vs HF CLIPModel, --suite gpu "
                                 "(see mmjax bench --help)")
    sub.add_parser("bench-decode", help="greedy decoding vs HF generate (see mmjax bench-decode --help)")

    rest, overrides = _split_overrides(argv)
    args = parser.parse_args(rest)
    if args.command == "train":
        if not os.path.isfile(args.config):
            what = "is a directory, not a file" if os.path.isdir(args.config) else "does not exist"
            return _error(f"--config {args.config} {what} (give an experiment file such as "
                          "experiments/vit_digits.py)")
        from mmjax.config import ConfigError, apply_overrides
        from mmjax.experiment import load_experiment
        from mmjax.train.checkpoint import CheckpointError
        from mmjax.train.loop import train
        try:
            cfg = apply_overrides(load_experiment(args.config), overrides)
            results = train(cfg, args.workdir)
        except ConfigError as e:  # includes a mesh that does not fit the devices
            return _error(str(e))
        except CheckpointError as e:
            return _error(str(e), 1)
        print(json.dumps(results["eval"], indent=2))
        return 0
    if overrides:
        parser.error(f"--config.* overrides only apply to `train`: {overrides}")
    if args.command == "ask":
        return ask(args.workdir, args.image, args.question, max_new_tokens=args.max_new_tokens)
    if args.command == "sample":
        return sample(args.workdir, args.num, args.out, temperature=args.temperature, top_k=args.top_k,
                      seed=args.seed, prompt=args.prompt, cfg_scale=args.cfg_scale, class_id=args.class_id)
    return 1


def sample(workdir: str, num: int, out: str, *, temperature: float | None = None, top_k: int | None = None,
           seed: int = 0, prompt: str | None = None, cfg_scale: float | None = None,
           class_id: int | None = None) -> int:
    """`mmjax sample`: the run's config and latest checkpoint, `num` images drawn on device with the
    run's sampler (or the overrides given), written as one PNG grid. pixel_ar runs draw from BOS;
    vq_ar runs draw `num` images of `prompt` (a caption), or of class `class_id` (class-conditional
    runs), with classifier-free guidance."""
    problem = _run_problem(workdir, ("pixel_ar", "vq_ar"),
                           "an image-generation run (task 'pixel_ar' or 'vq_ar'); `sample` draws images")
    if problem:
        return _error(problem)
    if num < 1 or (temperature is not None and temperature <= 0) or (top_k is not None and top_k < 1):
        return _error("--num and --top-k must be >= 1, --temperature > 0")
    import jax

    from mmjax.data.grid import save_image_grid
    from mmjax.experiment import load_run
    from mmjax.tasks import get_task_class
    cfg, step, params = load_run(workdir)
    class_cond = cfg.task == "vq_ar" and cfg.loss.class_field is not None
    if class_cond and (class_id is None or prompt):
        return _error(f"{workdir} is a class-conditional run (vq_ar, classes of {cfg.loss.class_field!r} in "
                      f"0..{cfg.loss.num_classes - 1}): give --class K, not --prompt")
    if cfg.task == "vq_ar" and not class_cond and (not prompt or class_id is not None):
        return _error(f"{workdir} is a caption-conditional run (vq_ar): give --prompt \"a large red circle at the "
                      "top left\", not --class")
    if cfg.task == "pixel_ar" and (prompt or cfg_scale is not None or class_id is not None):
        return _error(f"{workdir} is an unconditional pixel_ar run: --prompt, --class and --cfg-scale do not apply")
    task = get_task_class(cfg.task)(cfg)
    rng = jax.random.PRNGKey(seed)
    if cfg.task == "pixel_ar":
        images = task.sample(params, num, rng=rng,
                             temperature=cfg.loss.sample_temperature if temperature is None else temperature,
                             top_k=cfg.loss.sample_top_k if top_k is None else top_k)
        value_range = (0, 1)
    else:
        c = cfg.loss
        scale = c.cfg_scale if cfg_scale is None else (None if cfg_scale == 1 else cfg_scale)
        try:
            condition = class_id if class_cond else prompt
            images = task.sample(params, [condition] * num, rng=rng, cfg_scale=scale, top_p=c.top_p,
                                 temperature=c.temperature if temperature is None else temperature,
                                 top_k=c.top_k if top_k is None else top_k)
        except ValueError as e:  # a caption longer than the run's condition slots, a class out of range
            return _error(str(e))
        value_range = (-1, 1)
    path = save_image_grid(images, out, ncols=min(num, 8), value_range=value_range)
    print(f"{num} images from {workdir} (step {step}) → {path}")
    return 0


def _run_problem(workdir: str, tasks: str | tuple[str, ...], wanted: str) -> str | None:
    """Why `workdir` is not a trained run of one of `tasks` (no config.json, another task, no
    checkpoint yet), or None."""
    from pathlib import Path

    from mmjax.experiment import latest_checkpoint_step
    config_path = Path(workdir) / "config.json"
    if not config_path.is_file():
        return f"--workdir {workdir} holds no run (no config.json); give a directory `mmjax train` wrote"
    task_name = json.loads(config_path.read_text()).get("task")
    if task_name not in ((tasks,) if isinstance(tasks, str) else tasks):
        return f"--workdir {workdir} is a {task_name!r} run, not {wanted}"
    if latest_checkpoint_step(workdir) is None:
        return f"--workdir {workdir} has no checkpoint yet (train it first, or wait for its first save)"
    return None


def read_image(path: str):
    """An image file → float32 [H, W, 3] in [0, 1] (RGB; alpha dropped, grey repeated)."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), np.float32) / 255.0
    except FileNotFoundError:
        raise ValueError(f"--image {path} does not exist") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"--image {path} is not a readable image ({e})") from None


def ask(workdir: str, image: str, question: str, *, max_new_tokens: int | None = None) -> int:
    """`mmjax ask`: the run's config and latest checkpoint, the question in the run's prompt
    template after the image block, a greedy answer printed on stdout."""
    problem = _run_problem(workdir, "vlm", "a VLM run (task 'vlm'); `ask` needs a vision-language model")
    if problem:
        return _error(problem)
    try:
        pixels = read_image(image)
    except ValueError as e:
        return _error(str(e))
    from mmjax.experiment import load_run
    from mmjax.tasks.vlm import VLMTask, ask_prompt, image_for
    cfg, _, params = load_run(workdir)
    task = VLMTask(cfg)
    ids = ask_prompt(task, question)
    answer = task.answer(params, image_for(task, pixels), ids, [ids.shape[1]], max_new_tokens=max_new_tokens)[0]
    print(answer)
    return 0


def entry() -> None:
    """The `mmjax` console script: `main`, then exit. It first re-executes itself under glibc's
    huge-page malloc (`mmjax.runtime`) only when asked, MMJAX_HUGEPAGE_MALLOC=1, or for the CPU
    benchmarks on a CPU backend; `mmjax bench` also keeps malloc's memory between executions (one
    big train step at a time, no data pipeline: the case where it pays; see docs/cpu.md)."""
    from mmjax.runtime import KEEP_MEMORY_VAR, reexec_requested, reexec_with_hugepage_malloc
    command = sys.argv[1] if len(sys.argv) > 1 else None
    if reexec_requested(command, os.environ):
        if command == "bench":
            os.environ.setdefault(KEEP_MEMORY_VAR, "1")
        reexec_with_hugepage_malloc(sys.argv[1:], "mmjax.cli")
    sys.exit(main())


if __name__ == "__main__":
    entry()
