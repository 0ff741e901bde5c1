"""One functional training loop for every task."""

from mmjax.train.optim import OptimConfig, make_optimizer, make_schedule
from mmjax.train.state import TrainState
from mmjax.train.step import jit_train_step, make_train_step

__all__ = ["OptimConfig", "TrainState", "jit_train_step", "make_optimizer", "make_schedule",
           "make_train_step"]
