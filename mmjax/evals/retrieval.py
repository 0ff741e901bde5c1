"""Image↔text retrieval recall@k, exact over padded eval batches.

Image i and text j match when `text_image[j] == i` (an image may have several captions).
image→text R@k: the fraction of images with at least one matching text among their k nearest
texts; text→image R@k: the fraction of texts whose image is among their k nearest images.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np


def collect(fn: Callable[[dict], dict], batches: Iterable[dict]) -> dict[str, np.ndarray]:
    """Runs `fn(batch) -> {name: [b, ...]}` over padded batches and keeps the rows whose
    batch["mask"] is True, so each real example appears once, in order."""
    out: dict[str, list] = {}
    for batch in batches:
        mask = np.asarray(batch["mask"], bool)
        for k, v in fn(batch).items():
            out.setdefault(k, []).append(np.asarray(v)[mask])
    return {k: np.concatenate(v) for k, v in out.items()}


def _normalise(x):
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def retrieval_recall(image_emb: np.ndarray, text_emb: np.ndarray, text_image: np.ndarray | None = None,
                     ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k both ways. `text_image` [M] gives each text's image index (default: text j ↔ image j)."""
    zi, zt = _normalise(image_emb), _normalise(text_emb)
    n, m = len(zi), len(zt)
    text_image = np.arange(m) if text_image is None else np.asarray(text_image)
    if text_image.shape != (m,) or (m and (text_image.min() < 0 or text_image.max() >= n)):
        raise ValueError(f"text_image must be [M={m}] indices into the {n} images")
    sim = zi @ zt.T  # [N, M]
    # text → image: rank of the true image among all images for each text.
    true_t = sim[text_image, np.arange(m)]
    rank_t = (sim > true_t[None, :]).sum(0)
    # image → text: best rank over the image's own texts.
    order = np.argsort(-sim, axis=1, kind="stable")
    ranks_i = np.full(n, m)
    for r in range(m):
        hit = text_image[order[:, r]] == np.arange(n)
        ranks_i = np.where(hit & (ranks_i == m), r, ranks_i)
    out = {}
    for k in ks:
        out[f"image_to_text_r{k}"] = float(np.mean(ranks_i < k))
        out[f"text_to_image_r{k}"] = float(np.mean(rank_t < k))
    return out
