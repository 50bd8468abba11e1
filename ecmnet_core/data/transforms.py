"""Image normalisation and the train / eval transforms (LETNet framework augmentation).

Transforms take a BGR uint8 image (H, W, 3) and a uint8 train-id label (H, W), and return
``(image (3, H', W') float32 normalised RGB, label (H', W') int64)``. Randomness comes only from the
``numpy.random.Generator`` passed in, so a fixed seed gives the same crops whatever the data source.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch


def _as_bgr(image: np.ndarray, name: str = "image") -> np.ndarray:
    """(H, W) mono8 or (H, W, 1|3) -> (H, W, 3); anything else is an error."""
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array, got {type(image).__name__}")
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1):
        return np.repeat(image.reshape(image.shape[0], image.shape[1], 1), 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{name}: expected HxWx3 BGR or HxW mono8, got shape {image.shape}")
    return image


def normalize_image(image_bgr: np.ndarray, mean_bgr: Sequence[float], std_bgr: Sequence[float],
                    channels_last: bool = False) -> torch.Tensor:
    """(H, W, 3) BGR uint8 (or (H, W) mono8, replicated) -> (3, H, W) float32 RGB, ``(bgr - mean) / std``.

    ``mean_bgr``/``std_bgr`` are per-channel on the 0..255 scale, in BGR order (the checkpoint convention).
    ``channels_last``: return the (3, H, W) view of an (H, W, 3) tensor, the memory a channels-last network input
    has, instead of a contiguous copy (the inference path: no transposing copy here, none in the engine).
    """
    image = _as_bgr(image_bgr)
    mean = np.asarray(mean_bgr, dtype=np.float32).reshape(-1)
    std = np.asarray(std_bgr, dtype=np.float32).reshape(-1)
    if mean.size != 3 or std.size != 3:
        raise ValueError(f"mean_bgr/std_bgr must have 3 values each, got {mean.size} and {std.size}")
    if np.any(std <= 0):
        raise ValueError(f"std_bgr must be positive, got {std.tolist()}")
    # BGR -> RGB first (on the small uint8 pixels), then (x - mean) * (1 / std) in float32, in place
    rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB) if image.dtype == np.uint8 else np.ascontiguousarray(image[:, :, ::-1])
    x = torch.from_numpy(rgb).float()
    x.sub_(torch.from_numpy(mean[::-1].copy())).mul_(torch.from_numpy((1.0 / std)[::-1].copy()))
    x = x.permute(2, 0, 1)
    return x if channels_last else x.contiguous()


def _label_tensor(label: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(label).astype(np.int64))


def photometric_jitter(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """mmseg-style photometric distortion on BGR uint8: brightness, contrast, saturation, hue, each with p=0.5."""
    x = image.astype(np.float32)
    if rng.random() < 0.5:
        x += rng.uniform(-32, 32)
    contrast_first = rng.random() < 0.5
    contrast = rng.uniform(0.5, 1.5) if rng.random() < 0.5 else None
    if contrast_first and contrast is not None:
        x *= contrast
    do_sat, do_hue = rng.random() < 0.5, rng.random() < 0.5
    sat, hue = rng.uniform(0.5, 1.5), rng.integers(-18, 19)
    if do_sat or do_hue:
        hsv = cv2.cvtColor(np.clip(x, 0, 255).astype(np.uint8), cv2.COLOR_BGR2HSV).astype(np.float32)
        if do_sat:
            hsv[..., 1] = np.clip(hsv[..., 1] * sat, 0, 255)
        if do_hue:
            hsv[..., 0] = (hsv[..., 0] + hue) % 180  # OpenCV 8-bit hue range is 0..179
        x = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2BGR).astype(np.float32)
    if not contrast_first and contrast is not None:
        x *= contrast
    return np.clip(x, 0, 255).astype(np.uint8)


def blur_noise(image: np.ndarray, rng: np.random.Generator, p: float = 0.25) -> np.ndarray:
    """Mild sensor degradation on BGR uint8: Gaussian blur (sigma 0.3-1.5) and Gaussian noise (std 2-8
    grey levels), each with probability ``p``; what a different camera or a dirty lens does to a street."""
    blur, noise = rng.random() < p, rng.random() < p
    sigma, std = rng.uniform(0.3, 1.5), rng.uniform(2.0, 8.0)
    if blur:
        image = cv2.GaussianBlur(image, (0, 0), sigmaX=sigma)
    if noise:
        x = image.astype(np.float32) + rng.normal(0.0, std, image.shape).astype(np.float32)
        image = np.clip(x, 0, 255).astype(np.uint8)
    return image


class TrainTransform:
    """Random scale, pad, random crop, horizontal flip, optional photometric jitter (LETNet framework order).

    Args:
        crop_size: (H, W) of the output.
        mean, std: per-channel BGR statistics on the 0..255 scale.
        ignore_index: label value for padding.
        scale_range: (min, max) of the random scale factor.
        scale_step: draw the scale from ``min, min+step, ..., max`` (the framework's {0.75, ..., 2.0} with
            step 0.25); None draws it uniformly from the range.
        flip: random horizontal flip with p = 0.5.
        jitter: photometric distortion before normalisation.
        blur_noise: mild Gaussian blur and noise (:func:`blur_noise`) after the jitter.
        base_scale: multiplies every scale factor (e.g. 0.5 for reduced-resolution CPU training).
    """

    def __init__(
        self,
        crop_size: tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
        ignore_index: int,
        scale_range: tuple[float, float] = (0.75, 2.0),
        flip: bool = True,
        jitter: bool = False,
        base_scale: float = 1.0,
        scale_step: float | None = 0.25,
        blur_noise: bool = False,
    ) -> None:
        if len(crop_size) != 2 or min(crop_size) <= 0:
            raise ValueError(f"crop_size must be (H, W) with positive values, got {crop_size}")
        lo, hi = scale_range
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must satisfy 0 < min <= max, got {scale_range}")
        if base_scale <= 0:
            raise ValueError(f"base_scale must be positive, got {base_scale}")
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.mean, self.std = list(mean), list(std)
        self.ignore_index = int(ignore_index)
        self.flip, self.jitter, self.base_scale = flip, jitter, float(base_scale)
        self.blur_noise = blur_noise
        if scale_step:
            n = int(round((hi - lo) / scale_step))
            self.scales: np.ndarray | None = lo + scale_step * np.arange(n + 1)
        else:
            self.scales = None
        self.scale_range = (float(lo), float(hi))

    def __call__(
        self, image_bgr: np.ndarray, label: np.ndarray, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        image = _as_bgr(image_bgr)
        if label.shape != image.shape[:2]:
            raise ValueError(f"label shape {label.shape} does not match image shape {image.shape[:2]}")
        f = float(rng.choice(self.scales)) if self.scales is not None else float(rng.uniform(*self.scale_range))
        f *= self.base_scale
        if f != 1.0:
            h, w = image.shape[:2]
            size = (max(1, int(round(w * f))), max(1, int(round(h * f))))
            image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
            label = cv2.resize(label, size, interpolation=cv2.INTER_NEAREST)
        ch, cw = self.crop_size
        h, w = label.shape
        if h < ch or w < cw:  # pad bottom/right: 0 for the image, ignore for the label
            ph, pw = max(ch - h, 0), max(cw - w, 0)
            image = cv2.copyMakeBorder(image, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=(0, 0, 0))
            label = cv2.copyMakeBorder(label, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=self.ignore_index)
            h, w = label.shape
        y = int(rng.integers(0, h - ch + 1))
        x = int(rng.integers(0, w - cw + 1))
        image, label = image[y:y + ch, x:x + cw], label[y:y + ch, x:x + cw]
        if self.flip and rng.random() < 0.5:
            image, label = image[:, ::-1], label[:, ::-1]
        if self.jitter:
            image = photometric_jitter(image, rng)
        if self.blur_noise:
            image = blur_noise(image, rng)
        return normalize_image(image, self.mean, self.std), _label_tensor(label)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(crop_size={self.crop_size}, scale_range={self.scale_range}, "
                f"base_scale={self.base_scale}, flip={self.flip}, jitter={self.jitter}, blur_noise={self.blur_noise})")


@dataclass
class Preprocess:
    """BGR uint8 image -> (3, h, w) normalised RGB float32 at the network size, in (h, w, 3) memory (a batch of
    one is a channels-last tensor without a copy).

    ``input_size`` (H, W) resizes every image to that size; otherwise ``scale`` resizes by a factor (1 = native).
    cv2 bilinear resizing and rounding match :class:`EvalTransform`. Made from a checkpoint by
    :meth:`ecmnet_core.checkpoint.Checkpoint.preprocess` (the Segmenter, eval, predict, replay, bench) or from a
    training run's dataset statistics (training-time validation).
    """

    mean: Sequence[float]
    std: Sequence[float]
    input_size: tuple[int, int] | None = None
    scale: float = 1.0

    def size_for(self, h: int, w: int) -> tuple[int, int]:
        if self.input_size is not None:
            return int(self.input_size[0]), int(self.input_size[1])
        if self.scale != 1.0:
            return max(1, int(round(h * self.scale))), max(1, int(round(w * self.scale)))
        return h, w

    def __call__(self, image_bgr: np.ndarray) -> torch.Tensor:
        """HxWx3 BGR (or HxW mono) uint8 -> (3, h, w) normalised RGB at the network size."""
        if image_bgr.ndim not in (2, 3) or image_bgr.shape[0] == 0 or image_bgr.shape[1] == 0:
            raise ValueError(f"expected an HxWx3 BGR or HxW mono image, got shape {image_bgr.shape}")
        h, w = image_bgr.shape[:2]
        th, tw = self.size_for(h, w)
        if (th, tw) != (h, w):
            image_bgr = cv2.resize(image_bgr, (tw, th), interpolation=cv2.INTER_LINEAR)
        return normalize_image(image_bgr, self.mean, self.std, channels_last=True)



class EvalTransform:
    """Normalisation only; ``scale != 1`` resizes the image (bilinear) but keeps the label at full size,
    so metrics are computed at the original resolution after upsampling the logits."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], scale: float = 1.0) -> None:
        if scale <= 0:
            raise ValueError(f"scale must be positive, got {scale}")
        self.mean, self.std, self.scale = list(mean), list(std), float(scale)

    def __call__(
        self, image_bgr: np.ndarray, label: np.ndarray | None, rng: np.random.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        image = _as_bgr(image_bgr)
        if self.scale != 1.0:
            h, w = image.shape[:2]
            size = (max(1, int(round(w * self.scale))), max(1, int(round(h * self.scale))))
            image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
        return normalize_image(image, self.mean, self.std), (_label_tensor(label) if label is not None else None)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(scale={self.scale})"
