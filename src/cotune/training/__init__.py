"""Training front end: the YAML config, the loop with checkpoints and resume, logs, ColA run names."""

from cotune.tasks.order import epoch_order
from cotune.training.config import TrainConfig, load_config, save_config
from cotune.training.control_name import control_name_config, parse_control_name
from cotune.training.trainer import Trainer, TrainResult, train

__all__ = [
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "control_name_config",
    "epoch_order",
    "load_config",
    "parse_control_name",
    "save_config",
    "train",
]
