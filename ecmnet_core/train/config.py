"""Training configuration: nested dataclasses loaded from YAML, overridable with ``key.sub=value`` strings.

A config file mirrors the dataclasses section by section (``model``, ``data``, ``optim``, ``schedule``, ``train``);
unknown keys are errors that name the file and the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

#: Folder of the recipes shipped inside the package (``camvid.yaml``, ``cityscapes.yaml``).
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


class ConfigError(ValueError):
    """A configuration file or override that cannot be applied."""


@dataclass
class ModelSection:
    """Which network to train. ``overrides`` are extra :class:`ecmnet_core.model.ModelConfig` fields."""

    name: str = "ecmnet"
    scan_backend: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataSection:
    """Dataset location, augmentation and loader settings. Sizes are (H, W) in pixels."""

    kind: str | None = None  # camvid | cityscapes | folder | shards; None = detect from the root
    root: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    train_list: str | None = None
    val_list: str | None = None
    classes_yaml: str | None = None
    crop: tuple[int, int] = (360, 480)
    scale_range: tuple[float, float] = (0.75, 2.0)
    #: draw the scale from min, min+step, ..., max (the framework's {0.75, ..., 2.0}); null: uniform in the range
    scale_step: float | None = 0.25
    flip: bool = True
    #: photometric distortion (brightness, contrast, saturation, hue; mmseg's PhotoMetricDistortion)
    jitter: bool = False
    #: mild Gaussian blur and sensor noise, each with p = 0.25 (ecmnet_core.data.transforms.blur_noise)
    blur_noise: bool = False
    #: every training image is first resized by this factor (0.5 trains a CamVid model at 180x240 "native")
    base_scale: float = 1.0
    #: validation images are resized by this factor; labels stay full size and logits are upsampled to them
    val_scale: float = 1.0
    batch_size: int = 8
    workers: int = 4
    #: progressive resizing: [{epochs: N, scale: s}, ...] trains the first N epochs with images and crop scaled by s
    #: (then the next stage's; epochs after the last stage use the plain settings). Empty: one resolution throughout
    stages: list[dict[str, Any]] = field(default_factory=list)
    #: keep the decoded training images in memory as uint8 (decoded once, before the loader workers fork)
    cache: bool = True
    #: "enet" (1/ln(1.10+p) from the training data), "none", or an explicit list of K weights
    class_weights: Any = "enet"
    #: the weights are raised to this power: 1 as given, 0.5 a milder weighting of the rare classes
    class_weight_power: float = 1.0


@dataclass
class OptimSection:
    """Optimiser (``adam``, ``adamw`` or ``sgd``) and its hyper-parameters."""

    name: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.9
    nesterov: bool = False
    #: weight decay also on one-dimensional parameters (norm affines, biases, PReLU slopes), as the paper's Adam;
    #: false keeps it off them, where Adam's coupled decay starts killing whole branches (train/revive.py)
    decay_norms_and_biases: bool = True


@dataclass
class ScheduleSection:
    """Warm-up poly learning rate, recomputed every iteration (LETNet/ECMNet ``WarmupPolyLR``)."""

    warmup_iters: int = 500
    warmup_ratio: float = 1.0 / 3.0
    power: float = 0.9
    min_lr: float = 0.0


@dataclass
class TrainSection:
    """Loop settings. ``max_iters`` > 0 caps the total number of iterations (smoke runs)."""

    epochs: int = 1000
    val_every: int = 50
    seed: int = 1234
    device: str = "auto"
    amp: bool = False
    grad_clip: float = 0.0
    sync_bn: bool = False
    max_iters: int = 0
    #: also write last.pt every this many iterations (0: only at the end of each epoch)
    checkpoint_every: int = 0
    #: give up after this many consecutive batches with a non-finite loss
    max_bad_batches: int = 20
    #: warm start: model weights (not optimiser or schedule) from this checkpoint, "packaged" for the shipped
    #: CamVid model; ignored when the run resumes from its own last.pt
    init: str | None = None
    #: how the step runs: "default" (channels-last, fused CPU kernels; ecmnet_core.train.train_path) or
    #: "baseline" (fp32 NCHW, pure-PyTorch scan), for comparisons; both compute the same function
    path: str = "default"
    progress: bool = True
    #: exponential moving average of the weights with this decay (0: off); validated, best.pt and releases hold it
    ema_decay: float = 0.0
    #: with train.init: when that checkpoint records a position in this same schedule (a release of this run),
    #: continue there (iteration, learning rate, EMA) instead of starting a fresh schedule from its weights
    continue_schedule: bool = True
    #: after such a continuation the optimiser moments start from zero: ramp the learning rate up over this many
    #: iterations so the first steps are not larger than the schedule's
    rewarm_iters: int = 45
    #: after a warm start (train.init, not a continuation), re-initialise the parts weight decay killed without
    #: changing the model's output (ecmnet_core.train.revive)
    revive: bool = False


@dataclass
class TrainConfig:
    """A complete training recipe."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    train: TrainSection = field(default_factory=TrainSection)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists) that YAML, JSON and ``weights_only`` checkpoints accept."""
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> TrainConfig:
        config = cls()
        for key, value in (data or {}).items():
            _assign(config, key, value, source)
        return config

    def with_overrides(self, overrides: list[str], source: str = "--set") -> TrainConfig:
        """Apply ``section.key=value`` strings; values are parsed as YAML (``0.002``, ``[180, 240]``, ``null``)."""
        config = self.from_dict(self.to_dict())
        for item in overrides:
            key, sep, raw = item.partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"{source}: {item!r} is not of the form section.key=value")
            try:
                value = yaml.safe_load(raw)
            except yaml.YAMLError as exc:
                raise ConfigError(f"{source}: cannot parse the value of {key.strip()!r}: {exc}") from exc
            _assign(config, key.strip(), value, source)
        return config


