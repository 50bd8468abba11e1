"""The long-run recipe: EMA of the weights, continuing a schedule from a release when the run folder is gone,
augmentations for unseen streets, sequence-filtered splits and milder class weights."""

from __future__ import annotations

import os
import shutil
import signal

import numpy as np
import pytest
import torch
from helpers import make_camvid
from test_train_loop import assert_same_weights, tiny

from ecmnet_core.checkpoint import load_checkpoint, save_checkpoint
from ecmnet_core.data import DataError, build_dataset
from ecmnet_core.data.layout import keeps, parse_split
from ecmnet_core.data.transforms import TrainTransform, blur_noise
from ecmnet_core.train.ema import ModelEMA
from ecmnet_core.train.release import carry_position, release_checkpoint
from ecmnet_core.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def camvid(tmp_path_factory):
    return make_camvid(tmp_path_factory.mktemp("data") / "camvid", n_train=6, n_val=2)


def ema_recipe(root, *extra):
    """4 epochs of 3 iterations, EMA on, validated after epochs 2 and 4."""
    return tiny(root, "train.ema_decay=0.9", "train.val_every=2", *extra)


def test_ema_update_is_the_documented_average():
    model = torch.nn.BatchNorm2d(3)
    ema = ModelEMA(model, decay=0.9)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
        model.running_mean.add_(2.0)
    model.num_batches_tracked += 5
    ema.update(model)  # first update: d = min(0.9, 1/10) = 0.1
    assert torch.allclose(ema.state["weight"], 0.1 * start["weight"] + 0.9 * model.weight.detach())
    assert torch.allclose(ema.state["running_mean"], 0.1 * start["running_mean"] + 0.9 * model.running_mean)
    assert int(ema.state["num_batches_tracked"]) == 5  # integer buffers are copied
    for _ in range(200):
        ema.update(model)
    assert ema.current_decay() == pytest.approx(0.9)
    with pytest.raises(ValueError, match="decay"):
        ModelEMA(model, decay=1.0)


def test_ema_run_validates_and_saves_the_average_and_resumes_it_exactly(camvid, tmp_path):
    ref = Trainer(ema_recipe(camvid), tmp_path / "ref", tensorboard=False, plots=False)
    ref.fit()
    best = load_checkpoint(tmp_path / "ref" / "best.pt")
    last = load_checkpoint(tmp_path / "ref" / "last.pt")
    ema_weights = ref.ema.weights(like=ref.model.state_dict())
    assert_same_weights(best.state_dict, ema_weights)  # best.pt holds the validated (EMA) weights
    assert_same_weights(last.state_dict, dict(ref.model.state_dict()))  # last.pt the raw ones, EMA in its state
    assert last.training_state["ema"]["updates"] == 12
    assert not all(torch.equal(best.state_dict[k], last.state_dict[k]) for k in best.state_dict)

    # kill mid-run, resume: the EMA continues exactly like the uninterrupted run's
    first = Trainer(ema_recipe(camvid), tmp_path / "cut", tensorboard=False, plots=False)

    def kill_in_fifth_iteration(optimizer, args, kwargs):
        if first.global_iter == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    first.optimizer.register_step_post_hook(kill_in_fifth_iteration)
    assert first.fit().stopped == "signal"
    resumed = Trainer(ema_recipe(camvid), tmp_path / "cut", resume="auto", tensorboard=False, plots=False)
    assert resumed.ema.updates == 5
    resumed.fit()
    assert_same_weights(resumed.ema.weights(), ref.ema.weights())


