"""Run records on rank 0: ``log.csv`` (one row per epoch), TensorBoard events, ``loss.png`` and ``miou.png``."""

from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path


@dataclass
class EpochRecord:
    """One row of ``log.csv``. Validation fields are NaN for epochs without validation."""

    epoch: int
    iters: int
    lr: float
    train_loss: float
    val_miou: float = math.nan
    val_miou_framework: float = math.nan
    pixel_acc: float = math.nan
    epoch_time: float = 0.0


COLUMNS = [f.name for f in fields(EpochRecord)]


class RunLogger:
    """Appends epoch records; on resume keeps the rows up to the resumed epoch so nothing is duplicated.

    TensorBoard scalars all use the global iteration as their step (epoch summaries at the epoch's last
    iteration), so a resumed run purges exactly what a killed run wrote after its checkpoint.
    ``tensorboard=False`` skips the event files (tests, environments without tensorboard).
    """

    def __init__(self, run_dir: str | Path, resume_epoch: int = 0, resume_iter: int = 0, tensorboard: bool = True,
                 plots: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.run_dir / "log.csv"
        self.plots = plots
        self.records = [r for r in self._read() if r.epoch <= resume_epoch]
        self._write_all()
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a killed run wrote after the checkpoint we resume from
            self.writer = SummaryWriter(str(self.run_dir / "tb"), purge_step=resume_iter + 1 if resume_iter else None)

    def _read(self) -> list[EpochRecord]:
        if not self.csv_path.is_file():
            return []
        records = []
        with self.csv_path.open(newline="") as fh:
            for row in csv.DictReader(fh):
                try:
                    records.append(EpochRecord(int(row["epoch"]), int(row["iters"]),
                                               *(float(row[c]) for c in COLUMNS[2:])))
                except (KeyError, ValueError):
                    continue  # a torn last line from a killed run
        return records

    def _write_all(self) -> None:
        tmp = self.csv_path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=COLUMNS)
            writer.writeheader()
            for r in self.records:
                writer.writerow(_row(r))
        tmp.replace(self.csv_path)

    def log_scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def log_epoch(self, record: EpochRecord) -> None:
        self.records.append(record)
        self._write_all()
        if self.writer is not None:
            step = record.iters
            self.writer.add_scalar("epoch/epoch", record.epoch, step)
            self.writer.add_scalar("epoch/train_loss", record.train_loss, step)
            self.writer.add_scalar("epoch/time_s", record.epoch_time, step)
            if not math.isnan(record.val_miou):
                self.writer.add_scalar("val/miou", record.val_miou, step)
                self.writer.add_scalar("val/miou_framework", record.val_miou_framework, step)
                self.writer.add_scalar("val/pixel_acc", record.pixel_acc, step)
            self.writer.flush()
        if self.plots:
            self.plot()

    def plot(self) -> None:
        """Redraw ``loss.png`` and ``miou.png`` from all records (written atomically)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        epochs = [r.epoch for r in self.records]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(epochs, [r.train_loss for r in self.records], label="train loss")
        ax.set(xlabel="epoch", ylabel="weighted cross-entropy", title="training loss")
        ax.grid(alpha=0.3)
        ax.legend()
        _save(fig, self.run_dir / "loss.png")

        val = [r for r in self.records if not math.isnan(r.val_miou)]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([r.epoch for r in val], [100 * r.val_miou for r in val], "o-", label="mIoU (standard)")
        ax.plot([r.epoch for r in val], [100 * r.val_miou_framework for r in val], "s--",
                label="mIoU (framework: TP=0 classes dropped)")
        ax.set(xlabel="epoch", ylabel="mIoU (%)", title="validation mIoU")
        ax.grid(alpha=0.3)
        ax.legend()
        _save(fig, self.run_dir / "miou.png")
        plt.close("all")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _row(record: EpochRecord) -> dict[str, str]:
    out = {}
    for key, value in asdict(record).items():
        out[key] = f"{value:.6g}" if isinstance(value, float) else str(value)
    return out


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=100)
    tmp.replace(path)
