#!/usr/bin/env bash
# Train ECMNet on CamVid on a lent GPU (the device tool's machine: Python 3.12 with CUDA PyTorch, numpy, OpenCV;
# no ecmnet install, no network, a 64 MiB tree, 10 minutes a command), resuming across calls.
#
#   bash scripts/train_gpu.sh prepare [--data ../shared/camvid]   # here: CamVid as JPEG shards + PyYAML into .gpu/
#   # device tool: command "bash scripts/train_gpu.sh run --budget 480", carry [".gpu"]
#   bash scripts/train_gpu.sh restore FILES_AT                     # here: the run it brought back -> .gpu/run
#
# run: trains with --resume auto in .gpu/run for at most BUDGET seconds (SIGINT then: last.pt is saved at the next
# iteration boundary), then copies last.pt, best.pt, log.csv and train.log to $OUT. Extra arguments go to
# `ecmnet-core train` (default recipe: the paper's, --config camvid, 1000 epochs, AMP, EMA). Without CUDA it says
# so and trains on the CPU (how the tests run it, with --max-iters).
set -euo pipefail
cd "$(dirname "$0")/.."
GPU_DIR="${GPU_DIR:-.gpu}"
# shellcheck source=scripts/gpu_pydeps.sh
source scripts/gpu_pydeps.sh
mode="${1:-}"
shift || true

case "$mode" in
prepare)
  data="${ECMNET_SHARED:-../shared}/camvid"
  if [[ "${1:-}" == "--data" ]]; then data="$2"; shift 2; fi
  rm -rf "$GPU_DIR/camvid"
  python -m ecmnet_core pack --data "$data" --split train --split val --out "$GPU_DIR/camvid" --format jpeg \
    --quality 95 --overwrite
  copy_pydeps "$GPU_DIR/pydeps"
  du -sh "$GPU_DIR"
  echo "carry [\"$GPU_DIR\"] with: bash scripts/train_gpu.sh run --budget 480"
  ;;
run)
  budget=480
  if [[ "${1:-}" == "--budget" ]]; then budget="$2"; shift 2; fi
  out="${OUT:-$GPU_DIR/out}"
  mkdir -p "$out" "$GPU_DIR/run"
  export PYTHONPATH="$PWD:$PWD/$GPU_DIR/pydeps${PYTHONPATH:+:$PYTHONPATH}"
  py="${PYTHON:-python3}"
  if "$py" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    "$py" -c 'import torch; print("GPU:", torch.cuda.get_device_name(0), "torch", torch.__version__)'
    amp=(--amp --workers 6)
  else
    echo "train_gpu: no CUDA device here; training on the CPU (a check of the script, not a GPU run)"
    amp=(--no-amp --workers 0)
  fi
  set +e
  timeout -s INT -k 60 "$budget" "$py" -m ecmnet_core train --config camvid --kind shards --data "$GPU_DIR/camvid" \
    --out "$GPU_DIR/run" --resume auto --set train.ema_decay=0.999 --val-every 50 --checkpoint-every 200 \
    --no-tensorboard --no-plots --no-progress "${amp[@]}" "$@" 2>&1 | tee "$GPU_DIR/run/train.log"
  status=${PIPESTATUS[0]}
  set -e
  for f in last.pt best.pt log.csv train.log config.yaml; do
    if [[ -f "$GPU_DIR/run/$f" ]]; then cp "$GPU_DIR/run/$f" "$out/"; fi
  done
  # 124/130: the budget ran out and last.pt was saved at an iteration boundary; the next call resumes there
  if [[ $status -ne 0 && $status -ne 124 && $status -ne 130 ]]; then exit "$status"; fi
  ;;
restore)
  src="${1:?restore needs the folder the device tool brought back (files_at)}"
  mkdir -p "$GPU_DIR/run"
  found=0
  for f in last.pt best.pt log.csv train.log config.yaml; do
    path="$(find "$src" -name "$f" -type f | head -n 1)"
    if [[ -n "$path" ]]; then cp "$path" "$GPU_DIR/run/$f"; found=1; fi
  done
  if [[ $found -eq 0 ]]; then echo "train_gpu: no run files under $src" >&2; exit 2; fi
  echo "restored into $GPU_DIR/run; the next run call resumes from it"
  ;;
*)
  echo "usage: bash scripts/train_gpu.sh prepare [--data DIR] | run [--budget S] [train args] | restore DIR" >&2
  exit 2
  ;;
esac
