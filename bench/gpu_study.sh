#!/usr/bin/env bash
# Recipe study on one GPU: many short `maskpack train` runs side by side on one card.
#
# Usage (repository root; the data set as an ImageFolder under DATA):
#   bash bench/gpu_study.sh smoke          # CUDA sanity: bench/gpu_check.sh + a few steps of each path
#   bash bench/gpu_study.sh sweep          # the first list, PAR runs at a time
#   LIST=2 bash bench/gpu_study.sh sweep   # the second list (milder SwAV views; supervised seeds, 64 px, Lite2)
#   DEVICE=cpu PAR=2 ONLY='def-s0' EXTRA='--epochs 1' bash bench/gpu_study.sh sweep   # dry run on a CPU
# Env: DATA (data/cifar10-5k), OUTDIR (runs/gpu-study), RESULTS ($OUTDIR/results.jsonl),
#   PAR (5), DEADLINE (400: no job starts after it), JOB_TIMEOUT (420), HARD (0: none; else every
#   job is stopped HARD seconds after the sweep starts, its epochs so far kept), PY (python3 or
#   .venv/bin/python), ONLY (regex on job names), EXTRA (options appended to every job), LIST.
# Each finished job appends one line to $RESULTS (name, seconds, rc, every epoch's metrics row,
# final result). The lists as run on an H200 and their results: docs/results/gpu-study-{1,2}.jsonl.
set -uo pipefail
set -f  # job arguments hold brackets ([2,4]): no globbing
cd "$(dirname "$0")/.."
MODE=${1:-sweep}
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
DATA=${DATA:-data/cifar10-5k}
OUTDIR=${OUTDIR:-runs/gpu-study}
PAR=${PAR:-5}
DEVICE=${DEVICE:-cuda}
DEADLINE=${DEADLINE:-400}
JOB_TIMEOUT=${JOB_TIMEOUT:-420}
RESULTS=${RESULTS:-$OUTDIR/results.jsonl}
HARD=${HARD:-0}
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1

# every conv masked, every BN in train mode unless a job says otherwise (the `normalized` recipe's
# layer choice, which these lists recorded)
D="--dataset imagefolder:$DATA --image-size 32 --device $DEVICE --workers 2 --threads 1 --quiet --json --mask-layers all --bn-mode train"
# SwAV self-masks: 100 prototypes, global crops scale (0.3, 1), k-NN after every epoch
SW="$D --objective swav --method mask --knn epoch --recipe normalized --head-lr 0.1 --set swav_prototypes=100 --set swav_global_scale=[0.3,1.0] --set bn_reestimate_batches=16 --epochs 8"
FZ="--bn-mode frozen --no-bn-reestimate"        # BN in eval mode with the ImageNet statistics
MLP="--set swav_hidden=2048"
BNA="--set train_bn_affine=true --set bn_lr=0.01"
NOBNA="--set train_bn_affine=false"
SUP="$D --knn never --set eval_every=0 --set bn_reestimate_batches=16 --epochs 8"

jobs() {  # NAME|ARGS, in priority order; LIST=2 is the second list
  if [ "${LIST:-1}" = 2 ]; then jobs2; return; fi
  cat <<EOF
sw-ctrl|$SW $FZ $NOBNA --epochs 1 --set max_steps_per_epoch=1 --set head_only_epochs=1
sw-fz-mlp|$SW $FZ $MLP $NOBNA --lr 0.001 --set head_only_epochs=1 --set swav_crops=[2,4]
sw-fz-mlp-bna|$SW $FZ $MLP $BNA --lr 0.001 --set head_only_epochs=1 --set swav_crops=[2,4]
sw-bna-only|$SW $FZ $MLP $BNA --lr 0.001 --set head_only_epochs=8 --set swav_crops=[2,4]
sw-tr-mlp|$SW $MLP $NOBNA --lr 0.001 --set head_only_epochs=1 --set swav_crops=[2,4]
sw-fz-mlp-bna-20ep|$SW $FZ $MLP $BNA --lr 0.001 --set head_only_epochs=1 --set swav_crops=[2,4] --epochs 20
sw-fz-mlp-lr3e-4|$SW $FZ $MLP $NOBNA --lr 0.0003 --set head_only_epochs=1 --set swav_crops=[2,4]
sw-fz-mlp-bna-lr3e-4|$SW $FZ $MLP $BNA --lr 0.0003 --set head_only_epochs=1 --set swav_crops=[2,4]
sw-tr-mlp-bna|$SW $MLP $BNA --lr 0.001 --set head_only_epochs=1 --set swav_crops=[2,4]
sw-fz-lin-bna|$SW $FZ $BNA --lr 0.001 --set head_only_epochs=1 --set swav_crops=[2,4]
sw-fz-mlp-bna-blr0.1|$SW $FZ $MLP --set train_bn_affine=true --set bn_lr=0.1 --lr 0.001 --set head_only_epochs=1 --set swav_crops=[2,4]
fft-s0|$SUP --method fft --seed 0
def-s0|$SUP --method mask --seed 0
fft-s1|$SUP --method fft --seed 1
def-s1|$SUP --method mask --seed 1
fft-s2|$SUP --method fft --seed 2
def-s2|$SUP --method mask --seed 2
sw-fz-mlp-bna-b256|$SW $FZ $MLP $BNA --lr 0.001 --set head_only_epochs=1 --set swav_crops=[2,4] --batch-size 256
fft-64|$SUP --method fft --image-size 64
def-64|$SUP --method mask --image-size 64
fft-l2|$SUP --method fft --backbone efficientnet_lite2
def-l2|$SUP --method mask --backbone efficientnet_lite2
sw-fz-mlp-lr1e-4|$SW $FZ $MLP $NOBNA --lr 0.0001 --set head_only_epochs=1 --set swav_crops=[2,4]
fft-s3|$SUP --method fft --seed 3
def-s3|$SUP --method mask --seed 3
fft-16ep|$SUP --method fft --epochs 16
def-16ep|$SUP --method mask --epochs 16
sw-fz-mlp-c26|$SW $FZ $MLP $NOBNA --lr 0.001 --set head_only_epochs=1 --set swav_crops=[2,6]
fft-s4|$SUP --method fft --seed 4
def-s4|$SUP --method mask --seed 4
EOF
}

