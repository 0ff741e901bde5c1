"""Evaluations over embeddings: zero-shot classification and image↔text retrieval."""

from mmjax.evals.retrieval import collect, retrieval_recall
from mmjax.evals.zeroshot import class_embeddings, zero_shot_accuracy

__all__ = ["class_embeddings", "collect", "retrieval_recall", "zero_shot_accuracy"]
