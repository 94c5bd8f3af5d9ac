#!/usr/bin/env bash
# GPU check of masked training (about 3-4 minutes on one H100/H200), in three parts:
#   1. correctness on the device (bench/masked_step_check.py): masked weights bit-identical to
#      masking.masked_weight on both paths, fused vs per-layer gradients, bf16 autocast, no host
#      synchronisation in a masked forward + backward, eval outputs equal a rehydrated model;
#   2. pure step times, masked vs fft, with and without masking.compile_masks_, at Lite0 128 px,
#      Lite0 224 px and ResNet-50 224 px (random weights), batch 64, bf16 autocast, channels_last
#      (bench/train_step.py; images/s per method and the masked/fft ratios);
#   3. `maskpack train` on digits for a few real CUDA steps per method: end-to-end images/s of
#      mask vs fft through the real data pipeline (and of mask with --compile once the trainer
#      has that flag).
#
# Usage (from the repository root):
#   bash bench/gpu_check.sh 2>&1 | tee gpu-check.log
#   DEVICE=cpu bash bench/gpu_check.sh     # smoke test of the script itself on a CPU (tiny sizes)
# Env: DEVICE (cuda), SIZE (128: end-to-end image size), STEPS (20: end-to-end steps per epoch),
#      WORKERS (8), PY (.venv/bin/python or python), OUT (a temporary run directory)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-$(mktemp -d)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ "$DEVICE" = cpu ]; then   # smoke sizes: checks that every part runs, measures nothing
  SIZE=${SIZE:-32} STEPS=${STEPS:-2} WORKERS=${WORKERS:-0}
  CHECK=(--size 32 --batch 4); BENCH=(--configs lite0:32,resnet50:32 --batch 2 --steps 1 --warmup 0)
else
  SIZE=${SIZE:-128} STEPS=${STEPS:-20} WORKERS=${WORKERS:-8}
  CHECK=(); BENCH=(--steps 15 --inner 5 --warmup 5)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
"$PY" -c "import torch; print('torch', torch.__version__, '| cuda available', torch.cuda.is_available())"

echo "== 1. correctness on $DEVICE"
status=0
timeout 300 "$PY" bench/masked_step_check.py --device "$DEVICE" "${CHECK[@]}" || status=1

echo "== 2. pure step: masked vs fft (medians of interleaved repeats)"
timeout 400 "$PY" bench/train_step.py --device "$DEVICE" --compile --json "${BENCH[@]}" || status=1

echo "== 3. end-to-end maskpack train on digits, ${SIZE} px, 2 epochs x ${STEPS} steps"
methods=(mask fft)
if "$PY" -m maskpack train --help | grep -q -- "--compile"; then methods+=(mask-compiled); fi
for m in "${methods[@]}"; do
  extra=(--method "${m%-compiled}")
  [ "$m" = mask-compiled ] && extra+=(--compile)
  timeout 300 "$PY" -m maskpack train --dataset digits --image-size "$SIZE" --epochs 2 \
    --max-steps "$STEPS" --device "$DEVICE" --workers "$WORKERS" --knn never --no-bn-reestimate \
    --quiet --json --out "$OUT/$m" "${extra[@]}" > "$OUT/$m.json" || { status=1; echo "$m: FAILED"; }
done
"$PY" - "$OUT" "${methods[@]}" <<'EOF'
import json, sys
from pathlib import Path

out, methods = Path(sys.argv[1]), sys.argv[2:]
ips = {}
for m in methods:
    path = out / m / "metrics.jsonl"
    if not path.exists():
        print(f"{m:14s} no metrics (the run failed)")
        continue
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    ips[m] = rows[-1]["images_per_s"]  # the last epoch: after cuDNN and allocator warm-up
    print(f"{m:14s} {ips[m]:9.1f} images/s (epoch {len(rows)}), loss {rows[-1]['loss']:.4f}")
if "mask" in ips and "fft" in ips:
    print(f"end-to-end fft/mask images/s: {ips['fft'] / ips['mask']:.3f}")
if "mask-compiled" not in methods:
    print("mask-compiled: not run (maskpack train has no --compile flag yet)")
EOF
echo "gpu_check: $([ $status = 0 ] && echo 'all parts ran' || echo 'SOME PART FAILED')"
exit $status
