"""ecmnet_core: ECMNet CNN-Mamba semantic segmentation (model, data, training, evaluation, inference)."""

__version__ = "0.1.0"
