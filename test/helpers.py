"""Helpers shared by the tests: tiny generated datasets and checkpoints (``from helpers import ...``).

The images are flat class colours plus noise, so a few optimiser steps visibly lower the loss.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from ecmnet_core.checkpoint import Checkpoint, save_checkpoint
from ecmnet_core.data import CAMVID, DatasetInfo
from ecmnet_core.model import build_model

VOID = 11


def make_label(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Sky over building over road, a car box and a few void pixels: (h, w) uint8 CamVid ids."""
    label = np.full((h, w), 1, np.uint8)
    label[: h // 3] = 0
    label[2 * h // 3:] = 3
    y, x = int(rng.integers(h // 3, 2 * h // 3)), int(rng.integers(0, w - w // 4))
    label[y:y + h // 4, x:x + w // 4] = 8
    label[rng.random((h, w)) < 0.02] = VOID
    return label


def render(label: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """BGR uint8 image: each class in its palette colour, plus Gaussian noise."""
    lut = np.zeros((256, 3), np.float32)
    lut[: CAMVID.num_classes] = CAMVID.palette_array()[:, ::-1]
    image = lut[label] + rng.normal(0, 12, (*label.shape, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def make_camvid(root: Path, n_train: int = 6, n_val: int = 2, size: tuple[int, int] = (48, 64),
                seed: int = 0) -> Path:
    """A CamVid-layout dataset (train/, trainannot/, val/, valannot/) of generated scenes under ``root``."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        (root / split).mkdir(parents=True, exist_ok=True)
        (root / f"{split}annot").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            label = make_label(*size, rng)
            cv2.imwrite(str(root / split / f"{split}_{i:04d}.png"), render(label, rng))
            cv2.imwrite(str(root / f"{split}annot" / f"{split}_{i:04d}.png"), label)
    return root


def make_checkpoint(path: Path, info: DatasetInfo = CAMVID, model: str = "baseline",
                    input_size: tuple[int, int] | None = (32, 48), seed: int = 0) -> Path:
    """A randomly initialised (seeded) checkpoint with the dataset's classes; BN statistics are perturbed so the
    predictions are not all one class."""
    torch.manual_seed(seed)
    net = build_model(model, info.num_classes)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    ckpt = Checkpoint(model_config=net.config, state_dict=net.state_dict(), class_names=list(info.class_names),
                      palette=[list(c) for c in info.palette], mean=[100.0, 100.0, 100.0], std=[60.0, 60.0, 60.0],
                      ignore_index=info.ignore_index, input_size=list(input_size) if input_size else None,
                      dataset=info.name)
    return save_checkpoint(ckpt, path)
