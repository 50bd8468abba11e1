"""The command line speaks one way: exit status 2 for bad input or usage in every command (0 done, 1 a failure on
good input), one line per warning without Python's source echo, no reStructuredText markup in --help, and plain
wording in the run summaries."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ecmnet_core.cli import _one_line, build_parser
from ecmnet_core.cli import main as cli
from ecmnet_core.data.io import write_image
from ecmnet_core.train.trainer import _dataset_label

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("argv,message", [
    (["make-bag", "--out", "x"], "make-bag: give exactly one source"),
    (["info", "--classes", "0"], "info: --classes must be >= 1"),
    (["bench", "model", "--threads", "0"], "bench model: --threads must be >= 1"),
    (["release", "nothing.pt", "out.pt"], "release: "),
    (["release", "--position-only", "nothing.pt", "out.pt"], "release: "),
])
def test_bad_input_exits_2_with_the_command_named(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        cli(argv)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_warnings_are_one_line_naming_the_command():
    out = io.StringIO()
    _one_line("predict")(UserWarning("RANDOM WEIGHTS: untrained"), UserWarning, "/x/segmenter.py", 170, file=out)
    assert out.getvalue() == "predict: warning: RANDOM WEIGHTS: untrained\n"


def test_a_missing_checkpoint_is_one_line_and_exit_2(tmp_path):
    image = tmp_path / "in.png"
    write_image(image, np.full((40, 56, 3), 80, np.uint8))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "ecmnet_core", "predict", str(image), "--out", str(tmp_path / "o"),
                           "--checkpoint", str(tmp_path / "missing.pt")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2 and "missing.pt" in done.stderr
    assert "warnings.warn(" not in done.stderr and "Traceback" not in done.stderr


def test_help_has_no_markup():
    text = build_parser().format_help()
    assert "``" not in text and text.splitlines()[2].startswith("ecmnet-core (or python -m ecmnet_core)")


def test_the_dataset_is_named_once():
    assert _dataset_label("camvid", "camvid") == "camvid"
    assert _dataset_label("camvid", "shards") == "camvid (shards)"
