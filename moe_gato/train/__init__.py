"""Training: one trainer, plain or under DeepSpeed (ZeRO, expert parallel), exact resume."""

from moe_gato.train.config import DeepSpeedConfig, OptimConfig, TrainConfig, load_train_config
from moe_gato.train.trainer import Trainer, TrainingError, lr_at, train

__all__ = ["DeepSpeedConfig", "OptimConfig", "TrainConfig", "Trainer", "TrainingError",
           "load_train_config", "lr_at", "train"]
