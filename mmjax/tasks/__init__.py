"""Tasks: a task is (model, loss, evals) over a data config. The trainer knows nothing else.

A task class is registered here under the name an experiment config's `task` field uses.
"""

from __future__ import annotations

from mmjax.tasks.autoencoder import AutoencoderTask
from mmjax.tasks.base import Task
from mmjax.tasks.classification import ClassificationTask
from mmjax.tasks.contrastive import ContrastiveTask
from mmjax.tasks.lm import LMTask
from mmjax.tasks.pixel_ar import PixelARTask
from mmjax.tasks.vlm import VLMTask
from mmjax.tasks.vq_ar import VQARTask

TASKS: dict[str, type[Task]] = {
    "autoencoder": AutoencoderTask,
    "classification": ClassificationTask,
    "contrastive": ContrastiveTask,
    "lm": LMTask,
    "pixel_ar": PixelARTask,
    "vlm": VLMTask,
    "vq_ar": VQARTask,
}


def get_task_class(name: str) -> type[Task]:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {sorted(TASKS)}")
    return TASKS[name]


__all__ = ["TASKS", "AutoencoderTask", "ClassificationTask", "ContrastiveTask", "LMTask", "PixelARTask", "Task",
           "VLMTask", "VQARTask", "get_task_class"]
