"""Evaluations: zero-shot classification and image↔text retrieval over embeddings; image metrics
(PSNR, Fréchet distance and KID in named features) and the `shapes` probe classifier."""

from mmjax.evals.images import frechet_distance, frechet_distance_from_stats, kid, mean_psnr, psnr
from mmjax.evals.probe import Probe, ProbeConfig, load_or_train_probe
from mmjax.evals.retrieval import collect, retrieval_recall
from mmjax.evals.zeroshot import class_embeddings, zero_shot_accuracy

__all__ = ["Probe", "ProbeConfig", "class_embeddings", "collect", "frechet_distance", "frechet_distance_from_stats",
           "kid", "load_or_train_probe", "mean_psnr", "psnr", "retrieval_recall", "zero_shot_accuracy"]
