"""The trainer on a generated CamVid-layout dataset: learning, exact resume after a kill or a crash,
bad-batch handling and what the checkpoints hold."""

from __future__ import annotations

import copy
import multiprocessing
import os
import signal

import numpy as np
import pytest
import torch
from helpers import make_camvid

from ecmnet_core.checkpoint import CheckpointError, load_checkpoint
from ecmnet_core.data import EvalTransform, build_dataset, load_raw
from ecmnet_core.train.config import load_config
from ecmnet_core.train.losses import LabelRangeError, WeightedCrossEntropy
from ecmnet_core.train.trainer import Trainer, TrainingError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def camvid(tmp_path_factory):
    return make_camvid(tmp_path_factory.mktemp("data") / "camvid", n_train=6, n_val=2)


def tiny(root, *extra):
    """Baseline model, 32x48 crops, batch 2: 3 iterations per epoch, 4 epochs."""
    return load_config("camvid", [
        f"data.root={root}", "model.name=baseline", "data.crop=[32, 48]", "data.batch_size=2", "data.workers=0",
        "data.scale_range=[0.75, 1.25]", "train.epochs=4", "train.val_every=100", "train.progress=false",
        "train.amp=false", "schedule.warmup_iters=1", "optim.lr=0.02", *extra])


def fixed_batch_loss(trainer: Trainer) -> float:
    """Training-mode loss on the (un-augmented) training images, without gradients, on a copy of the model
    (training-mode BatchNorm would otherwise update the trainer's running statistics)."""
    info, samples = build_dataset("camvid", trainer.config.data.root, "train")
    t = EvalTransform(trainer.stats.mean_bgr, trainer.stats.std_bgr)
    pairs = [t(*load_raw(samples, i)) for i in range(len(samples))]
    images, labels = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    model = copy.deepcopy(trainer.model).train()
    with torch.no_grad():
        return float(trainer.criterion(model(images), labels))


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    worst = max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a)
    assert worst <= 1e-6, f"resumed weights differ from the uninterrupted run by up to {worst}"


@pytest.fixture(scope="module")
def reference(camvid, tmp_path_factory):
    """One uninterrupted 12-iteration run (with TensorBoard and plots) that the other tests compare against."""
    run_dir = tmp_path_factory.mktemp("ref")
    trainer = Trainer(tiny(camvid), run_dir, tensorboard=True)
    before = fixed_batch_loss(trainer)
    result = trainer.fit()
    return trainer, result, before, run_dir


def test_a_few_iterations_lower_the_loss(reference):
    trainer, result, before, _ = reference
    assert result.stopped == "done" and result.iterations == 12 and result.epochs_done == 4
    after = fixed_batch_loss(trainer)
    assert after < 0.8 * before, f"loss {before:.3f} -> {after:.3f}"


def test_run_folder_and_checkpoints(reference, camvid):
    trainer, result, _, run_dir = reference
    for name in ("last.pt", "best.pt", "log.csv", "loss.png", "miou.png", "dataset_stats.json"):
        assert (run_dir / name).is_file(), name
    assert any((run_dir / "tb").glob("events.out.tfevents.*"))
    rows = (run_dir / "log.csv").read_text().splitlines()
    assert rows[0].split(",") == ["epoch", "iters", "lr", "train_loss", "val_miou", "val_miou_framework",
                                  "pixel_acc", "epoch_time"]
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3", "4"]
    assert rows[1].split(",")[4] == "nan" and 0.0 <= float(rows[4].split(",")[4]) <= 1.0  # validated at the end

    best = load_checkpoint(run_dir / "best.pt", expect_classes=11, expect_model="baseline")
    assert best.training_state is None and best.dataset == "camvid" and best.ignore_index == 11
    assert best.input_size == [48, 64] and best.mean == pytest.approx(trainer.stats.mean_bgr)
    assert best.class_names[0] == "Sky" and best.palette[0] == [128, 128, 128]
    assert best.class_weights == pytest.approx(trainer.stats.class_weights)
    meta = best.metadata
    assert meta["best_miou"] == pytest.approx(result.best_miou) and meta["recipe"]["optim"]["name"] == "adam"
    assert meta["epochs_done"] == 4 and meta["hardware"]["device"] == "cpu" and meta["wall_time_s"] >= 0
    last = load_checkpoint(run_dir / "last.pt")
    assert last.training_state["epoch"] == 4 and last.training_state["global_iter"] == 12
    # the checkpoint rebuilds the trained model exactly
    rebuilt, trained = last.build_model().state_dict(), trainer.model.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in rebuilt.items())
    with pytest.raises(CheckpointError, match="11 classes, expected 19"):
        load_checkpoint(run_dir / "best.pt", expect_classes=19)


def test_kill_and_resume_continues_exactly(reference, camvid, tmp_path):
    """SIGTERM mid-epoch saves last.pt at the iteration boundary; resuming ends on the reference weights."""
    ref_trainer = reference[0]
    first = Trainer(tiny(camvid), tmp_path, tensorboard=False, plots=False)

    def kill_in_second_iteration(optimizer, args, kwargs):
        if first.global_iter == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    first.optimizer.register_step_post_hook(kill_in_second_iteration)
    result = first.fit()
    assert result.stopped == "signal" and result.signal == signal.SIGTERM and result.iterations == 2
    state = load_checkpoint(tmp_path / "last.pt").training_state
    assert (state["epoch"], state["iter_in_epoch"], state["global_iter"]) == (0, 2, 2)

    resumed = Trainer(tiny(camvid), tmp_path, resume="auto", tensorboard=False, plots=False)
    assert resumed.global_iter == 2
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(ref_lr_at(ref_trainer, 2))
    result = resumed.fit()
    assert result.stopped == "done" and result.iterations == 12
    assert_same_weights(weights(resumed), weights(ref_trainer))
    assert [r.split(",")[0] for r in (tmp_path / "log.csv").read_text().splitlines()[1:]] == ["1", "2", "3", "4"]