def resolve_config_path(name: str | Path) -> Path:
    """A config given as a path, or as the name of a shipped recipe (``camvid``, ``camvid.yaml``)."""
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (CONFIG_DIR / path.name, CONFIG_DIR / f"{path.name}.yaml"):
        if candidate.is_file():
            return candidate
    shipped = ", ".join(sorted(p.name for p in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"config {name!s} not found (neither a file nor a shipped recipe: {shipped})")


def load_config(name: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML recipe (path or shipped name) and apply ``overrides``."""
    path = resolve_config_path(name)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path}: invalid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config {path}: expected a mapping of sections, got {type(data).__name__}")
    return TrainConfig.from_dict(data, str(path)).with_overrides(overrides or [])


def _assign(config: TrainConfig, key: str, value: Any, source: str) -> None:
    """Set ``section.key`` (or a whole ``section`` from a mapping) with type checking."""
    parts = key.split(".")
    section_name = parts[0]
    sections = {f.name for f in dataclasses.fields(TrainConfig)}
    if section_name not in sections:
        raise ConfigError(f"{source}: unknown section {section_name!r} (known: {', '.join(sorted(sections))})")
    section = getattr(config, section_name)
    if len(parts) == 1:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: section {section_name!r} must be a mapping, got {value!r}")
        for sub, sub_value in value.items():
            _assign(config, f"{section_name}.{sub}", sub_value, source)
        return
    name = parts[1]
    types_ = {f.name: f.type for f in dataclasses.fields(section)}
    if name not in types_:
        raise ConfigError(f"{source}: unknown key {section_name}.{name} (known: {', '.join(sorted(types_))})")
    if len(parts) > 2:  # model.overrides.widths=... style
        if not isinstance(getattr(section, name), dict):
            raise ConfigError(f"{source}: {section_name}.{name} is not a mapping, cannot set {key}")
        getattr(section, name)[".".join(parts[2:])] = value
        return
    hints = typing.get_type_hints(type(section))
    setattr(section, name, _coerce(value, hints[name], key, source))


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    """Check ``value`` against a dataclass field type, converting lists to tuples and ints to floats."""
    if hint is Any:
        return value
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key, source)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{source}: bad value for {key}: {value!r}")
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{source}: {key} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, key, source) for v, a in zip(value, args))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key} must be a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{source}: {key} must be a number, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: {key} must be an integer, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{source}: {key} must be a string, got {value!r}")
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
