"""The `mmjax` command.

    mmjax train --config experiments/vit_digits.py --workdir runs/vit_digits [--config.KEY=VALUE ...]
    mmjax bench [--model vit|clip] [...]
    mmjax bench-data [--name shapes] [...]
    mmjax bench-decode [--batch-sizes 8,1] [...]
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
    tr = sub.add_parser("train", help="train an experiment config")
    tr.add_argument("--config", required=True, help="experiments/NAME.py defining get_config()")
    tr.add_argument("--workdir", required=True, help="run directory (resumed if it holds checkpoints)")
    sub.add_parser("bench-data", help="input-pipeline throughput (see mmjax bench-data --help)")
    sub.add_parser("bench", help="train-step benchmarks: ViT, or CLIP vs HF CLIPModel (see mmjax bench --help)")
    sub.add_parser("bench-decode", help="greedy decoding vs HF generate (see mmjax bench-decode --help)")

    rest, overrides = _split_overrides(argv)
    args = parser.parse_args(rest)
    if args.command == "train":
        from mmjax.config import ConfigError, apply_overrides
        from mmjax.experiment import load_experiment
        from mmjax.train.loop import train
        try:
            cfg = apply_overrides(load_experiment(args.config), overrides)
            results = train(cfg, args.workdir)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(json.dumps(results["eval"], indent=2))
        return 0
    if overrides:
        parser.error(f"--config.* overrides only apply to `train`: {overrides}")
    return 1


def entry() -> None:
    """The `mmjax` console script: `main` under huge-page malloc (`mmjax.runtime`), then exit.
    `mmjax bench` also keeps malloc's memory between executions (one big train step at a time, no
    data pipeline: the case where it pays; see mmjax/runtime.py)."""
    from mmjax.runtime import KEEP_MEMORY_VAR, reexec_with_hugepage_malloc
    if sys.argv[1:2] == ["bench"]:
        os.environ.setdefault(KEEP_MEMORY_VAR, "1")
    reexec_with_hugepage_malloc(sys.argv[1:], "mmjax.cli")
    sys.exit(main())


if __name__ == "__main__":
    entry()
