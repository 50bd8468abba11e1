"""Shared fixtures. ROS ones (``ros_context``, ``spinner``, ``probe``, ``image_msg``, ``segmenter_node``) skip
cleanly when rclpy is not installed; DDS discovery stays on localhost in a per-session domain (1..101, from the pid).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

#: Read-only data (datasets, docs): $ECMNET_SHARED or ../shared next to the repository.
SHARED = Path(os.environ.get("ECMNET_SHARED") or Path(__file__).resolve().parents[1].parent / "shared")

try:
    import rclpy  # noqa: F401

    HAVE_RCLPY = True
except ImportError:  # the library tests run without ROS
    HAVE_RCLPY = False

# before any context exists, so every rclpy context of this session is isolated from other sessions running at
# the same time (parallel CI jobs, a developer's ROS graph): localhost-only discovery, a domain from the pid
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ["ROS_DOMAIN_ID"] = str(1 + os.getpid() % 101)

#: Small, fast node settings for tests: random-weight baseline, 4 classes, 64x96 network input.
FAST_NODE_PARAMS: dict[str, Any] = {"model": "baseline", "num_classes": 4, "input_size": [64, 96], "warmup": 1}


def _need_rclpy() -> None:
    if not HAVE_RCLPY:
        pytest.skip("rclpy is not installed (pip install -e '.[ros]')")


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"shared data not found at {SHARED} (set ECMNET_SHARED)")
    return SHARED


@pytest.fixture
def ros_context() -> Iterator[Any]:
    """A fresh rclpy context for one test (shut down afterwards)."""
    _need_rclpy()
    from ecmnet_ros.runtime import ros_context as make_context

    with make_context() as context:
        yield context


@pytest.fixture
def spinner(ros_context: Any) -> Iterator[Any]:
    """A MultiThreadedExecutor spinning in a thread: ``spinner.add(node)``; stopped and nodes destroyed after."""
    from ecmnet_ros.runtime import Spinner

    spin = Spinner(ros_context).start()
    yield spin
    spin.stop()


@pytest.fixture
def probe(ros_context: Any, spinner: Any) -> Any:
    """A plain node (publishers/subscribers of the test), already spinning."""
    from rclpy.node import Node

    return spinner.add(Node("test_probe", context=ros_context))


@pytest.fixture
def image_msg() -> Callable[..., Any]:
    """Factory: ``image_msg(array, encoding=None, stamp_ns=1, frame_id="camera")`` -> sensor_msgs/Image."""
    _need_rclpy()
    from ecmnet_core.image_messages import array_to_image
    from ecmnet_ros.runtime import make_header

    def make(array: np.ndarray, encoding: str | None = None, stamp_ns: int = 1, frame_id: str = "camera") -> Any:
        return array_to_image(array, encoding, make_header(stamp_ns, frame_id))

    return make


@pytest.fixture
def segmenter_node(ros_context: Any, spinner: Any) -> Callable[..., Any]:
    """Factory: ``segmenter_node(name="segmenter", namespace=None, **params)`` -> an active SegmenterNode.

    Uses :data:`FAST_NODE_PARAMS` unless overridden; ``autostart=False`` returns it unconfigured.
    """
    from rclpy.parameter import Parameter

    from ecmnet_ros.segmenter import SegmenterNode

    def make(name: str = "segmenter", namespace: str | None = None, **params: Any) -> Any:
        values = {**FAST_NODE_PARAMS, **params}
        node = SegmenterNode(name, namespace=namespace or "", context=ros_context,
                             parameter_overrides=[Parameter(k, value=v) for k, v in values.items()])
        spinner.add(node)
        if values.get("autostart", True):
            assert node.bring_up(), f"segmenter node failed to come up: {node.diagnostics().status[0].message}"
        return node

    return make


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module: the CI machine's 2 cores are shared, and OpenMP spinning under
    contention is slow. Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def threads():
    """``threads(n)`` sets the intra-op thread count for one test; the previous count is restored afterwards."""
    import torch

    saved = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(saved)
