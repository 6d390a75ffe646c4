#!/usr/bin/env bash
# GPU check, one prepared script (budget: well inside 15 minutes; each step has its own timeout).
#   1. benchmarks 1-2 on the GPU, side by side in one process: plain loop fp32/bf16 vs the pipeline's step in
#      fp32, bf16, fp16, channels_last and torch.compile variants (benchmarks/gpu_check.py), at batch 64 and 512
#   2. a 1-worker `gan-pipeline train --gpu` run (Ray Train, NCCL process group, cudnn.benchmark), fp32 and bf16
# Usage: bash benchmarks/gpu_check.sh   (from the repository root; OUT=dir keeps the logs; SKIP_SPEED=1: only 2.)
# Where the image lacks Ray/MLflow (the lent GPU machines here), .gpusite/site.tar.xz (a tarball of the missing
# packages for its Python, plus any other .gpusite/*.tar.xz) is unpacked onto PYTHONPATH first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d)}"
PY="${PYTHON:-python3}"
for bundle in .gpusite/*.tar.xz; do
  [ -f "$bundle" ] && mkdir -p /tmp/gpusite && tar -C /tmp/gpusite -xJf "$bundle" && export PYTHONPATH="/tmp/gpusite:$PWD"
done
export PYTHONUNBUFFERED=1
echo "== machine"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || exit 1
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'nccl', torch.cuda.nccl.version())"

if [ -z "${SKIP_SPEED:-}" ]; then
  echo "== 1: speed variants on the GPU (interleaved rounds), 64 px, batch 64"
  timeout 200 "$PY" benchmarks/gpu_check.py --steps 30 --rounds 3 2>&1 | tee "$OUT/speed-b64.txt"
  echo "== 1: batch 512 (batch 64 leaves most of the GPU idle)"
  timeout 70 "$PY" benchmarks/gpu_check.py --steps 20 --rounds 3 --batch-size 512 \
      --variants plain-fp32,plain-bf16,pipe-fp32,pipe-bf16,pipe-bf16-cl,pipe-fp16 2>&1 | tee "$OUT/speed-b512.txt"
fi
echo "== 2: gan-pipeline train --gpu, 1 worker (NCCL), 64 px dcgan, fp32 then bf16"
export MLFLOW_TRACKING_URI="sqlite:///$OUT/mlflow.db" NCCL_DEBUG=INFO
for prec in fp32 bf16; do
  timeout 150 "$PY" -m pipelines train --model dcgan --dataset mnist --resolution 64 --gpu --workers 1 \
      --precision "$prec" --max-steps 400 --log-every 50 --checkpoint-every 200 --sample-every 400 \
      --runs-dir "$OUT/runs" --run-name "gpu-$prec" > "$OUT/train-$prec.txt" 2>&1
  echo "exit $?"; grep -E "img/s|Error|error:" "$OUT/train-$prec.txt" | tail -6
  grep -m2 -E "NCCL INFO (Init|comm|cudaDriverVersion|Bootstrap)|NCCL version" "$OUT/train-$prec.txt"
  grep -q "img/s" "$OUT/train-$prec.txt" && echo "train --gpu $prec: OK" || { echo "train --gpu $prec: FAILED"; tail -30 "$OUT/train-$prec.txt"; }
done
rm -rf "$OUT/runs" "$OUT/mlflow.db"
echo "logs in $OUT"