def test_sigterm_to_the_whole_run_including_its_loader_workers_still_saves_last_pt(camvid, tmp_path):
    """``pkill -f "ecmnet-core train"`` or systemd's stop signal the data-loader workers as well as the trainer;
    the workers ignore it, so the trainer finishes the iteration and saves instead of failing on a dead worker."""
    first = Trainer(tiny(camvid, "data.workers=1"), tmp_path, tensorboard=False, plots=False)
    ignored: list[bool] = []

    def kill_everything_in_second_iteration(optimizer, args, kwargs):
        if first.global_iter == 1:
            workers = multiprocessing.active_children()
            assert workers, "the data loader should have a worker process"
            for worker in workers:
                ignored.append(ignores_sigterm(worker.pid))
                os.kill(worker.pid, signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)

    first.optimizer.register_step_post_hook(kill_everything_in_second_iteration)
    result = first.fit()
    assert result.stopped == "signal" and result.iterations == 2
    assert load_checkpoint(tmp_path / "last.pt").training_state["global_iter"] == 2
    # whether a dead worker would have failed the run depends on when the signals land; its disposition does not
    assert ignored == [True]


def ignores_sigterm(pid: int) -> bool:
    """From the process's ignored-signal mask (Linux /proc)."""
    for line in open(f"/proc/{pid}/status").read().splitlines():
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    raise AssertionError(f"/proc/{pid}/status has no SigIgn line")


def ref_lr_at(trainer: Trainer, iteration: int) -> float:
    return trainer.config.optim.lr * trainer.scheduler.factor(iteration)


def test_crash_keeps_the_last_good_checkpoint_and_resumes_exactly(reference, camvid, tmp_path):
    """A crash (here: an exception in iteration 5) loses only the work since the last periodic checkpoint."""
    first = Trainer(tiny(camvid, "train.checkpoint_every=2"), tmp_path, tensorboard=False, plots=False)

    def crash_in_fifth_iteration(optimizer, args, kwargs):
        if first.global_iter == 4:
            raise RuntimeError("simulated crash")

    first.optimizer.register_step_post_hook(crash_in_fifth_iteration)
    with pytest.raises(RuntimeError, match="simulated crash"):
        first.fit()
    assert load_checkpoint(tmp_path / "last.pt").training_state["global_iter"] == 4
    resumed = Trainer(tiny(camvid, "train.checkpoint_every=2"), tmp_path, resume=tmp_path / "last.pt",
                      tensorboard=False, plots=False)
    resumed.fit()
    assert_same_weights(weights(resumed), weights(reference[0]))


def test_non_finite_losses_skip_batches_then_stop_without_touching_last_pt(camvid, tmp_path):
    trainer = Trainer(tiny(camvid, "train.checkpoint_every=1", "train.max_bad_batches=1"), tmp_path,
                      tensorboard=False, plots=False)
    forward = trainer.criterion.forward
    trainer.criterion.forward = lambda logits, target: (forward(logits, target) * np.nan if trainer.global_iter >= 2
                                                        else forward(logits, target))
    snapshots = []
    trainer.optimizer.register_step_post_hook(lambda *_: snapshots.append(weights(trainer)))
    with pytest.raises(TrainingError, match="non-finite loss"):
        trainer.fit()
    assert len(snapshots) == 2  # only the two good batches stepped the optimiser
    # iterations 3 and 4 were skipped: the epoch-end last.pt (iteration 3) holds the weights of iteration 2
    last = load_checkpoint(tmp_path / "last.pt")
    assert last.training_state["global_iter"] == 3
    assert all(torch.isfinite(v).all() for v in last.state_dict.values() if v.is_floating_point())
    assert_same_weights(last.state_dict, snapshots[-1])


def test_resume_refuses_another_model_or_schedule(reference, camvid):
    run_dir = reference[3]
    with pytest.raises(CheckpointError, match="expected 'lines'"):
        Trainer(tiny(camvid, "model.name=lines"), run_dir, resume=run_dir / "last.pt", tensorboard=False, plots=False)
    with pytest.raises(CheckpointError, match="total iterations"):
        Trainer(tiny(camvid, "train.epochs=5"), run_dir, resume=run_dir / "last.pt", tensorboard=False, plots=False)
    with pytest.raises(CheckpointError, match="no training state"):
        Trainer(tiny(camvid), run_dir, resume=run_dir / "best.pt", tensorboard=False, plots=False)


def test_loss_rejects_labels_outside_the_class_range():
    loss = WeightedCrossEntropy(3, [1.0, 2.0, 3.0], ignore_index=255)
    logits = torch.zeros(1, 3, 2, 2)
    assert float(loss(logits, torch.tensor([[[0, 1], [2, 255]]]))) == pytest.approx(np.log(3))
    with pytest.raises(LabelRangeError, match=r"labels \[7\] are outside 0..2"):
        loss(logits, torch.tensor([[[0, 7], [2, 255]]]))
    with pytest.raises(ValueError, match="2 values for 3 classes"):
        WeightedCrossEntropy(3, [1.0, 2.0])