# Second list: SwAV with milder augmentation (bench/swav_head.py: with the trainer's strong
# augmentation the two views of one image are hardly closer than two images, and a head on the
# frozen features cannot get below ln K), a linear projection at lr 1, 2 global crops only,
# 2 head-only epochs; then the supervised runs the first list did not reach.
MILD="--set swav_global_scale=[0.5,1.0] --set swav_jitter=0.4 --set swav_blur=false"
SW2="$SW $MILD --head-lr 1.0 --set swav_crops=[2,0] --set head_only_epochs=2"
jobs2() {
  cat <<EOF
sw2-fz-lin|$SW2 $FZ $NOBNA --lr 0.001
sw2-tr-lin|$SW2 $NOBNA --lr 0.001
sw2-fz-lin-bna|$SW2 $FZ $BNA --lr 0.001
sw2-fz-lin-lr3e-4|$SW2 $FZ $NOBNA --lr 0.0003
sw2-fz-lin-nojit|$SW2 $FZ $NOBNA --lr 0.001 --set swav_jitter=0
fft-s0|$SUP --method fft --seed 0
def-s0|$SUP --method mask --seed 0
fft-64|$SUP --method fft --image-size 64
def-64|$SUP --method mask --image-size 64
fft-l2|$SUP --method fft --backbone efficientnet_lite2
def-l2|$SUP --method mask --backbone efficientnet_lite2
fft-s1|$SUP --method fft --seed 1
def-s1|$SUP --method mask --seed 1
fft-s2|$SUP --method fft --seed 2
def-s2|$SUP --method mask --seed 2
fft-16ep|$SUP --method fft --epochs 16
def-16ep|$SUP --method mask --epochs 16
EOF
}

one() {  # NAME ARGS...: one run, then its summary line
  local name=$1; shift
  local out="$OUTDIR/$name" t0 rc
  if (( $(date +%s) - START > DEADLINE )); then echo "skip $name (deadline)"; return 0; fi
  rm -rf "$out"
  t0=$(date +%s)
  local limit=$JOB_TIMEOUT
  if (( HARD > 0 )); then  # every job ends by START + HARD (the caller's own time limit)
    limit=$(( START + HARD - t0 )); (( limit > JOB_TIMEOUT )) && limit=$JOB_TIMEOUT
    (( limit < 5 )) && { echo "skip $name (hard end)"; return 0; }
  fi
  # shellcheck disable=SC2068
  timeout --signal=INT "$limit" "$PY" -m maskpack train $@ ${EXTRA:-} --out "$out" \
    > "$out.json" 2> "$out.err"
  rc=$?
  NAME=$name SECS=$(( $(date +%s) - t0 )) RC=$rc RUN=$out "$PY" - >> "$RESULTS" <<'EOF'
import json, os
run = os.environ["RUN"]
row = {"name": os.environ["NAME"], "seconds": int(os.environ["SECS"]), "rc": int(os.environ["RC"])}
try:
    lines = open(os.path.join(run, "metrics.jsonl")).read().splitlines()
    row["epochs"] = [json.loads(x) for x in lines]
except OSError:
    row["epochs"] = []
try:
    row["result"] = json.loads(open(run + ".json").read())
except (OSError, ValueError):
    row["result"] = None
    row["stderr_tail"] = open(run + ".err").read()[-1500:]
print(json.dumps(row))
EOF
  echo "done $name rc=$rc $(( $(date +%s) - t0 )) s"
}
export -f one
export PY OUTDIR DEADLINE JOB_TIMEOUT RESULTS HARD LIST

case "$MODE" in
  smoke)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
    "$PY" -c "import torch, maskpack; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
    SIZE=${SIZE:-128} PY=$PY timeout 330 bash bench/gpu_check.sh   # about 3-4 min
    export START=$(date +%s)
    S=${SMOKE_STEPS:-4}
    one smoke-swav $SW $FZ $MLP $BNA --lr 0.001 --set swav_crops=[2,4] --epochs 1 --set max_steps_per_epoch=$S
    one smoke-swav-tr $SW $MLP --lr 0.001 --set swav_crops=[2,4] --epochs 1 --set max_steps_per_epoch=$S
    one smoke-def $SUP --method mask --epochs 1 --set max_steps_per_epoch=$S
    one smoke-l2 $SUP --method mask --backbone efficientnet_lite2 --epochs 1 --set max_steps_per_epoch=$S
    tail -c 600 "$OUTDIR"/smoke-*.err
    ;;
  sweep)
    export START=$(date +%s)
    jobs | grep -E "^(${ONLY:-.*})\|" | tr '\n' '\0' | \
      xargs -0 -P "$PAR" -I{} bash -c 'set -f; l="$1"; one "${l%%|*}" ${l#*|}' _ {}
    ;;
  *) echo "usage: $0 smoke|sweep" >&2; exit 2 ;;
esac
