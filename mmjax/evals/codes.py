"""How local are a VQ tokenizer's codes? Entropies of codes against the pixel patches they cover.

A tokenizer with downsampling f maps each f×f patch of an image to one code. If a code were a
function of its own patch, the code would carry no more than the patch does; an encoder with a
wide receptive field and a large, fully used codebook instead spreads one patch content (a flat
black 4×4 patch, say) over many codes chosen by the patch's surroundings. An AR model over the
codes then has to predict those context-dependent choices, which the caption does not fix. With
plug-in (empirical) estimates over the patches of a set of images, in nats:

    H(code)           entropy of the codes
    H(patch)          entropy of the exact pixel contents of the f×f patches
    H(code | patch) = H(code, patch) − H(patch)    0 when the code is a function of its patch
    H(patch | code) = H(code, patch) − H(code)     0 when the code fixes its patch

and, for the most frequent patch contents, how many distinct codes encode each one.

    python -m mmjax.evals.codes --workdir runs/vqgan_shapes [--split train] [--images 2000]
"""

from __future__ import annotations

import argparse
import collections

import numpy as np


def entropy(counts) -> float:
    """Plug-in entropy in nats of a distribution given by counts (any iterable of non-negative numbers)."""
    c = np.asarray(list(counts), np.float64)
    c = c[c > 0]
    p = c / c.sum()
    return float(-(p * np.log(p)).sum())


def patch_keys(images: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """images [N, H, W, C] (any dtype) → one int64 key per patch [N·h·w], patches in the codes' raster
    order (row-major over the h×w grid): equal keys ⇔ equal patch contents."""
    n, hh, ww, ch = images.shape
    h, w = grid
    if hh % h or ww % w:
        raise ValueError(f"images of {hh}×{ww} do not split into a {h}×{w} grid of equal patches")
    fh, fw = hh // h, ww // w
    patches = (np.ascontiguousarray(images).reshape(n, h, fh, w, fw, ch)
               .transpose(0, 1, 3, 2, 4, 5).reshape(n * h * w, fh * fw * ch))
    _, keys = np.unique(patches, axis=0, return_inverse=True)
    return keys.reshape(-1).astype(np.int64)


def code_patch_entropies(codes: np.ndarray, images: np.ndarray, *, top: int = 5) -> dict:
    """codes int [N, h, w] of images [N, H, W, C] (the exact pixels, e.g. uint8) → the entropies of
    the module docstring, the number of distinct codes and patches, and for the `top` most frequent
    patch contents: (patches, distinct codes, the share of the commonest code)."""
    codes = np.asarray(codes)
    if codes.ndim != 3 or len(codes) != len(images):
        raise ValueError(f"codes must be [N, h, w] for N = {len(images)} images, got {codes.shape}")
    keys = patch_keys(np.asarray(images), codes.shape[1:])
    c = codes.reshape(-1).astype(np.int64)
    joint = collections.Counter(zip(keys.tolist(), c.tolist()))
    h_code = entropy(collections.Counter(c.tolist()).values())
    h_patch = entropy(collections.Counter(keys.tolist()).values())
    h_joint = entropy(joint.values())
    per_patch: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    for (k, code), v in joint.items():
        per_patch[k][code] += v
    commonest = sorted(per_patch.values(), key=lambda ctr: -sum(ctr.values()))[:top]
    return {"h_code": h_code, "h_patch": h_patch, "h_code_given_patch": h_joint - h_patch,
            "h_patch_given_code": h_joint - h_code, "codes": len(np.unique(c)),
            "patches": int(keys.max() + 1),
            "top_patches": [(sum(ctr.values()), len(ctr), ctr.most_common(1)[0][1] / sum(ctr.values()))
                            for ctr in commonest]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmjax.evals.codes", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="an `autoencoder` run with model.kind 'vq'")
    p.add_argument("--split", default="train")
    p.add_argument("--images", type=int, default=2000)
    args = p.parse_args(argv)

    import jax

    from mmjax.data import pipeline
    from mmjax.models.autoencoder import tokenize
    from mmjax.tasks.vq_ar import load_vq_tokenizer

    model, params, cfg = load_vq_tokenizer(args.workdir)
    params = jax.tree.map(jax.numpy.asarray, params)
    codes, pixels = [], []
    for batch in pipeline.eval_batches(cfg.data, split=args.split, global_batch_size=500,
                                       process_index=0, process_count=1):
        keep = np.asarray(batch["mask"], bool)
        images = np.asarray(batch["image"], np.float32)[keep]
        codes.append(np.asarray(tokenize(model, params, images)))
        lo, hi = (-1.0, 1.0) if cfg.data.value_range == "symmetric" else (0.0, 1.0)
        pixels.append(np.round((images - lo) / (hi - lo) * 255).astype(np.uint8))
        if sum(len(x) for x in codes) >= args.images:
            break
    codes, pixels = np.concatenate(codes)[: args.images], np.concatenate(pixels)[: args.images]
    r = code_patch_entropies(codes, pixels)
    f = pixels.shape[1] // codes.shape[1]
    print(f"{args.workdir}: {len(codes)} {args.split} images, {codes.shape[1]}×{codes.shape[2]} codes of "
          f"{f}×{f} px; {r['codes']} codes and {r['patches']} distinct patches in use")
    print(f"H(code) {r['h_code']:.3f}  H(patch) {r['h_patch']:.3f}  H(code|patch) {r['h_code_given_patch']:.3f}  "
          f"H(patch|code) {r['h_patch_given_code']:.3f} nats")
    for n, distinct, share in r["top_patches"]:
        print(f"  a patch content seen {n} times: {distinct} distinct codes, the commonest {share:.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
