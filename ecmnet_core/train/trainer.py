"""The training loop: data, model, optimiser, schedule, AMP, DDP, validation, checkpoints and exact resume.

Reproducibility: sample order comes from a seeded ``DistributedSampler`` (seed, epoch) and augmentation from
``np.random.default_rng((seed, epoch, index))`` per sample, so neither depends on worker processes. Together
with the stored optimiser, scheduler, scaler and RNG states, a run resumed from ``last.pt`` (saved at an epoch
end, every ``checkpoint_every`` iterations, or on SIGINT/SIGTERM) continues exactly where it stopped.
"""

from __future__ import annotations

import copy
import math
import os
import platform
import random
import signal
import sys
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from ecmnet_core.checkpoint import (
    Checkpoint,
    CheckpointError,
    cast_floats,
    load_checkpoint,
    load_state_into,
    remove_stale_temporaries,
    save_checkpoint,
)
from ecmnet_core.data import (
    SegmentationDataset,
    TrainTransform,
    build_dataset,
    compute_stats,
    detect_kind,
    load_raw,
)
from ecmnet_core.device import resolve_device
from ecmnet_core.evaluate import evaluate_samples
from ecmnet_core.model import build_model, model_config
from ecmnet_core.ops import fp_mode_cpu
from ecmnet_core.train.config import TrainConfig
from ecmnet_core.train.distributed import DistEnv, any_rank, barrier, broadcast_object
from ecmnet_core.train.ema import ModelEMA
from ecmnet_core.train.losses import WeightedCrossEntropy
from ecmnet_core.train.revive import revive_vanished
from ecmnet_core.train.run_log import EpochRecord, RunLogger
from ecmnet_core.train.schedule import WarmupPolyLR, effective_warmup
from ecmnet_core.train.train_path import apply_train_path, prepare_batch, train_path


