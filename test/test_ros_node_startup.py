"""Bad start-up values end the node at once with one line that names the parameter, the value and what is allowed
(exit 2, no traceback); the node's own checks apply to start-up values too; a misspelt key is warned about."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("rclpy")
pytestmark = [pytest.mark.ros, pytest.mark.filterwarnings("ignore:RANDOM WEIGHTS")]

from rclpy.exceptions import InvalidParameterValueException  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402

from ecmnet_ros.runtime import startup_error  # noqa: E402


def start(*ros_args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ecmnet_ros.segmenter", "--ros-args", "-p", "model:=baseline",
                           "-p", "num_classes:=4", *ros_args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args,expected", [
    (["-p", "overlay_alpha:=2.0"], "parameter 'overlay_alpha': 2.0 is out of range [0.0, 1.0]"),
    (["-p", "overlay_alpha:=1"], "parameter 'overlay_alpha': '1' is integer, expected double (write 1.0)"),
    (["-p", "input_size:=[100000, 100000]"], "parameter 'input_size': [100000, 100000] must be [H, W] with 16"),
])
def test_bad_start_up_values_end_the_node_with_one_line(args, expected):
    done = start(*args)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == [f"segmenter: {expected}"] or (len(lines) == 1 and lines[0].startswith(f"segmenter: {expected}"))
    assert "Traceback" not in done.stderr


def test_a_broken_params_file_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("not: [valid\n")
    done = start("--params-file", str(bad))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"segmenter: Couldn't parse params file: '--params-file {bad}'" in done.stderr


@pytest.mark.parametrize("name,value,reason", [
    ("input_size", [1], "must be [H, W]"),
    ("image_topics", ["", ""], "has empty or repeated topics"),
    ("lidar_to_camera", [float("nan")] + [0.0] * 14 + [1.0], "holds NaN or infinite values"),
])
def test_the_nodes_own_checks_apply_to_start_up_values(ros_context, name, value, reason):
    from ecmnet_ros.segmenter import SegmenterNode

    with pytest.raises(InvalidParameterValueException) as err:
        SegmenterNode(context=ros_context, parameter_overrides=[Parameter(name, value=value)])
    line = startup_error(err.value)
    assert line.startswith(f"parameter {name!r}") and reason in line


def test_a_misspelt_key_is_warned_about_with_the_closest_name(ros_context, capfd):
    from ecmnet_ros.segmenter import SegmenterNode

    node = SegmenterNode(context=ros_context, parameter_overrides=[
        Parameter("overlay_alfa", value=0.3), Parameter("autostart", value=False)])
    try:
        err = capfd.readouterr().err
        assert "parameter 'overlay_alfa' is not a parameter of this node and is ignored; did you mean " \
               "'overlay_alpha'?" in err
    finally:
        node.destroy_node()


def test_a_failed_configure_says_how_to_recover(segmenter_node, capfd):
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA (device: cuda must fail)")
    from rclpy.lifecycle import TransitionCallbackReturn

    node = segmenter_node(autostart=False, device="cuda")
    assert node.trigger_configure() != TransitionCallbackReturn.SUCCESS
    err = capfd.readouterr().err
    assert "configure failed" in err and "ros2 param set /segmenter NAME VALUE" in err
    assert "ros2 lifecycle set /segmenter configure" in err


def test_no_frames_is_said_once_on_the_console(segmenter_node, capfd):
    from ecmnet_ros import diagnostics as diag

    node = segmenter_node()
    capfd.readouterr()
    diag.warn_if_no_input(node, node.streams, active_since=100.0, now=101.0)  # too early to say anything
    assert "no frames on" not in capfd.readouterr().err
    diag.warn_if_no_input(node, node.streams, active_since=100.0, now=106.0)
    diag.warn_if_no_input(node, node.streams, active_since=100.0, now=107.0)
    err = capfd.readouterr().err
    assert err.count("no frames on /image after 6 s (0 publisher(s))") == 1
