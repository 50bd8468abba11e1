"""What weight decay killed in the shipped model, and reviving it without changing the model's output
(``ecmnet_core.train.revive``; ``vanished_weights`` is what ``ecmnet-core release`` prints)."""

from __future__ import annotations

import pytest
import torch
from test_train_loop import tiny

from ecmnet_core.checkpoint import load_checkpoint
from ecmnet_core.train.revive import revive_vanished, vanished_weights
from ecmnet_core.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def shipped():
    ckpt = load_checkpoint(None)
    model = ckpt.build_model(scan_backend="torch")
    model.load_state_dict(ckpt.state_dict)
    return ckpt, model.eval()


def test_the_shipped_model_has_a_dead_ffn_and_mostly_dead_ss2d_channels(shipped):
    report = vanished_weights(shipped[0].state_dict)["tensors"]
    assert report["ffm.ffn.fc2.weight"]["vanished"] == report["ffm.ffn.fc2.weight"]["of"]
    assert report["ffm.vss.ss2d.out_proj.weight"]["dead_cols"] > 200  # of 256 inner channels


def test_revival_keeps_the_output_and_gives_the_dead_parts_gradients(shipped):
    _, model = shipped
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(x)
    revived = revive_vanished(model)
    assert revived["ffn"] == 1 and revived["ss2d_channels"] > 200 and revived["msau_gates"] >= 1
    with torch.no_grad():
        after = model(x)
    assert torch.allclose(before, after, atol=1e-5, rtol=0)  # only the vanished (< 1e-20) weights' share changes
    assert revive_vanished(model) == {"ffn": 0, "ss2d_channels": 0, "msau_gates": 0}  # nothing left to revive
    model.zero_grad()
    model(x).square().mean().backward()
    ffn, ss2d = model.ffm.ffn, model.ffm.vss.ss2d
    assert ffn.fc2.weight.grad.abs().sum() > 0  # the zeroed last layers learn at once
    dead = ss2d.out_proj.weight.detach().abs().sum(0) == 0
    assert ss2d.out_proj.weight.grad[:, dead].abs().sum() > 0
    gates = [m.spatial_pw for m in model.msau if not m.spatial_pw.weight.detach().any()]  # the revived ones
    assert len(gates) == revived["msau_gates"] and all(pw.weight.grad.abs().sum() > 0 for pw in gates)


def test_the_recipe_switches(tmp_path):
    from helpers import make_camvid

    root = make_camvid(tmp_path / "cv", n_train=4, n_val=1)
    trainer = Trainer(tiny(root, "optim.decay_norms_and_biases=false"), tmp_path / "run", tensorboard=False,
                      plots=False)
    decayed = {id(p) for g in trainer.optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    params = list(trainer.model.parameters())
    assert decayed and all((p.dim() > 1) == (id(p) in decayed) for p in params)
