#!/usr/bin/env bash
# Set up the environment, lint, and run the whole test suite (the command CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${VENV:-.venv}"
# shellcheck disable=SC1091
source "$VENV/bin/activate"
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
ruff check .
python -m pytest "$@"
