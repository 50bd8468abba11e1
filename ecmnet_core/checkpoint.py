"""The ecmnet checkpoint: one file with weights, model config, class metadata and training state.

Everything in it is a tensor, a number, a string, or a list/dict of those, so it loads with
``torch.load(weights_only=True)``: no arbitrary pickles.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ecmnet_core.data.classes import default_palette
from ecmnet_core.data.transforms import Preprocess
from ecmnet_core.model import ECMNet, ModelConfig, build_model, model_config

FORMAT = "ecmnet-checkpoint"
VERSION = 1
#: The CamVid model shipped with the package, used when no checkpoint is given.
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "weights" / "ecmnet_camvid.pt"


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unreadable, or does not fit what the caller asked for."""


@dataclass
class Checkpoint:
    """A model with everything needed to pre- and post-process its inputs and outputs.

    ``mean``/``std`` are per-channel BGR statistics on the 0..255 scale; ``palette`` holds RGB triples.
    ``input_size`` is the (H, W) the model is meant to run at, or None for native resolution.
    ``training_state`` (``last.pt`` only) resumes a run exactly; ``continuation`` (``best.pt`` and releases) is
    the small record that lets a run go on from the release when its folder is gone: the position in the
    schedule, the EMA's update count and, when ``state_dict`` holds EMA weights, the raw weights in fp16.
    """

    model_config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    class_names: list[str]
    palette: list[list[int]]
    mean: list[float]
    std: list[float]
    ignore_index: int = 255
    input_size: list[int] | None = None
    class_weights: list[float] | None = None
    dataset: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    training_state: dict[str, Any] | None = None
    continuation: dict[str, Any] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def preprocess(self, input_size: tuple[int, int] | list[int] | None = None, scale: float = 1.0) -> Preprocess:
        """This checkpoint's pre-processing (BGR uint8 image -> normalised RGB tensor): resize to ``input_size``
        (H, W) (None: native, or by ``scale``), then normalise with the stored mean/std. The one place
        pre-processing is made from a checkpoint: the Segmenter, eval, predict, replay and the benchmarks use it."""
        size = (int(input_size[0]), int(input_size[1])) if input_size is not None else None
        return Preprocess(list(self.mean), list(self.std), size, scale)

    def build_model(self, scan_backend: str | None = None) -> ECMNet:
        """The model with these weights; ``scan_backend`` overrides the stored selective-scan backend."""
        config = ModelConfig.from_dict({**self.model_config.to_dict(), "scan_backend": scan_backend})
        model = build_model(config)
        load_state_into(model, self)
        return model

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "model_config": self.model_config.to_dict(),
            "state_dict": self.state_dict,
            "class_names": list(self.class_names),
            "palette": [list(map(int, c)) for c in self.palette],
            "mean": [float(v) for v in self.mean],
            "std": [float(v) for v in self.std],
            "ignore_index": int(self.ignore_index),
            "input_size": list(self.input_size) if self.input_size else None,
            "class_weights": [float(w) for w in self.class_weights] if self.class_weights else None,
            "dataset": self.dataset,
            "metadata": self.metadata,
            "training_state": self.training_state,
            "continuation": self.continuation,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<memory>") -> Checkpoint:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise CheckpointError(f"{source}: not an ecmnet checkpoint (no format={FORMAT!r} entry)")
        if data.get("version", 0) > VERSION:
            raise CheckpointError(f"{source}: checkpoint version {data['version']} is newer than supported "
                                  f"({VERSION}); upgrade ecmnet")
        try:
            config = ModelConfig.from_dict(data["model_config"])
            ckpt = cls(
                model_config=config, state_dict=data["state_dict"], class_names=list(data["class_names"]),
                palette=[list(c) for c in data["palette"]], mean=list(data["mean"]), std=list(data["std"]),
                ignore_index=int(data.get("ignore_index", 255)), input_size=data.get("input_size"),
                class_weights=data.get("class_weights"), dataset=data.get("dataset", ""),
                metadata=dict(data.get("metadata") or {}), training_state=data.get("training_state"),
                continuation=data.get("continuation"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{source}: malformed checkpoint ({exc})") from exc
        if config.num_classes != len(ckpt.class_names):
            raise CheckpointError(f"{source}: model has {config.num_classes} classes but "
                                  f"{len(ckpt.class_names)} class names are stored")
        return ckpt


def cast_floats(weights: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``weights`` with every floating-point tensor in ``dtype`` (e.g. fp16 for a release's continuation record,
    back to fp32 to load it); integer buffers as they are."""
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}


def file_sha256(path: str | os.PathLike, length: int = 12) -> str:
    """Short content hash of a file, reported by the node's diagnostics."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:length]


def remove_stale_temporaries(directory: str | os.PathLike, max_age_s: float = 60.0) -> list[Path]:
    """Delete the ``.<name>.*.tmp`` files that :func:`save_checkpoint` leaves when killed mid-write (kill -9).

    Only files older than ``max_age_s`` go, so a save in progress in another process is left alone.
    Returns the removed paths.
    """
    removed = []
    now = time.time()
    for tmp in Path(directory).glob(".*.pt.*.tmp"):
        try:
            if now - tmp.stat().st_mtime > max_age_s:
                tmp.unlink()
                removed.append(tmp)
        except OSError:  # gone meanwhile, or not ours to delete
            continue
    return removed


def save_checkpoint(ckpt: Checkpoint, path: str | os.PathLike) -> Path:
    """Write atomically: to a temporary file in the same folder, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(ckpt.to_dict(), tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; a checkpoint is an ordinary shareable file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | os.PathLike | None = None, map_location: str | torch.device = "cpu",
                    expect_classes: int | None = None, expect_model: str | None = None) -> Checkpoint:
    """Load a checkpoint (the packaged default when ``path`` is None) with ``weights_only=True``.

    ``expect_classes`` / ``expect_model`` make a mismatch an error that names the file and both values.
    """
    path = Path(path) if path else DEFAULT_CHECKPOINT
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory, not a checkpoint file")
    if not path.is_file():
        hint = " (the packaged default model is missing: reinstall ecmnet)" if path == DEFAULT_CHECKPOINT else ""
        raise CheckpointError(f"checkpoint {path} does not exist{hint}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): an interrupted copy or save?")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # pickle errors, truncated files, zip errors, foreign pickles
        raise CheckpointError(f"checkpoint {path} cannot be read: {_load_failure(exc)}") from None
    ckpt = Checkpoint.from_dict(data, str(path))
    if expect_classes is not None and ckpt.num_classes != expect_classes:
        raise CheckpointError(f"checkpoint {path} has {ckpt.num_classes} classes, expected {expect_classes}")
    if expect_model is not None and ckpt.model_config.name != expect_model:
        raise CheckpointError(f"checkpoint {path} holds model {ckpt.model_config.name!r}, expected {expect_model!r}")
    return ckpt


def _load_failure(exc: Exception) -> str:
    """One line on why ``torch.load`` failed, without PyTorch's advice to unpickle untrusted files."""
    text = str(exc)
    if "Unsupported global" in text:
        return "it holds Python objects other than tensors and plain values (not an ecmnet checkpoint)"
    if any(k in text for k in ("Unsupported operand", "zip archive", "central directory", "invalid load key",
                               "pickle", "weights_only", "WeightsUnpickler")):
        return "not a PyTorch checkpoint file (truncated, or some other kind of file)"
    return text.splitlines()[0] if text else type(exc).__name__


def load_state_into(model: nn.Module, ckpt: Checkpoint, source: str = "checkpoint") -> None:
    """Load weights into an existing model, turning shape mismatches into a clear error."""
    config = getattr(model, "config", None)
    if config is not None and _architecture(config) != _architecture(ckpt.model_config):
        raise CheckpointError(f"{source}: architecture differs from the model being loaded into "
                              f"({ckpt.model_config.name}, {ckpt.num_classes} classes)")
    try:
        model.load_state_dict(ckpt.state_dict)
    except RuntimeError as exc:
        raise CheckpointError(f"{source}: weights do not fit the model: {exc}") from exc


def _architecture(config: ModelConfig) -> dict[str, Any]:
    """The parts of a config that decide the weights' shapes (the scan backend does not)."""
    return {k: v for k, v in config.to_dict().items() if k not in ("scan_backend", "extra")}

#: Normalisation (BGR mean/std, 0..255) that random-weight checkpoints carry.
DEFAULT_MEAN = (105.658, 103.330, 99.625)
DEFAULT_STD = (71.116, 71.676, 67.876)


def random_checkpoint_hash(model: str, num_classes: int) -> str:
    """What stands for a checkpoint hash (logs, diagnostics, export cache keys) for random weights."""
    return f"random-{model}-{num_classes}"


def random_checkpoint(model: str, num_classes: int) -> Checkpoint:
    """An untrained variant with default metadata (seeded, so timings and tests are repeatable)."""
    cfg = model_config(model, num_classes)
    torch.manual_seed(0)
    return Checkpoint(model_config=cfg, state_dict=build_model(cfg).state_dict(),
                      class_names=[f"class_{i}" for i in range(num_classes)],
                      palette=[list(c) for c in default_palette(num_classes)],
                      mean=list(DEFAULT_MEAN), std=list(DEFAULT_STD), metadata={"random_weights": True})