def test_a_run_continues_from_its_release_when_the_folder_is_gone(camvid, tmp_path):
    run = tmp_path / "run"
    first = Trainer(ema_recipe(camvid), run, tensorboard=False, plots=False)

    def stop_after_second_epoch(optimizer, args, kwargs):
        if first.global_iter == 6:  # the first step of epoch 3, after epoch 2's validation wrote best.pt
            os.kill(os.getpid(), signal.SIGTERM)

    first.optimizer.register_step_post_hook(stop_after_second_epoch)
    first.fit()
    release = release_checkpoint(run / "best.pt", tmp_path / "release.pt")
    shutil.rmtree(run)  # a new machine: only the release survives

    released = load_checkpoint(release)
    assert released.training_state is None
    cont = released.continuation
    assert (cont["epoch"], cont["global_iter"], cont["total_iters"], cont["iters_per_epoch"]) == (2, 6, 12, 3)
    assert cont["ema_updates"] == 6 and len(cont["history"]) == 1 and cont["history"][0][:2] == [2.0, 6.0]

    again = Trainer(ema_recipe(camvid, f"train.init={release}", "train.rewarm_iters=3"), tmp_path / "new",
                    tensorboard=False, plots=False)
    assert (again.epoch, again.global_iter, again.continued_from) == (2, 6, str(release))
    assert again.best_miou == pytest.approx(cont["best_miou"])
    scheduled = again.config.optim.lr * again.scheduler.factor(6)
    assert again.optimizer.param_groups[0]["lr"] == pytest.approx(scheduled / 4)  # ramp step 1 of 3 (+1)
    assert_same_weights(again.ema.weights(), released.state_dict)
    raw = {k: v.float() if v.is_floating_point() else v for k, v in cont["raw_weights"].items()}
    live = again.model.state_dict()
    assert all(torch.equal(live[k], raw[k]) for k in raw)
    result = again.fit()
    assert result.iterations == 12 and result.epochs_done == 4
    # after the ramp the rate is the schedule's again
    assert again.optimizer.param_groups[0]["lr"] == pytest.approx(again.config.optim.lr * again.scheduler.factor(12))
    # the validation history goes on from the release's: epoch 2 (before the move), epoch 4 (after)
    assert [h[:2] for h in again.history] == [[2.0, 6.0], [4.0, 12.0]]


def test_a_runs_position_carried_into_a_release_survives_the_folder_without_releasing_its_weights(camvid, tmp_path):
    run = tmp_path / "run"
    first = Trainer(ema_recipe(camvid), run, tensorboard=False, plots=False)

    def stop_mid_epoch(optimizer, args, kwargs):
        if first.global_iter == 4:  # stops after 5 of 12 iterations: two of epoch 2's three done
            os.kill(os.getpid(), signal.SIGTERM)

    first.optimizer.register_step_post_hook(stop_mid_epoch)
    first.fit()
    last = load_checkpoint(run / "last.pt")
    # the shipped model: other weights (here the run's halved), which the carried position must leave alone
    shipped = load_checkpoint(release_checkpoint(run / "last.pt", tmp_path / "shipped.pt"))
    shipped.state_dict = {k: v / 2 if v.is_floating_point() else v for k, v in shipped.state_dict.items()}
    save_checkpoint(shipped, tmp_path / "shipped.pt")
    carry_position(run / "last.pt", tmp_path / "shipped.pt")
    shutil.rmtree(run)  # a new machine: only the release survives

    carried = load_checkpoint(tmp_path / "shipped.pt")
    assert carried.training_state is None
    assert_same_weights(carried.state_dict, shipped.state_dict)
    cont = carried.continuation
    assert (cont["epoch"], cont["iter_in_epoch"], cont["global_iter"], cont["iters_per_epoch"]) == (1, 2, 5, 3)
    assert cont["ema_updates"] == 5 and all(v.dtype != torch.float32 for v in cont["ema_weights"].values())

    again = Trainer(ema_recipe(camvid, f"train.init={tmp_path / 'shipped.pt'}"), tmp_path / "new",
                    tensorboard=False, plots=False)
    assert (again.epoch, again.iter_in_epoch, again.global_iter) == (1, 2, 5)
    def via_fp16(weights):
        return {k: v.half().float() if v.is_floating_point() else v for k, v in weights.items()}

    assert_same_weights(again.ema.weights(), via_fp16(last.training_state["ema"]["weights"]))  # not the shipped
    raw = via_fp16(last.state_dict)
    live = again.model.state_dict()
    assert all(torch.equal(live[k], raw[k]) for k in raw)
    result = again.fit()
    assert (result.iterations, result.epochs_done) == (12, 4)  # the rest of epoch 2, then epochs 3 and 4


