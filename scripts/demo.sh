#!/usr/bin/env bash
# Set up the environment and run the segmentation node end to end on the built-in synthetic camera
# (no ROS install needed). Extra arguments go to the demo (see: python -m ecmnet_ros.demo --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${VENV:-.venv}"
# shellcheck disable=SC1091
source "$VENV/bin/activate"
export ROS_AUTOMATIC_DISCOVERY_RANGE="${ROS_AUTOMATIC_DISCOVERY_RANGE:-LOCALHOST}"
python -m ecmnet_ros.demo "$@"