class TrainingError(RuntimeError):
    """Training cannot go on (diverged, bad data); ``last.pt`` still holds the last good state."""


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` reports. ``stopped`` is "done", "max_iters" or "signal"."""

    run_dir: Path
    epochs_done: int
    iterations: int
    best_miou: float
    best_epoch: int
    last_val: dict[str, Any] | None
    wall_time_s: float
    stopped: str
    signal: int | None = None


class Trainer:
    """Train one model as described by a :class:`TrainConfig`; outputs go to ``run_dir``.

    Args:
        config: the recipe (with ``data.root`` set).
        run_dir: folder for ``last.pt``, ``best.pt``, ``log.csv``, plots, TensorBoard events, dataset stats.
        env: distributed placement (default: single process on ``config.train.device``).
        resume: a ``last.pt`` to continue from, ``"auto"`` (``run_dir/last.pt`` when it exists) or None.
        tensorboard: write TensorBoard event files.
        plots: redraw ``loss.png`` and ``miou.png`` after every epoch.
    """

    def __init__(self, config: TrainConfig, run_dir: str | Path, env: DistEnv | None = None,
                 resume: str | Path | None = None, tensorboard: bool = True, plots: bool = True) -> None:
        self.config = config
        self.run_dir = Path(run_dir)
        self.env = env or DistEnv(device=resolve_device(config.train.device))
        self.device = self.env.device
        self.tensorboard = tensorboard
        self.plots = plots
        self._stop_signal: int | None = None
        self._handler_pid = os.getpid()
        c, d = config.train, config.data
        if not d.root:
            raise ValueError("training needs a dataset: set data.root (--data ROOT)")
        for name, value in (("train.epochs", c.epochs), ("data.batch_size", d.batch_size)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if d.workers < 0 or c.max_iters < 0 or c.checkpoint_every < 0 or c.grad_clip < 0 or c.val_every < 0:
            raise ValueError("data.workers, train.max_iters, train.checkpoint_every, train.grad_clip and "
                             "train.val_every must be >= 0")
        self.amp = bool(c.amp)
        if self.amp and self.device.type != "cuda":
            warnings.warn("train.amp needs CUDA; training in fp32 on the CPU", stacklevel=2)
            self.amp = False
        _seed_everything(c.seed)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

        self._setup_data()
        self._setup_model()
        if self.env.is_main and self.run_dir.is_dir():
            # left by a kill during a save, however recent: this process owns the run folder now
            for tmp in remove_stale_temporaries(self.run_dir, max_age_s=0.0):
                print(f"removed stale temporary checkpoint {tmp}", file=sys.stderr)
        self.init_source: str | None = None
        self.continued_from: str | None = None  # a release whose schedule this run goes on with
        self.resume_path = self._resume_path(resume)
        if self.resume_path is not None:
            self._load_training_state(self.resume_path)
        elif config.train.init:
            self._load_init_weights(config.train.init)

    # -------------------------------------------------------------------------------------------- set-up
    def _setup_data(self) -> None:
        d, env = self.config.data, self.env
        kind = d.kind or detect_kind(d.root)
        # rank 0 checks every file once; the other ranks trust it (and fail with the same message if it failed)
        error = None
        if env.is_main:
            try:
                build_dataset(kind, d.root, d.train_split, list_file=d.train_list, classes_yaml=d.classes_yaml)
                build_dataset(kind, d.root, d.val_split, list_file=d.val_list, classes_yaml=d.classes_yaml)
            except Exception as exc:  # noqa: BLE001 - re-raised below on every rank
                error = exc
        error = broadcast_object(None if error is None else str(error), env) if env.distributed else error
        if error is not None:
            raise error if isinstance(error, Exception) else TrainingError(error)
        self.info, self.train_samples = build_dataset(kind, d.root, d.train_split, list_file=d.train_list,
                                                      classes_yaml=d.classes_yaml, validate=False)
        _, self.val_samples = build_dataset(kind, d.root, d.val_split, list_file=d.val_list,
                                            classes_yaml=d.classes_yaml, validate=False)
        self.kind = kind

        stats = None
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            stats = compute_stats(self.train_samples, self.info, cache=self.run_dir / "dataset_stats.json")
        self.stats = broadcast_object(stats, env)
        self.class_weights = self._class_weights()

        self.stages = _check_stages(d.stages, self.config.train.epochs)
        self.train_set = SegmentationDataset(
            self.train_samples,
            TrainTransform(d.crop, self.stats.mean_bgr, self.stats.std_bgr, self.info.ignore_index,
                           scale_range=d.scale_range, flip=d.flip, jitter=d.jitter, base_scale=d.base_scale,
                           scale_step=d.scale_step, blur_noise=d.blur_noise),
            self.info, seed=self.config.train.seed, cache=d.cache)
        self.train_set.fill_cache()
        self.sampler = DistributedSampler(self.train_set, num_replicas=env.world_size, rank=env.rank, shuffle=True,
                                          seed=self.config.train.seed, drop_last=False)
        self.iters_per_epoch = len(self.sampler) // d.batch_size
        if self.iters_per_epoch < 1:
            raise ValueError(f"data.batch_size {d.batch_size} x {env.world_size} process(es) is larger than the "
                             f"{len(self.train_set)} training images of {d.root} ({d.train_split})")
        #: the schedule's length; ``train.max_iters`` stops the run earlier without changing it, so a smoke run can
        #: be continued (``--resume auto`` with a larger --max-iters or none)
        self.total_iters = self.config.train.epochs * self.iters_per_epoch
        max_iters = self.config.train.max_iters
        self.stop_at = min(self.total_iters, max_iters) if max_iters else self.total_iters
        self.input_size = self._network_size()

    def _class_weights(self) -> list[float] | None:
        spec, k = self.config.data.class_weights, self.info.num_classes
        power = self.config.data.class_weight_power
        if not power > 0:
            raise ValueError(f"data.class_weight_power must be positive, got {power}")
        if spec in (None, "none", False):
            return None
        if spec == "enet":
            weights = self.stats.class_weights
        elif isinstance(spec, (list, tuple)) and len(spec) == k:
            weights = spec
        else:
            raise ValueError(f"data.class_weights must be 'enet', 'none' or a list of {k} numbers, got {spec!r}")
        return [float(w) ** power for w in weights]

    def _network_size(self) -> list[int]:
        """The (H, W) the model runs at after training: the first validation image's size times val_scale."""
        image, _ = load_raw(self.val_samples, 0)
        h, w = image.shape[:2]
        s = self.config.data.val_scale
        return [max(1, int(round(h * s))), max(1, int(round(w * s)))]

    def _setup_model(self) -> None:
        m, o, c = self.config.model, self.config.optim, self.config.train
        mcfg = model_config(m.name, self.info.num_classes, scan_backend=m.scan_backend, **m.overrides)
        torch.manual_seed(c.seed)  # identical initial weights on every rank and every run
        model = build_model(mcfg)
        if c.sync_bn and self.env.distributed:
            if self.device.type == "cuda":
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            elif self.env.is_main:  # torch's SyncBatchNorm has no CPU implementation
                warnings.warn("train.sync_bn ignored: SyncBatchNorm needs CUDA", stacklevel=2)
        self.model = model.to(self.device)
        self.path = train_path(c.path, self.device, m.scan_backend)
        apply_train_path(self.model, self.path)
        self.ddp = (DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda"
                                            else None) if self.env.distributed else None)

        decay, no_decay = [], []
        for p in self.model.parameters():
            exempt = getattr(p, "_no_weight_decay", False) or (not o.decay_norms_and_biases and p.dim() <= 1)
            (no_decay if exempt else decay).append(p)
        groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        name = o.name.lower()
        fused = {"fused": True} if self.path.fused_optimizer else {}  # same update, one kernel
        if name == "adam":
            self.optimizer = torch.optim.Adam(groups, lr=o.lr, betas=o.betas, eps=o.eps, **fused)
        elif name == "adamw":
            self.optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, **fused)
        elif name == "sgd":
            self.optimizer = torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov)
        else:
            raise ValueError(f"optim.name {o.name!r} is not supported (adam, adamw, sgd)")
        s = self.config.schedule
        warmup = effective_warmup(s.warmup_iters, self.total_iters)
        self.scheduler = WarmupPolyLR(self.optimizer, self.total_iters, warmup, s.warmup_ratio, s.power, s.min_lr)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.criterion = WeightedCrossEntropy(self.info.num_classes, self.class_weights,
                                              self.info.ignore_index).to(self.device)
        if c.ema_decay < 0 or c.ema_decay >= 1:
            raise ValueError(f"train.ema_decay must be 0 (off) or in (0, 1), got {c.ema_decay}")
        self.ema = ModelEMA(self.model, c.ema_decay) if c.ema_decay > 0 else None
        self._ema_model: nn.Module | None = None  # built on first validation
        self.rewarm = (0, 0)  # (first, last) iteration of a learning-rate ramp after a continuation
        #: (epoch, iteration, val mIoU) of every validation of the run, carried across continuations
        self.history: list[list[float]] = []

        self.epoch = 0  # completed epochs
        self.iter_in_epoch = 0  # iterations done in the current (unfinished) epoch
        self.global_iter = 0
        self.best_miou = -1.0
        self.best_epoch = 0
        self.last_val: dict[str, Any] | None = None
        self.wall_time = 0.0  # accumulated over resumed segments
        self.epoch_loss_sum = 0.0
        self.epoch_loss_count = 0
        self.epoch_time = 0.0
        self.bad_streak = 0  # consecutive batches with a non-finite loss

    # -------------------------------------------------------------------------------------------- resume
    def _resume_path(self, resume: str | Path | None) -> Path | None:
        if resume is None or resume == "":
            return None
        if str(resume) == "auto":
            path = self.run_dir / "last.pt"
            return path if path.is_file() else None
        path = Path(resume)
        if not path.is_file():
            raise CheckpointError(f"--resume {path}: no such checkpoint")
        return path

    def _load_init_weights(self, init: str) -> None:
        """Warm start: model weights only; optimiser, schedule and counters start fresh. When the checkpoint is a
        release of this same schedule (``continuation`` with the same total and per-epoch iterations) and
        ``train.continue_schedule`` is on, the run goes on from its position instead (:meth:`_continue_from`)."""
        path = None if init == "packaged" else Path(init)
        if path is not None and not path.is_file():
            raise CheckpointError(f"train.init {path}: no such checkpoint")
        ckpt = load_checkpoint(path, expect_classes=self.info.num_classes, expect_model=self.config.model.name)
        source = str(path or "packaged model")
        self.init_source = str(path or "packaged")
        cont = ckpt.continuation
        if self.config.train.continue_schedule and cont:
            mismatch = [f"{key} {cont.get(key)} there, {mine} here" for key, mine in
                        (("total_iters", self.total_iters), ("iters_per_epoch", self.iters_per_epoch))
                        if cont.get(key) != mine]
            if not mismatch:
                self._continue_from(ckpt, source)
                return
            if self.env.is_main:
                print(f"train.init {source}: its schedule differs ({'; '.join(mismatch)}): warm start from its "
                      "weights with a fresh schedule", file=sys.stderr)
        load_state_into(self.model, ckpt, source)
        if self.config.train.revive:
            revived = revive_vanished(self.model, seed=self.config.train.seed)
            if self.ema is not None:  # the average starts from the revived weights, not the random ones
                self.ema.load_state_dict({"weights": self.model.state_dict(), "updates": 0})
            if self.env.is_main:
                print(f"train.revive: {revived['ffn']} FFN block(s), {revived['ss2d_channels']} SS2D channel(s) and "
                      f"{revived['msau_gates']} MSAU spatial gate(s) re-initialised (output unchanged)",
                      file=sys.stderr)

    def _continue_from(self, ckpt: Checkpoint, source: str) -> None:
        """Go on with a run from its release: weights, EMA, iteration (hence learning rate), epoch, best mIoU and
        validation history. The optimiser moments and the RNG state are not in a release: Adam restarts from zero
        moments behind a ``train.rewarm_iters`` learning-rate ramp, and the data order, seeded by (seed, epoch), is
        the uninterrupted run's."""
        cont = ckpt.continuation or {}
        raw = cont.get("raw_weights")
        weights = cast_floats(raw, torch.float32) if raw else ckpt.state_dict
        load_state_into(self.model, replace(ckpt, state_dict=weights), source)
        if self.ema is not None:
            # the release's weights are the EMA's when the run had one (else the average starts from them), unless
            # the record carries the run's position into a release of other weights (``release --position-only``)
            ema = cont.get("ema_weights")
            ema = cast_floats(ema, torch.float32) if ema else ckpt.state_dict
            self.ema.load_state_dict({"weights": ema, "updates": int(cont.get("ema_updates", 0))})
        self.epoch = int(cont["epoch"])
        self.global_iter = int(cont["global_iter"])
        self.iter_in_epoch = int(cont.get("iter_in_epoch", 0))  # a position carried from last.pt may be mid-epoch
        self.best_miou = float(cont.get("best_miou", -1.0))
        self.best_epoch = int(cont.get("best_epoch", 0))
        self.wall_time = float(cont.get("wall_time", 0.0))
        self.history = [list(map(float, row)) for row in cont.get("history", [])]
        sched = self.scheduler.state_dict()
        sched.update(last_epoch=self.global_iter, _step_count=self.global_iter + 1)
        self.scheduler.load_state_dict(sched)
        self.rewarm = (self.global_iter, self.global_iter + max(0, self.config.train.rewarm_iters))
        self._apply_rewarm(self.global_iter)
        self.continued_from = source

    def _load_training_state(self, path: Path) -> None:
        ckpt = load_checkpoint(path, expect_classes=self.info.num_classes, expect_model=self.config.model.name)
        state = ckpt.training_state
        if not state:
            raise CheckpointError(f"{path} has no training state (best.pt files cannot be resumed; use last.pt)")
        load_state_into(self.model, ckpt, str(path))
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
        except (KeyError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{path}: optimiser/scheduler state does not fit this recipe: {exc}") from exc
        if state.get("total_iters") != self.total_iters:
            raise CheckpointError(f"{path}: it was trained for {state.get('total_iters')} total iterations, this "
                                  f"recipe has {self.total_iters} (epochs, batch size or dataset changed); to train "
                                  f"on with another schedule, start a new run folder (--out) from these weights "
                                  f"(--init {path})")
        if state.get("world_size", 1) != self.env.world_size:
            warnings.warn(f"{path} was written by {state.get('world_size')} process(es), resuming with "
                          f"{self.env.world_size}: the data order will differ from an uninterrupted run",
                          stacklevel=2)
        self.epoch = int(state["epoch"])
        self.iter_in_epoch = int(state["iter_in_epoch"])
        self.global_iter = int(state["global_iter"])
        self.best_miou = float(state["best_miou"])
        self.best_epoch = int(state["best_epoch"])
        self.wall_time = float(state.get("wall_time", 0.0))
        self.epoch_loss_sum = float(state.get("epoch_loss_sum", 0.0))
        self.epoch_loss_count = int(state.get("epoch_loss_count", 0))
        self.epoch_time = float(state.get("epoch_time", 0.0))
        self.last_val = state.get("last_val")
        self.history = [list(map(float, row)) for row in state.get("history", [])]
        self.rewarm = tuple(state.get("rewarm", (0, 0)))
        self._apply_rewarm(self.global_iter)  # the scheduler's state restored the unramped rate
        if self.ema is not None:
            if "ema" not in state:
                raise CheckpointError(f"{path} was trained without train.ema_decay; resume it without EMA or start "
                                      "a new run folder with --init")
            self.ema.load_state_dict(state["ema"])
        _set_rng_state(state["rng"])

    def _training_state(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "iter_in_epoch": self.iter_in_epoch,
            "global_iter": self.global_iter,
            "total_iters": self.total_iters,
            "iters_per_epoch": self.iters_per_epoch,
            "world_size": self.env.world_size,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": _get_rng_state(),
            "best_miou": self.best_miou,
            "best_epoch": self.best_epoch,
            "wall_time": self.wall_time,
            "epoch_loss_sum": self.epoch_loss_sum,
            "epoch_loss_count": self.epoch_loss_count,
            "epoch_time": self.epoch_time,
            "last_val": self.last_val,
            "history": self.history,
            "rewarm": list(self.rewarm),
            **({"ema": self.ema.state_dict()} if self.ema is not None else {}),
            "data_order": {"seed": self.config.train.seed, "sampler": "DistributedSampler(shuffle, seed, epoch)",
                           "augmentation": "default_rng((seed, epoch, index))"},
        }

    # -------------------------------------------------------------------------------------------- checkpoints
    def make_checkpoint(self, with_state: bool) -> Checkpoint:
        """``last.pt`` (``with_state``): the raw weights and everything to resume exactly. ``best.pt``: the weights
        that were validated (the EMA's when on) and the small ``continuation`` record releases keep."""
        live = self.model.state_dict()
        raw = {k: v.detach().cpu().clone() for k, v in live.items()}
        # SyncBatchNorm has the same state-dict keys as BatchNorm2d, so checkpoints load into plain models
        state_dict = raw if with_state or self.ema is None else self.ema.weights(like=live)
        continuation = None
        if not with_state:
            continuation = {
                "epoch": self.epoch, "global_iter": self.global_iter, "total_iters": self.total_iters,
                "iters_per_epoch": self.iters_per_epoch, "best_miou": self.best_miou, "best_epoch": self.best_epoch,
                "wall_time": self.wall_time, "history": self.history,
            }
            if self.ema is not None:
                continuation["ema_updates"] = self.ema.updates
                continuation["raw_weights"] = cast_floats(raw, torch.float16)
        return Checkpoint(
            model_config=self.model.config, state_dict=state_dict, class_names=list(self.info.class_names),
            palette=[list(c) for c in self.info.palette], mean=list(self.stats.mean_bgr),
            std=list(self.stats.std_bgr), ignore_index=self.info.ignore_index, input_size=list(self.input_size),
            class_weights=self.class_weights, dataset=self.info.name, metadata=self._metadata(),
            training_state=self._training_state() if with_state else None, continuation=continuation)

    def _metadata(self) -> dict[str, Any]:
        hardware = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": str(torch.__version__),
                    "device": str(self.device), "world_size": self.env.world_size,
                    "threads": torch.get_num_threads()}
        if self.device.type == "cuda":
            hardware["gpu"] = torch.cuda.get_device_name(self.device)
        return {
            "epochs_done": self.epoch, "iterations": self.global_iter, "total_iters": self.total_iters,
            "best_miou": self.best_miou, "best_epoch": self.best_epoch, "last_val": _val_brief(self.last_val),
            "recipe": self.config.to_dict(), "dataset_kind": self.kind, "dataset_root": str(self.config.data.root),
            "train_images": len(self.train_samples), "val_images": len(self.val_samples),
            "wall_time_s": round(self.wall_time, 1), "hardware": hardware,
            "saved": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    def _params_finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.model.state_dict().values() if p.is_floating_point())

    def save_last(self) -> Path | None:
        """Write ``last.pt`` (rank 0) unless the weights went non-finite, so the last good one survives."""
        if not self.env.is_main:
            return None
        if not self._params_finite():
            raise TrainingError(f"weights became non-finite at iteration {self.global_iter}; {self.run_dir}/last.pt "
                                "keeps the last good state")
        return save_checkpoint(self.make_checkpoint(with_state=True), self.run_dir / "last.pt")

    # -------------------------------------------------------------------------------------------- loop
    def _on_signal(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._handler_pid:
            return  # a forked data-loader worker (Ctrl-C reaches the whole process group): the trainer handles it
        if self._stop_signal is not None:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self._stop_signal = signum
        if self.env.is_main:
            print(f"\nsignal {signum}: saving {self.run_dir / 'last.pt'} after this iteration", file=sys.stderr)

    def stage_scale(self, epoch: int) -> float:
        """Progressive resizing: the factor on images and crop in ``epoch`` (0-based); 1.0 after the stages."""
        end = 0
        for epochs, scale in self.stages:
            end += epochs
            if epoch < end:
                return scale
        return 1.0

    def _loader(self, epoch: int, skip_batches: int) -> DataLoader:
        d = self.config.data
        f = self.stage_scale(epoch)
        self.train_set.transform.base_scale = d.base_scale * f
        self.train_set.transform.crop_size = (max(1, round(d.crop[0] * f)), max(1, round(d.crop[1] * f)))
        self.sampler.set_epoch(epoch)
        self.train_set.set_epoch(epoch)
        indices = list(self.sampler)[skip_batches * d.batch_size:]
        return DataLoader(self.train_set, batch_size=d.batch_size, sampler=indices, num_workers=d.workers,
                          drop_last=True, pin_memory=self.device.type == "cuda",
                          persistent_workers=False, prefetch_factor=2 if d.workers else None,
                          worker_init_fn=_worker_ignores_sigterm if d.workers else None)

    def fit(self) -> TrainResult:
        """Train until ``train.epochs`` (or ``train.max_iters``), validating every ``val_every`` epochs and at the
        end. SIGINT/SIGTERM save ``last.pt`` at the next iteration boundary and return ``stopped="signal"``."""
        c, env = self.config.train, self.env
        logger = None
        if env.is_main:
            logger = RunLogger(self.run_dir, resume_epoch=self.epoch, resume_iter=self.global_iter,
                               tensorboard=self.tensorboard, plots=self.plots)
        old_handlers = {}
        if _in_main_thread():
            self._handler_pid = os.getpid()  # the process that installs the handlers (workers fork later)
            for sig in (signal.SIGINT, signal.SIGTERM):
                old_handlers[sig] = signal.signal(sig, self._on_signal)
        stopped = "done"
        segment_start = time.perf_counter()
        try:
            if env.is_main:
                self._print_header()
            while self.epoch < c.epochs and self.global_iter < self.stop_at:
                stopped = self._run_epoch(logger)
                if stopped in ("signal", "max_iters"):
                    break
            else:
                stopped = "max_iters" if self.epoch < c.epochs else "done"
        finally:
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
            if logger is not None:
                logger.close()
            if env.is_main and self.run_dir.is_dir():
                remove_stale_temporaries(self.run_dir, max_age_s=0.0)
        barrier(env)
        return TrainResult(self.run_dir, self.epoch, self.global_iter, self.best_miou, self.best_epoch,
                           _val_brief(self.last_val), time.perf_counter() - segment_start, stopped,
                           self._stop_signal)

    def _print_header(self) -> None:
        c, d = self.config, self.config.data
        if self.resume_path:
            resumed = f", resumed from {self.resume_path} at epoch {self.epoch} iteration {self.global_iter}"
        elif self.continued_from:
            resumed = (f", continuing the schedule of {self.continued_from} at epoch {self.epoch} iteration "
                       f"{self.global_iter} (lr {self.optimizer.param_groups[0]['lr']:.2e}, EMA restored, optimiser "
                       f"moments restart behind a {self.rewarm[1] - self.rewarm[0]}-iteration ramp)")
        else:
            resumed = f", warm start from {self.init_source}" if self.init_source else ""
        params = sum(p.numel() for p in self.model.parameters())
        print(f"train {c.model.name} ({params:,} params) on {_dataset_label(self.info.name, self.kind)} {d.root}: "
              f"{len(self.train_samples)} train / {len(self.val_samples)} val images, crop {d.crop[0]}x{d.crop[1]}, "
              f"base scale {d.base_scale}, val scale {d.val_scale} (network size "
              f"{self.input_size[0]}x{self.input_size[1]})", file=sys.stderr)
        print(f"  {c.optim.name} lr {c.optim.lr} wd {c.optim.weight_decay}, batch {d.batch_size} x "
              f"{self.env.world_size} process(es), {self.iters_per_epoch} it/epoch, {self.total_iters} iterations, "
              f"device {self.device}, amp {self.amp}, path {self.path.name}, "
              f"scan backend {self.model.scan_backend(self.device)}, "
              f"run dir {self.run_dir}{resumed}", file=sys.stderr)
        if self.stop_at < self.total_iters:
            print(f"  stopping at iteration {self.stop_at} (--max-iters; the schedule runs to {self.total_iters})",
                  file=sys.stderr)
        if self.stages:
            plan = ", ".join(f"{n} epochs at x{f:g} (crop {round(d.crop[0] * f)}x{round(d.crop[1] * f)})"
                             for n, f in self.stages)
            print(f"  progressive resizing: {plan}, then crop {d.crop[0]}x{d.crop[1]}", file=sys.stderr)
        if self.class_weights:
            print("  class weights " + " ".join(f"{w:.3f}" for w in self.class_weights), file=sys.stderr)

    def _run_epoch(self, logger: RunLogger | None) -> str:
        c, env = self.config.train, self.env
        net = self.ddp or self.model
        net.train()
        epoch_start = time.perf_counter()
        loader = self._loader(self.epoch, self.iter_in_epoch)
        bar = None
        if env.is_main and c.progress:
            from tqdm import tqdm

            # redirected to a log file: a line every 30 s instead of a redraw every second
            bar = tqdm(total=self.iters_per_epoch, initial=self.iter_in_epoch, desc=f"epoch {self.epoch + 1}",
                       unit="it", dynamic_ncols=True, file=sys.stderr, leave=False,
                       mininterval=1.0 if sys.stderr.isatty() else 30.0)
        stopped = ""
        batches = iter(loader)
        while self.global_iter < self.stop_at:
            try:
                images, labels = next(batches)
            except StopIteration:
                break
            except Exception:
                if self._stop_signal is None:
                    raise
                stopped = "signal"  # Ctrl-C also reached the loader workers; the state is still consistent
                break
            lr = self.optimizer.param_groups[0]["lr"]
            loss_value, stop_requested = self._step(net, images, labels)
            self.scheduler.step()
            self._apply_rewarm(self.global_iter + 1)
            self.global_iter += 1
            self.iter_in_epoch += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", refresh=False)
            if logger is not None and self.global_iter % 10 == 0:
                logger.log_scalar("train/loss", loss_value, self.global_iter)
                logger.log_scalar("train/lr", lr, self.global_iter)
            if stop_requested:
                stopped = "signal"
                break
            if c.checkpoint_every and self.global_iter % c.checkpoint_every == 0 \
                    and self.iter_in_epoch < self.iters_per_epoch:
                self._save_mid_epoch(epoch_start)
        if bar is not None:
            bar.close()
        del batches, loader
        if stopped == "signal":
            self._save_mid_epoch(epoch_start)
            return "signal"
        if self.iter_in_epoch < self.iters_per_epoch and self.global_iter >= self.stop_at:
            return self._stop_mid_epoch(epoch_start)
        if self.iter_in_epoch < self.iters_per_epoch:
            raise TrainingError(f"the data loader stopped after {self.iter_in_epoch} of {self.iters_per_epoch} "
                                f"iterations of epoch {self.epoch + 1}")
        return self._end_epoch(logger, epoch_start)

    def _step(self, net: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, bool]:
        """One optimisation step; a non-finite loss skips the update on every rank (weights, BatchNorm statistics,
        optimiser and scaler stay as they were). Returns (loss, whether any rank was asked to stop)."""
        c, env = self.config.train, self.env
        images = prepare_batch(images.to(self.device, non_blocking=True), self.path)
        labels = labels.to(self.device, non_blocking=True)
        if self.device.type == "cpu":
            fp_mode_cpu.flush_denormals()  # weight decay makes weights denormal: slow on Intel cores
        # BatchNorm statistics change in the forward pass: keep a copy to undo a bad batch (a few KB)
        saved_buffers = [b.detach().clone() for b in self.model.buffers()]
        with torch.autocast(self.device.type, enabled=self.amp):
            logits = net(images)
        loss = self.criterion(logits, labels)
        bad, stop = _flags(not bool(torch.isfinite(loss)), self._stop_signal is not None, env)
        if bad:
            self.bad_streak += 1
            self.optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for buffer, saved in zip(self.model.buffers(), saved_buffers):
                    buffer.copy_(saved)
            if self.bad_streak > c.max_bad_batches:
                raise TrainingError(f"{self.bad_streak} consecutive batches with a non-finite loss at iteration "
                                    f"{self.global_iter}; {self.run_dir}/last.pt keeps the last good state")
            if env.is_main:
                print(f"\nwarning: non-finite loss at iteration {self.global_iter}, batch skipped", file=sys.stderr)
        else:
            self.bad_streak = 0
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if c.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.ema is not None:
                self.ema.update(self.model)
            self.epoch_loss_sum += float(loss.detach())
            self.epoch_loss_count += 1
        # single process: honour a signal right after this step; DDP: all ranks agree on it with the flags
        return float(loss.detach()), stop or (not env.distributed and self._stop_signal is not None)

    def _stop_mid_epoch(self, epoch_start: float) -> str:
        """``train.max_iters`` reached inside an epoch: save ``last.pt`` there (the epoch goes on when the run is
        continued) and validate for the smoke run's figure; no epoch row is logged for the unfinished epoch."""
        self._save_mid_epoch(epoch_start)
        if self.config.train.val_every:
            self.last_val = self.validate()
            if self.env.is_main:
                print(f"stopped at --max-iters {self.stop_at} (epoch {self.epoch + 1} unfinished): val mIoU "
                      f"{100 * _nan(self.last_val['miou']):.2f}%", file=sys.stderr)
        return "max_iters"

    def _end_epoch(self, logger: RunLogger | None, epoch_start: float) -> str:
        """The epoch is done: validate when due (every ``val_every`` epochs, at the end and at a --max-iters stop;
        never with ``val_every`` 0), save, log."""
        c, env = self.config.train, self.env
        self.epoch_time += time.perf_counter() - epoch_start
        self.wall_time += time.perf_counter() - epoch_start
        finished = self.iter_in_epoch >= self.iters_per_epoch
        if finished:
            self.epoch += 1
        last = self.epoch >= c.epochs or self.global_iter >= self.stop_at
        record = EpochRecord(epoch=self.epoch if finished else self.epoch + 1, iters=self.global_iter,
                             lr=self.optimizer.param_groups[0]["lr"],
                             train_loss=self._mean_epoch_loss(), epoch_time=self.epoch_time)
        if c.val_every and (last or (finished and self.epoch % c.val_every == 0)):
            val_start = time.perf_counter()
            self.last_val = self.validate()
            self.wall_time += time.perf_counter() - val_start
            record.val_miou = _nan(self.last_val["miou"])
            record.val_miou_framework = _nan(self.last_val["miou_framework"])
            record.pixel_acc = _nan(self.last_val["pixel_accuracy"])
            self.history.append([float(record.epoch), float(self.global_iter), record.val_miou])
            improved = not math.isnan(record.val_miou) and record.val_miou > self.best_miou
            if improved:
                self.best_miou, self.best_epoch = record.val_miou, record.epoch
        else:
            improved = False
        if finished:
            self.iter_in_epoch = 0
            self.epoch_loss_sum, self.epoch_loss_count, self.epoch_time = 0.0, 0, 0.0
        self.save_last()
        if env.is_main:
            if improved:
                save_checkpoint(self.make_checkpoint(with_state=False), self.run_dir / "best.pt")
            logger.log_epoch(record)
            self._print_epoch(record, improved)
        barrier(env)
        return "max_iters" if not finished else ""

    def _save_mid_epoch(self, epoch_start: float) -> None:
        elapsed = time.perf_counter() - epoch_start
        self.epoch_time += elapsed
        self.wall_time += elapsed
        self.save_last()
        barrier(self.env)
        # the clock restarts at the caller's next epoch_start; avoid counting the same span twice
        self.epoch_time -= elapsed
        self.wall_time -= elapsed

    def _mean_epoch_loss(self) -> float:
        total = torch.tensor([self.epoch_loss_sum, float(self.epoch_loss_count)], dtype=torch.float64)
        if self.env.distributed:
            import torch.distributed as dist

            total = total.to(self.device)
            dist.all_reduce(total)
        s, n = total.tolist()
        return s / n if n else math.nan

    def _print_epoch(self, record: EpochRecord, improved: bool) -> None:
        msg = (f"epoch {record.epoch}/{self.config.train.epochs}  iter {record.iters}/{self.total_iters}  "
               f"loss {record.train_loss:.4f}  lr {record.lr:.2e}  time {record.epoch_time:.1f}s")
        if not math.isnan(record.val_miou):
            msg += (f"  val mIoU {100 * record.val_miou:.2f}% (framework {100 * record.val_miou_framework:.2f}%)"
                    f"  pixel acc {100 * record.pixel_acc:.2f}%")
            msg += "  [best]" if improved else f"  (best {100 * self.best_miou:.2f}% @ {self.best_epoch})"
        print(msg, file=sys.stderr)

    def _apply_rewarm(self, step: int) -> None:
        """Scale the scheduled learning rate of iteration ``step`` (0-based) by a linear ramp while it is inside
        ``self.rewarm`` (after a continuation); the scheduler recomputes the rate from scratch every iteration."""
        first, last = self.rewarm
        if first <= step < last:
            ramp = (step - first + 1) / (last - first + 1)
            for group in self.optimizer.param_groups:
                group["lr"] *= ramp

    def eval_model(self) -> nn.Module:
        """The model that is validated and saved as ``best.pt``: the EMA's weights when on, else the live model."""
        if self.ema is None:
            return self.model
        if self._ema_model is None:
            self._ema_model = copy.deepcopy(self.model)
        self._ema_model.load_state_dict(self.ema.weights(like=self.model.state_dict()))
        return self._ema_model

    def validate(self) -> dict[str, Any]:
        """Standard/framework mIoU on the validation split at ``data.val_scale`` (labels at full size),
        sharded over ranks and all-reduced; the EMA's weights when ``train.ema_decay`` is on."""
        d = self.config.data
        return evaluate_samples(self.eval_model(), self.val_samples, self.info, mean=self.stats.mean_bgr,
                                std=self.stats.std_bgr, scale=d.val_scale,
                                amp=self.amp, workers=min(d.workers, 2), rank=self.env.rank,
                                world_size=self.env.world_size,
                                progress=self.env.is_main and self.config.train.progress)


# ------------------------------------------------------------------------------------------------ helpers
def _worker_ignores_sigterm(worker_id: int) -> None:
    """A SIGTERM meant for the whole run (``pkill -f``, systemd's stop, ``kill`` of the process group) reaches the
    data-loader workers too; PyTorch's workers die of it unless their parent sent it, and the trainer then fails on
    the dead worker instead of saving ``last.pt`` after the iteration. The trainer ends its workers itself (and they
    exit when it dies), so they ignore it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _flags(bad: bool, stop: bool, env: DistEnv) -> tuple[bool, bool]:
    """(bad batch on any rank, stop requested on any rank), with one all-reduce in distributed runs."""
    if not env.distributed:
        return bad, stop
    flags = any_rank([bad, stop], env)
    return flags[0], flags[1]


def _check_stages(stages: list[Any], epochs: int) -> list[tuple[int, float]]:
    """``data.stages`` as (epochs, scale) pairs; ValueError naming the entry that is wrong."""
    out = []
    for i, stage in enumerate(stages or []):
        if not isinstance(stage, dict) or set(stage) != {"epochs", "scale"}:
            raise ValueError(f"data.stages[{i}] must be {{epochs: N, scale: s}}, got {stage!r}")
        n, f = stage["epochs"], stage["scale"]
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"data.stages[{i}].epochs must be an integer >= 1, got {n!r}")
        if not isinstance(f, (int, float)) or isinstance(f, bool) or f <= 0:
            raise ValueError(f"data.stages[{i}].scale must be a positive number, got {f!r}")
        out.append((n, float(f)))
    if sum(n for n, _ in out) > epochs:
        raise ValueError(f"data.stages cover {sum(n for n, _ in out)} epochs, more than train.epochs = {epochs}")
    return out


def _nan(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _val_brief(val: dict[str, Any] | None) -> dict[str, Any] | None:
    if not val:
        return None
    return {k: val[k] for k in ("miou", "miou_framework", "pixel_accuracy", "per_class", "images") if k in val}


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _get_rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU, CUDA) generator states as plain values and tensors (weights_only safe)."""
    np_state = np.random.get_state()
    state = {
        "python": _tuples_to_lists(random.getstate()),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def _tuples_to_lists(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_tuples_to_lists(v) for v in value]
    return value


def _dataset_label(name: str, kind: str) -> str:
    """"camvid", or "camvid (shards)" when the layout is not the dataset's own name (not "camvid camvid")."""
    return name if kind in (name, "auto") else f"{name} ({kind})"

