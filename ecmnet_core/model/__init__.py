"""ECMNet model: building blocks and the builder."""

from ecmnet_core.model.attention import DDA, ECA
from ecmnet_core.model.ecmnet import VARIANTS, ECMNet, ModelConfig, build_model, model_config
from ecmnet_core.model.edab import EDAB
from ecmnet_core.model.ffm import FFM
from ecmnet_core.model.msau import MSAU
from ecmnet_core.model.ss2d import SS2D, SelectiveScan

__all__ = ["DDA", "ECA", "EDAB", "FFM", "MSAU", "SS2D", "VARIANTS", "ECMNet", "ModelConfig", "SelectiveScan",
           "build_model", "model_config"]
