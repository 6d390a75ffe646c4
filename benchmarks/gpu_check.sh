#!/usr/bin/env bash
# GPU check, one prepared script (budget: well inside 15 minutes; each step has its own timeout).
# NOT RUN YET: the machine this was written on has no GPU and none was lent to the task.
#   1. benchmarks 1-2 on the GPU, side by side in one process: plain loop fp32/bf16 vs the pipeline's step in
#      fp32, bf16, fp16, channels_last and torch.compile variants (benchmarks/gpu_check.py)
#   2. a 1-worker `gan-pipeline train --gpu` run (NCCL process group, cudnn.benchmark) printing images/s
# Usage: bash benchmarks/gpu_check.sh            (from the repository root; OUT=dir keeps the logs)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d)}"
PY="${PYTHON:-python}"
GP="$(dirname "$(command -v "$PY")")/gan-pipeline"
echo "== machine"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || exit 1
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'nccl', torch.cuda.nccl.version())"

echo "== 1-2: speed variants on the GPU (interleaved rounds)"
timeout 300 "$PY" benchmarks/gpu_check.py --steps 40 --rounds 3 2>&1 | tee "$OUT/speed.txt"

echo "== 3: gan-pipeline train --gpu, 1 worker (NCCL), 64 px dcgan, fp32 then bf16"
export MLFLOW_TRACKING_URI="sqlite:///$OUT/mlflow.db"
for prec in fp32 bf16; do
  timeout 150 "$GP" train --model dcgan --dataset mnist --resolution 64 --gpu --workers 1 --precision "$prec" \
      --max-steps 300 --log-every 50 --checkpoint-every 300 --sample-every 300 --runs-dir "$OUT/runs" \
      --run-name "gpu-$prec" 2>&1 | tee "$OUT/train-$prec.txt" | grep -E "img/s|error|Error|NCCL" | tail -8
  grep -q "img/s" "$OUT/train-$prec.txt" && echo "train --gpu $prec: OK" || echo "train --gpu $prec: FAILED (see $OUT/train-$prec.txt)"
done
echo "logs in $OUT"
