#!/usr/bin/env bash
# Check every GPU path on a lent GPU (the device tool's machine: Python 3.12 with CUDA PyTorch, Triton, numpy, OpenCV,
# onnxruntime; no ecmnet install, no mamba-ssm, no network, a 64 MiB tree): ≤ 8 minutes on an H100/H200.
#
#   bash scripts/gpu_check.sh prepare [--data ../shared/camvid]   # here: 20 CamVid val images + PyYAML into .gpu/
#   # device tool: command "bash scripts/gpu_check.sh run", carry [".gpu"], timeout_s 540
#
# run: the CUDA tests (Triton scan against the float64 reference and the PyTorch scan), val mIoU on the 20 images
# and the latency of every GPU path (fp32, fp16, CUDA graphs, Triton/PyTorch scans, ONNX Runtime CUDA/TensorRT) at
# 360x480, 512x1024 and 1024x2048, written as gpu_check.md and gpu_check.json to $OUT
# (python -m ecmnet_core.bench.gpu_check). Without CUDA it says so, skips the CUDA parts and checks the harness on
# the CPU (how the tests run it).
set -euo pipefail
cd "$(dirname "$0")/.."
GPU_DIR="${GPU_DIR:-.gpu}"
# shellcheck source=scripts/gpu_pydeps.sh
source scripts/gpu_pydeps.sh
mode="${1:-}"
shift || true
IMAGES=20

case "$mode" in
prepare)
  data="${ECMNET_SHARED:-../shared}/camvid"
  if [[ "${1:-}" == "--data" ]]; then data="$2"; shift 2; fi
  dest="$GPU_DIR/check/camvid"
  rm -rf "$dest"
  mkdir -p "$dest/val" "$dest/valannot"
  # every fifth val image (both val sequences), labels beside them: PNG as the dataset has them (~6 MB)
  mapfile -t picked < <(find "$data/val" -maxdepth 1 -name '*.png' | sort | awk 'NR % 5 == 1' | head -n "$IMAGES")
  if [[ ${#picked[@]} -eq 0 ]]; then echo "gpu_check: no val images under $data/val" >&2; exit 2; fi
  for f in "${picked[@]}"; do
    cp "$f" "$dest/val/"
    cp "$data/valannot/$(basename "$f")" "$dest/valannot/"
  done
  copy_pydeps "$GPU_DIR/pydeps"
  du -sh "$GPU_DIR/check" "$GPU_DIR/pydeps"
  echo "carry [\"$GPU_DIR\"] with: bash scripts/gpu_check.sh run"
  ;;
run)
  out="${OUT:-$GPU_DIR/check_out}"
  export PYTHONPATH="$PWD:$PWD/$GPU_DIR/pydeps${PYTHONPATH:+:$PYTHONPATH}"
  py="${PYTHON:-python3}"
  data_args=()
  if [[ -d "$GPU_DIR/check/camvid" ]]; then data_args=(--data "$GPU_DIR/check/camvid"); fi
  "$py" -m ecmnet_core.bench.gpu_check "${data_args[@]}" --out "$out" "$@"
  ;;
*)
  echo "usage: bash scripts/gpu_check.sh prepare [--data DIR] | run [gpu_check args]" >&2
  exit 2
  ;;
esac