def test_a_release_of_another_schedule_is_a_plain_warm_start(camvid, tmp_path, capsys):
    run = tmp_path / "run"
    Trainer(ema_recipe(camvid), run, tensorboard=False, plots=False).fit()
    other = Trainer(ema_recipe(camvid, "train.epochs=6", f"train.init={run / 'best.pt'}"), tmp_path / "b",
                    tensorboard=False, plots=False)
    assert other.global_iter == 0 and other.continued_from is None
    assert "schedule differs (total_iters 12 there, 18 here)" in capsys.readouterr().err
    fresh = Trainer(ema_recipe(camvid, f"train.init={run / 'best.pt'}", "train.continue_schedule=false"),
                    tmp_path / "c", tensorboard=False, plots=False)
    assert fresh.global_iter == 0
    assert_same_weights(dict(fresh.model.state_dict()), load_checkpoint(run / "best.pt").state_dict)


def test_milder_class_weights_are_a_power_of_the_enet_weights(camvid, tmp_path):
    enet = Trainer(tiny(camvid), tmp_path / "a", tensorboard=False, plots=False).class_weights
    mild = Trainer(tiny(camvid, "data.class_weight_power=0.5"), tmp_path / "b", tensorboard=False,
                   plots=False).class_weights
    assert mild == pytest.approx([w ** 0.5 for w in enet])


def test_sequence_filters_hold_a_street_out(tmp_path):
    root = make_camvid(tmp_path / "cv", n_train=4, n_val=1)
    for i, p in enumerate(sorted((root / "train").glob("*.png"))):  # two "sequences": seqA_, seqB_
        seq = "seqA" if i < 3 else "seqB"
        p.rename(p.with_name(f"{seq}_{p.name}"))
        (root / "trainannot" / p.name).rename(root / "trainannot" / f"{seq}_{p.name}")
    assert parse_split("train:-seqB,seqC") == ("train", ("seqB", "seqC"), True)
    assert keeps("seqA_1", ("seqB",), True) and not keeps("seqA_1", ("seqB",), False)
    _, without = build_dataset("camvid", root, "train:-seqB")
    _, only = build_dataset("camvid", root, "train:seqB")
    assert [s.stem[:4] for s in without] == ["seqA"] * 3 and [s.stem[:4] for s in only] == ["seqB"]
    with pytest.raises(DataError, match="no sample name starts with seqZ"):
        build_dataset("camvid", root, "train:seqZ")
    with pytest.raises(DataError, match="expected NAME:PREFIX"):
        build_dataset("camvid", root, "train:")


def test_unseen_street_augmentations_keep_shapes_and_are_seeded():
    rng_image = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    a = blur_noise(rng_image, np.random.default_rng(5), p=1.0)
    b = blur_noise(rng_image, np.random.default_rng(5), p=1.0)
    assert a.shape == rng_image.shape and a.dtype == np.uint8 and np.array_equal(a, b)
    assert not np.array_equal(a, rng_image)
    assert np.array_equal(blur_noise(rng_image, np.random.default_rng(5), p=0.0), rng_image)
    label = np.zeros((40, 60), np.uint8)
    t = TrainTransform((24, 32), [0, 0, 0], [1, 1, 1], 11, scale_range=(0.5, 2.0), scale_step=None, jitter=True,
                       blur_noise=True)
    image, lab = t(rng_image, label, np.random.default_rng(1))
    assert image.shape == (3, 24, 32) and lab.shape == (24, 32)
    again, _ = t(rng_image, label, np.random.default_rng(1))
    assert torch.equal(image, again)


