"""Caption a split's images with a trained image → caption run and score the captions.

    python -m mmjax.evals.captions runs/unified_shapes [--split test] [--num 500] [--json F]

The run's own greedy captioner (`VQARTask.caption_images`) on the first `num` images of the
split; the captions parsed back with the `shapes` grammar and scored per object against the
scene's labels (`caption_attribute_accuracy`), with position by the number of objects in the
scene: 1/k at k objects is what a captioner that pairs objects and cells at random scores.
Prints one JSON object (the scores and the first 8 captions beside their references).
"""

import argparse
import json
import sys
from pathlib import Path


def score_run(workdir: str, split: str = "test", num: int = 500) -> dict:
    """The caption scores of a vq_ar run trained image → caption, on the first num scenes of split."""
    from mmjax.data.vlm import caption_attribute_accuracy, labels_of
    from mmjax.experiment import load_run
    from mmjax.tasks import get_task_class

    cfg, step, params = load_run(workdir)
    if cfg.task != "vq_ar" or "image_to_caption" not in cfg.loss.directions:
        what = f"loss.directions {cfg.loss.directions}" if cfg.task == "vq_ar" else f"task {cfg.task!r}"
        raise ValueError(f"{workdir} does not caption images ({what}): a vq_ar run trained with "
                         "'image_to_caption' in loss.directions does")
    task = get_task_class(cfg.task)(cfg)
    _, images, labels, references = task.prompt_set(split, num)
    captions = task.caption_images(params, images)
    scenes = [labels_of({k: v[i] for k, v in labels.items()}) for i in range(len(captions))]
    return {"run": str(workdir), "step": step, "split": split, **caption_attribute_accuracy(captions, scenes),
            "samples": [{"caption": c, "reference": r} for c, r in zip(captions[:8], references[:8])]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmjax.evals.captions", description=__doc__.split("\n\n")[0])
    p.add_argument("workdir", help="a vq_ar run trained image → caption (e.g. unified_shapes)")
    p.add_argument("--split", default="test")
    p.add_argument("--num", type=int, default=500, help="scenes captioned: the split's first num")
    p.add_argument("--json", default=None, help="also write the scores here")
    args = p.parse_args(argv)
    if args.num < 1:
        p.error("--num must be >= 1")
    try:
        out = score_run(args.workdir, args.split, args.num)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
