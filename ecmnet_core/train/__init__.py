"""Training: recipes (YAML + overrides), the trainer, warm-up poly schedule, weighted loss, DDP helpers, logs."""

from ecmnet_core.train.config import TrainConfig, load_config, resolve_config_path
from ecmnet_core.train.losses import WeightedCrossEntropy
from ecmnet_core.train.schedule import WarmupPolyLR, warmup_poly_factor

__all__ = ["TrainConfig", "Trainer", "TrainingError", "WarmupPolyLR", "WeightedCrossEntropy", "load_config",
           "resolve_config_path", "warmup_poly_factor"]


def __getattr__(name: str):
    # the trainer pulls in the data stack and tensorboard; import it only when asked for
    if name in ("Trainer", "TrainingError", "TrainResult"):
        from ecmnet_core.train import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