def test_every_checkpoint_temporary_of_the_run_goes_on_start_and_at_the_end(camvid, tmp_path):
    """A kill during a save leaves ``.last.pt.*.tmp``; a quick restart (the file is seconds old) and the finished run
    leave none behind."""
    run = tmp_path / "run"
    run.mkdir()
    (run / ".last.pt.abc123.tmp").write_bytes(b"")  # a kill right after mkstemp
    trainer = Trainer(tiny(camvid, "train.epochs=1"), run, tensorboard=False, plots=False)
    assert not list(run.glob(".*.tmp"))
    (run / ".best.pt.def456.tmp").write_bytes(b"partial")  # as if a save of this run had been cut short
    trainer.fit()
    assert not list(run.glob(".*.tmp")) and (run / "last.pt").is_file()


def test_max_iters_stops_without_shrinking_the_schedule_and_the_run_goes_on(camvid, tmp_path):
    """--max-iters 4 of a 12-iteration schedule (3 per epoch) stops inside epoch 2; log.csv keeps epoch 1, and
    the continued run (--max-iters 8, then none) follows the same schedule to the end."""
    run = tmp_path / "run"
    first = Trainer(tiny(camvid, "train.max_iters=4", "train.val_every=1"), run, tensorboard=False, plots=False)
    assert first.total_iters == 12 and first.stop_at == 4
    result = first.fit()
    assert result.stopped == "max_iters" and result.iterations == 4 and result.epochs_done == 1
    assert [r.split(",")[0] for r in (run / "log.csv").read_text().splitlines()[1:]] == ["1"]
    second = Trainer(tiny(camvid, "train.max_iters=8", "train.val_every=1"), run, resume="auto", tensorboard=False,
                     plots=False)
    assert second.global_iter == 4
    assert second.optimizer.param_groups[0]["lr"] == pytest.approx(second.config.optim.lr *
                                                                   second.scheduler.factor(4))
    second.fit()
    assert [r.split(",")[0] for r in (run / "log.csv").read_text().splitlines()[1:]] == ["1", "2"]
    third = Trainer(tiny(camvid, "train.val_every=1"), run, resume="auto", tensorboard=False, plots=False)
    assert third.fit().stopped == "done" and third.global_iter == 12
    assert [r.split(",")[0] for r in (run / "log.csv").read_text().splitlines()[1:]] == ["1", "2", "3", "4"]


def test_val_every_zero_never_validates(camvid, tmp_path):
    trainer = Trainer(tiny(camvid, "train.val_every=0", "train.epochs=1"), tmp_path / "r", tensorboard=False,
                      plots=False)
    trainer.validate = None  # would fail if called
    assert trainer.fit().stopped == "done" and not (tmp_path / "r" / "best.pt").exists()


def test_cli_refused_or_failed_runs_leave_their_folders_as_they_were(camvid, tmp_path, capsys):
    from ecmnet_core.cli import main

    base = ["train", "--config", "camvid", "--data", str(camvid), "--model", "baseline", "--crop", "32", "48",
            "--batch-size", "2", "--workers", "0", "--no-progress", "--no-tensorboard", "--no-plots", "--no-amp",
            "--set", "data.scale_range=[0.75, 1.25]", "--set", "schedule.warmup_iters=1"]
    run = tmp_path / "run"
    assert main([*base, "--out", str(run), "--epochs", "2", "--max-iters", "2", "--resume", "auto"]) == 0
    config = (run / "config.yaml").read_text()
    assert main([*base, "--out", str(run), "--epochs", "5", "--resume", "auto"]) == 2
    assert "start a new run folder (--out) from these weights (--init" in capsys.readouterr().err
    assert (run / "config.yaml").read_text() == config  # the refused attempt did not rewrite it
    missing = tmp_path / "never"
    assert main([*base, "--out", str(missing), "--data", str(tmp_path / "no_such_data")]) == 2
    assert not missing.exists()
