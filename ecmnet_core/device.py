"""Where a run works: the torch device (the one ``resolve_device`` for the node, the commands, training and
benchmarks) and the cache folder for what is built on this machine (compiled kernels, ONNX exports)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

CACHE_ENV = "ECMNET_CACHE_DIR"


def cache_dir(name: str) -> Path:
    """The cache folder of one kind of build: ``$ECMNET_CACHE_DIR/<name>`` or ``$XDG_CACHE_HOME/ecmnet/<name>``
    (default ``~/.cache/ecmnet/<name>``)."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root).expanduser() / name
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "ecmnet" / name


def resolve_device(name: str | None, local_rank: int = 0) -> torch.device:
    """``auto`` (or empty) -> CUDA when available, else the CPU; ``cpu``, ``cuda``, ``cuda:N`` as asked.

    A bare ``cuda`` is ``cuda:<local_rank>`` (one GPU per process under torchrun). Asking for CUDA without it, a
    CUDA index that does not exist, or another device type is a ValueError that names the request: never a silent
    fall-back to the CPU.
    """
    name = (name or "auto").strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"device {name!r} is not a valid torch device (use auto, cpu, cuda or cuda:N)") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif device.type != "cpu":
        raise ValueError(f"device {name!r} is not supported: only cpu, cuda and cuda:N (or auto)")
    return device


__all__ = ["CACHE_ENV", "cache_dir", "resolve_device"]
