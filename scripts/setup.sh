#!/usr/bin/env bash
# Create (or reuse) a virtual environment with ecmnet and what its tests and demo need.
# VENV: where (default .venv); FRESH=1 recreates it. torch==2.13.0 first: on these machines it is a local CPU
# build, whereas a bare "torch" would resolve to a multi-GB CUDA build. GPU users keep their own torch.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
if [[ "${FRESH:-0}" == "1" ]]; then rm -rf "$VENV"; fi
if [[ ! -x "$VENV/bin/python" ]]; then python3 -m venv "$VENV"; fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
python -m pip install -q --upgrade pip 2>&1 | grep -v -i warning || true
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0" 2>&1 | grep -v -i warning || true
python -m pip install -q -e ".[test,ros]" 2>&1 | grep -v -i warning || true
# The real ROS 2 Python tooling (launch, launch_ros, the ros2 command, colcon), which PyPI lacks, from the shared
# wheels when they are there; without them the tests that drive colcon/ros2 skip.
ROS2_PYTHON="${ECMNET_SHARED:-../shared}/ros2_python"
if [[ -f "$ROS2_PYTHON/install.sh" ]]; then
  python -c "import launch_ros, ros2cli, colcon_core, sensor_msgs_py, cv_bridge" 2>/dev/null \
    || bash "$ROS2_PYTHON/install.sh" 2>&1 | grep -v -i warning
else
  echo "ros2 tooling: $ROS2_PYTHON/install.sh not found, skipping (colcon/ros2 launch tests will skip)"
fi
python -c "import torch, ecmnet_core, rclpy; print('ecmnet env ready: torch', torch.__version__)"
