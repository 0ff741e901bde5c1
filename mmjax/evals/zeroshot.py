"""Zero-shot classification with a two-tower model (CLIP recipe).

    w_c = normalise( mean_t normalise(f_T(template_t(class_c))) )     one vector per class
    prediction(x) = argmax_c ⟨normalise(f_I(x)), w_c⟩

Templates are strings with "{}" where the class name goes ("a photo of a {} object").
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def class_embeddings(embed_texts: Callable[[list[str]], np.ndarray], class_names: Sequence[str],
                     templates: Sequence[str]) -> np.ndarray:
    """[C, E] unit vectors: each class's template embeddings normalised, averaged, renormalised.

    `embed_texts(list of C·T strings) -> [C·T, E]` (e.g. tokenise + CLIP.encode_text)."""
    if not class_names or not templates:
        raise ValueError("zero-shot needs at least one class name and one template")
    for t in templates:
        if "{}" not in t:
            raise ValueError(f"template {t!r} has no '{{}}' for the class name")
    prompts = [t.format(name) for name in class_names for t in templates]
    emb = _normalise(embed_texts(prompts)).reshape(len(class_names), len(templates), -1)
    return _normalise(emb.mean(axis=1))


def zero_shot_accuracy(image_emb: np.ndarray, labels: np.ndarray, classes: np.ndarray,
                       ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy of argmax_c ⟨image, class⟩ over N images (padding already removed).
    k larger than the number of classes counts as the number of classes."""
    image_emb, labels = _normalise(image_emb), np.asarray(labels)
    if image_emb.shape[0] != labels.shape[0]:
        raise ValueError(f"{image_emb.shape[0]} image embeddings but {labels.shape[0]} labels")
    scores = image_emb @ np.asarray(classes, np.float64).T  # [N, C]
    # Rank of the true class = number of classes scoring strictly higher (ties favour the truth).
    true = scores[np.arange(len(labels)), labels]
    rank = (scores > true[:, None]).sum(-1)
    return {f"top{k}": float(np.mean(rank < k)) for k in ks} | {"count": len(labels)}
