#!/usr/bin/env bash
# Check MoLink on a CUDA machine: the device path, greedy equality with one vLLM process, speed.
#   bash scripts/gpu_check.sh                          the demo model (built locally), fp16
#   bash scripts/gpu_check.sh --model DIR --dtype bfloat16 [--quick] [--out DIR]
# Needs one NVIDIA (or ROCm) GPU and MoLink installed with `bash scripts/install.sh`, which
# installs vLLM's CUDA build on a GPU machine. Every node of the check shares that GPU.
# Exit status: 0 all checks passed, 1 no usable GPU (nothing run), 2 a check failed.
# Results: $OUT/summary.md, with each step's full output beside it.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="" DTYPE=float16 QUICK="" OUT=gpu-check
while [[ $# -gt 0 ]]; do
  case "$1" in
    --model) MODEL="$2"; shift 2 ;;
    --dtype) DTYPE="$2"; shift 2 ;;
    --quick) QUICK=--quick; shift ;;
    --out) OUT="$2"; shift 2 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see the header of $0)" >&2; exit 1 ;;
  esac
done
mkdir -p "$OUT"

# 1. A GPU, and vLLM's CUDA build to drive it.
if ! DEVICE=$(python - <<'PY'
import sys

import torch

if not torch.cuda.is_available():
    sys.exit("gpu_check.sh: no CUDA GPU visible to torch (torch.cuda.is_available() is False)")
from vllm.platforms import current_platform

if current_platform.device_type != "cuda":
    sys.exit(f"gpu_check.sh: vLLM runs on its {current_platform.device_type!r} platform here, not CUDA: "
             "install its CUDA build with bash scripts/install.sh")
print(torch.cuda.get_device_name(0))
PY
); then
  echo "gpu_check.sh: nothing checked." >&2
  exit 1
fi
if [[ -z "$MODEL" ]]; then
  MODEL=$(python -c "from molink.demo_model import ensure_demo_model as m; print(m())")
fi
echo "gpu_check.sh: $DEVICE, model $MODEL in $DTYPE; results in $OUT/" >&2
# Two nodes and a plain vLLM share the GPU: each takes a third of its memory.
ENGINE="--dtype $DTYPE --max-model-len 1024 --gpu-memory-utilization 0.3"
FAILED=0
step() {  # step NAME COMMAND...: run it, keep its output, remember a failure
  local name="$1"; shift
  echo "== $name" >&2
  if "$@" > "$OUT/$name.log" 2>&1; then echo "   passed" >&2; else
    echo "   FAILED (exit $?): see $OUT/$name.log" >&2; FAILED=1; fi
}
identical() {  # identical DIR ROW: every request of ROW in DIR/wire_accuracy.json equals vLLM's
  python - "$1/wire_accuracy.json" "$2" <<'PY'
import json, sys
row = json.load(open(sys.argv[1]))["dtypes"][sys.argv[2]]
print(f"{sys.argv[2]}: {row['identical_requests']}/{row['requests']} identical")
sys.exit(row["identical_requests"] != row["requests"])
PY
}

# 2. The torch-level device path: pinned buffers, the copy stream, the platform's worker.
step device-path python -m pytest -q tests/test_activation_staging.py tests/test_platform_worker.py \
  tests/test_codec.py tests/test_memory_budget.py

# 3. Greedy equality with one vLLM process, stages eager (the default on CUDA), both eager.
step equality-eager python -m benchmark.wire_accuracy --model "$MODEL" $QUICK \
  --output-dir "$OUT/eager" --wire-dtypes "$DTYPE" --follower-dtypes bfloat16 \
  --engine-args="$ENGINE --enforce-eager"
step equality-eager-identical identical "$OUT/eager" "$DTYPE wire"

# 4. The same with CUDA graphs on every stage (MOLINK_CUDA_GRAPHS=1) and in vLLM.
step equality-graphs env MOLINK_CUDA_GRAPHS=1 python -m benchmark.wire_accuracy \
  --model "$MODEL" $QUICK --output-dir "$OUT/graphs" --wire-dtypes "$DTYPE" --follower-dtypes \
  --engine-args="$ENGINE"
step equality-graphs-identical identical "$OUT/graphs" "$DTYPE wire"

# 5. Throughput: vLLM vs 2 stages on this GPU, over loopback and a 20 ms link.
ROUNDS=3; [[ -n "$QUICK" ]] && ROUNDS=1
step throughput python -m benchmark.compare --model "$MODEL" --only vllm molink2 molink2_wan \
  --rounds "$ROUNDS" --heavy-requests 0 --wire-dtype "$DTYPE" --output-dir "$OUT/compare" \
  --engine-args="$ENGINE"

{
  echo "# gpu_check.sh on $DEVICE ($(date -u +%Y-%m-%d)), model $(basename "$MODEL") in $DTYPE"
  echo
  for f in "$OUT"/eager/wire_accuracy.md "$OUT"/graphs/wire_accuracy.md; do
    [[ -f "$f" ]] && { echo "## $(basename "$(dirname "$f")")"; tail -n +2 "$f"; echo; }
  done
  [[ -f "$OUT/compare/benchmark.md" ]] && { echo "## throughput"; cat "$OUT/compare/benchmark.md"; }
} > "$OUT/summary.md"
if [[ $FAILED != 0 ]]; then echo "gpu_check.sh: some checks FAILED ($OUT/summary.md)" >&2; exit 2; fi
echo "gpu_check.sh: all checks passed ($OUT/summary.md)" >&2
