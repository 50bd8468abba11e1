"""Warm-up poly schedule values, the scheduler object, and recipe loading/overrides."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from ecmnet_core.train.config import ConfigError, TrainConfig, load_config
from ecmnet_core.train.schedule import WarmupPolyLR, effective_warmup, warmup_poly_factor


def test_factor_at_key_iterations():
    """lr/3 at 0, linear to lr at 500, then (1 - (i-500)/(T-500))^0.9 down to 0 at T."""
    T = 45_000  # CamVid: 1000 epochs x 45 iterations
    assert warmup_poly_factor(0, T) == pytest.approx(1 / 3)
    assert warmup_poly_factor(250, T) == pytest.approx(2 / 3)
    assert warmup_poly_factor(500, T) == pytest.approx(1.0)
    assert warmup_poly_factor(501, T) == pytest.approx((1 - 1 / 44_500) ** 0.9)
    assert warmup_poly_factor(22_750, T) == pytest.approx(0.5 ** 0.9)
    assert warmup_poly_factor(T, T) == 0.0
    assert warmup_poly_factor(T + 10, T) == 0.0


def test_scheduler_follows_factor_per_iteration_and_resumes():
    """Stepping once per iteration gives base_lr * factor(i); a restored state continues identically."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.045)
    sched = WarmupPolyLR(opt, total_iters=1000, warmup_iters=100)
    lrs = []
    for _ in range(600):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [0.045 * warmup_poly_factor(i, 1000, 100) for i in range(600)]
    assert lrs == pytest.approx(expected, rel=1e-12)

    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.045)
    opt2.load_state_dict(opt.state_dict())
    sched2 = WarmupPolyLR(opt2, total_iters=1000, warmup_iters=100)
    sched2.load_state_dict(sched.state_dict())
    for i in range(600, 1000):
        assert opt2.param_groups[0]["lr"] == pytest.approx(0.045 * warmup_poly_factor(i, 1000, 100), rel=1e-12)
        opt2.step()
        sched2.step()
    assert opt2.param_groups[0]["lr"] == 0.0


def test_short_runs_shorten_the_warmup():
    assert effective_warmup(500, 45_000) == 500
    with pytest.warns(UserWarning, match="does not fit"):
        assert effective_warmup(500, 45) == 4
    with pytest.raises(ValueError, match="do not exceed"):
        warmup_poly_factor(0, 10, warmup=10)


def test_shipped_recipes_match_the_paper():
    cam = load_config("camvid")
    assert (cam.optim.name, cam.optim.lr, cam.optim.weight_decay, cam.optim.betas) == ("adam", 1e-3, 2e-4, (0.9, 0.999))
    assert (cam.data.batch_size, cam.data.crop, cam.data.scale_range, cam.data.flip) == (8, (360, 480), (0.75, 2.0),
                                                                                         True)
    city = load_config("cityscapes.yaml")
    assert (city.optim.name, city.optim.lr, city.optim.momentum, city.optim.weight_decay) == ("sgd", 0.045, 0.9, 1e-4)
    assert (city.data.batch_size, city.data.crop) == (6, (1024, 1024))
    for cfg in (cam, city):
        assert cfg.train.epochs == 1000 and cfg.schedule.warmup_iters == 500 and cfg.schedule.power == 0.9
        assert math.isclose(cfg.schedule.warmup_ratio, 1 / 3) and cfg.data.class_weights == "enet"


def test_overrides_are_typed_and_unknown_keys_fail(tmp_path):
    cfg = load_config("camvid", ["optim.lr=0.002", "data.crop=[180, 240]", "train.amp=false", "model.scan_backend=null",
                                 "model.overrides.ffm_width=64"])
    assert cfg.optim.lr == 0.002 and cfg.data.crop == (180, 240) and cfg.train.amp is False
    assert cfg.model.scan_backend is None and cfg.model.overrides == {"ffm_width": 64}
    with pytest.raises(ConfigError, match="unknown key optim.lrr"):
        load_config("camvid", ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="data.crop must be a list of 2"):
        load_config("camvid", ["data.crop=5"])
    with pytest.raises(ConfigError, match="train.epochs must be an integer"):
        load_config("camvid", ["train.epochs=ten"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  momentun: 0.9\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key optim.momentun"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config("no_such_recipe")
    # a round trip through the plain dict keeps every value
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_train_help_names_every_shipped_recipe_and_scan_backend(capsys):
    from ecmnet_core.cli import main
    from ecmnet_core.ops.selective_scan import BACKENDS

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in ("camvid", "camvid_cpu", "camvid_long", "cityscapes", *BACKENDS):
        assert name in text, name
    assert "epochs of the schedule" in text and "seed of the initial weights" in text
