#!/usr/bin/env bash
# Recipe study: reproduce the key runs of docs/recipe-study.md, one at a time.
# Usage: bench/recipe_study.sh NAME [NAME ...]    (names below; run dirs go to runs/rs-NAME)
# Screening budget "S": 4 epochs x 20 steps of 64 images (80 steps, ~1 pass over cifar10-5k),
# evaluation only at the end, BN re-estimated on 16 clean batches.
set -euo pipefail
cd "$(dirname "$0")/.."
D=imagefolder:${DATA:-data/cifar10-5k}
MP=.venv/bin/maskpack
# masks on every layer with every BN in train mode unless a run says otherwise (what every run
# recorded in docs/recipe-study.md; the defaults have changed since)
COMMON=(--dataset "$D" --image-size 32 --threads 2 --quiet --json --knn never
        --set eval_every=0 --set bn_reestimate_batches=16 --mask-layers all --bn-mode train)
S=(--epochs 4 --set max_steps_per_epoch=20)
# "S2": 2 epochs x 20 steps (40 steps, 2,560 images): a quick look on a small CPU
S2=(--epochs 2 --set max_steps_per_epoch=20)
declare -A R
R[fft-S]="--method fft ${S[*]}"
R[mask-S]="--method mask --lr 50 --warmup 1 --head-lr 0.01 ${S[*]}"
R[bnaff-S]="--method mask --lr 50 --warmup 1 --head-lr 0.01 --set train_bn_affine=true --set bn_lr=0.01 ${S[*]}"
R[bnaff-hl1-S]="--method mask --lr 50 --warmup 1 --head-lr 0.1 --set train_bn_affine=true --set bn_lr=0.1 ${S[*]}"
R[headfirst-S]="--method mask --lr 50 --warmup 2 --head-lr 0.1 --set head_only_epochs=1 ${S[*]}"
R[fft-S2]="--method fft ${S2[*]}"
R[mask-S2]="--method mask --lr 50 --warmup 1 --head-lr 0.01 ${S2[*]}"
R[bnaff-S2]="--method mask --lr 50 --warmup 1 --head-lr 0.01 --set train_bn_affine=true --set bn_lr=0.01 ${S2[*]}"
R[norm-S2]="--method mask --lr 0.01 --warmup 1 --head-lr 0.01 --set score_grad_norm=true ${S2[*]}"
R[normbn-S2]="--method mask --lr 0.01 --warmup 1 --head-lr 0.01 --set score_grad_norm=true --set train_bn_affine=true --set bn_lr=0.01 ${S2[*]}"
# The study's budget: 8 full epochs (624 steps; ~7 min each on a quiet 2-core machine)
E8=(--epochs 8)
R[fft-8]="--method fft ${E8[*]}"
R[mask-8]="--method mask ${E8[*]}"
R[bnaff-8]="--method mask --set train_bn_affine=true --set bn_lr=0.01 ${E8[*]}"
R[norm002bn-8]="--method mask --recipe normalized --lr 0.002 --set train_bn_affine=true --set bn_lr=0.01 ${E8[*]}"
R[fft-8-nore]="--method fft --no-bn-reestimate ${E8[*]}"
# Normalised score lr sweep at 8 epochs (recipe `normalized` = lr 0.002 + BN affine)
R[norm001bn-8]="--method mask --recipe normalized --lr 0.001 ${E8[*]}"
R[norm005bn-8]="--method mask --recipe normalized --lr 0.005 ${E8[*]}"
# Variations of the default (normalised lr 0.002 + BN affine) at 8 epochs (EXTRA="--threads 1" to
# run beside another job)
R[def-hl03-8]="--method mask --head-lr 0.03 --set bn_lr=0.01 ${E8[*]} ${EXTRA:-}"
R[def-wu2-8]="--method mask --warmup 2 ${E8[*]} ${EXTRA:-}"
R[def-detach-8]="--method mask --detach-alpha ${E8[*]} ${EXTRA:-}"
R[def-nostem-8]="--method mask --mask-layers no-stem ${E8[*]} ${EXTRA:-}"
R[def-nobnaff-8]="--method mask --set train_bn_affine=false ${E8[*]} ${EXTRA:-}"
# A second seed (EXTRA="--threads 1" to run both at once)
R[fft-8-s1]="--method fft --seed 1 ${E8[*]} ${EXTRA:-}"
R[default-8-s1]="--method mask --seed 1 ${E8[*]} ${EXTRA:-}"
# SwAV self-masks: BN kept in eval mode with the backbone's ImageNet statistics (re-estimating
# them on clean 32 px images costs the frozen backbone 3-4 k-NN points: bench/knn_bn.py)
SW=(--objective swav --method mask --knn end --bn-mode frozen --no-bn-reestimate
    --set swav_crops=[2,4] --set swav_global_scale=[0.3,1.0] --set swav_prototypes=100)
R[swav-norm-8]="${SW[*]} --recipe normalized --lr 0.002 --head-lr 0.1 --set bn_lr=0.01 ${E8[*]}"
R[swav-ho-8]="${SW[*]} --recipe normalized --lr 0.001 --head-lr 0.1 --set train_bn_affine=false --set head_only_epochs=2 --knn epoch --threads 1 ${E8[*]}"
# BN in train mode (batch statistics as in normal SwAV, re-estimated on clean images before the
# k-NN), conv head never masked, 2+2 crops
R[swav-bntrain-8]="--objective swav --method mask --knn end --set swav_crops=[2,2] --set swav_global_scale=[0.3,1.0] --set swav_prototypes=100 --recipe normalized --lr 0.001 --head-lr 0.1 --set train_bn_affine=false --set head_only_epochs=1 --mask-layers re:_blocks ${E8[*]}"
# SwAV that learns (GPU study, bench/gpu_study.sh LIST=2): milder augmentation, 2 global crops,
# linear projection at lr 1, 2 head-only epochs, BN in train mode (re-estimated before the k-NN)
SW2=(--objective swav --method mask --knn epoch --recipe normalized --head-lr 1.0 --set swav_prototypes=100
     --set swav_crops=[2,0] --set swav_global_scale=[0.5,1.0] --set swav_jitter=0.4 --set swav_blur=false
     --set head_only_epochs=2 --set train_bn_affine=false)
R[sw2-tr-8]="${SW2[*]} --lr 0.001 ${E8[*]} ${EXTRA:-}"
R[sw2-tr-8-lr2e-3]="${SW2[*]} --lr 0.002 ${E8[*]} ${EXTRA:-}"
R[sw2-tr-16]="${SW2[*]} --lr 0.001 --epochs 16 ${EXTRA:-}"
# crop + flip only (no colour jitter): the views a frozen head can match best (bench/swav_head.py)
R[sw2-tr-8-nojit]="${SW2[*]} --lr 0.001 --set swav_jitter=0 --set eval_every=1 ${E8[*]} ${EXTRA:-}"
# BN weight/bias trained too (with BN in train mode)
R[sw2-tr-8-bna]="${SW2[*]} --lr 0.001 --set train_bn_affine=true --set bn_lr=0.01 ${E8[*]} ${EXTRA:-}"
R[sw2-tr-8-bna-s1]="${SW2[*]} --lr 0.001 --set train_bn_affine=true --set bn_lr=0.01 --seed 1 ${E8[*]} ${EXTRA:-}"
R[sw2-tr-16-bna]="${SW2[*]} --lr 0.001 --set train_bn_affine=true --set bn_lr=0.01 --epochs 16 ${EXTRA:-}"
# Full fine-tuning with the same SwAV objective and views: is the ceiling the masks' or the
# objective's? (fft lr 0.01 is the supervised default; 0.001 the paper's ResNet-18 fft lr)
R[sw2-fft-8]="${SW2[*]} --method fft --lr 0.01 --head-lr 1.0 ${E8[*]} ${EXTRA:-}"
R[sw2-fft-8-lr1e-3]="${SW2[*]} --method fft --lr 0.001 --head-lr 1.0 ${E8[*]} ${EXTRA:-}"
# --bn-mode head: only the conv head's BN adapts (batch statistics, re-estimated before the k-NN);
# the other 48 BN layers keep the ImageNet statistics (bench/bn_policy.py: frozen k-NN 0.494)
R[sw2-head-8]="${SW2[*]} --lr 0.001 --bn-mode head ${E8[*]} ${EXTRA:-}"
# the same, masking only the conv head (the layer whose BN adapts): masks cannot shift any layer
# whose statistics stay frozen
R[sw2-head-ch-8]="${SW2[*]} --lr 0.001 --bn-mode head --mask-layers re:^_conv_head ${E8[*]} ${EXTRA:-}"
R[sw2-head-ch-8-s1]="${SW2[*]} --lr 0.001 --bn-mode head --mask-layers re:^_conv_head --seed 1 ${E8[*]} ${EXTRA:-}"
R[sw2-head-ch-8-lr5e-3]="${SW2[*]} --lr 0.005 --bn-mode head --mask-layers re:^_conv_head ${E8[*]} ${EXTRA:-}"
R[sw2-head-ch-8-lr2e-2]="${SW2[*]} --lr 0.02 --bn-mode head --mask-layers re:^_conv_head ${E8[*]} ${EXTRA:-}"
R[sw2-head-ch-8-lr5e-2]="${SW2[*]} --lr 0.05 --bn-mode head --mask-layers re:^_conv_head ${E8[*]} ${EXTRA:-}"
# more layers masked, each with its own BN adapting (--bn-mode masked), the rest frozen
R[sw2-masked-b15-8-lr2e-2]="${SW2[*]} --lr 0.02 --bn-mode masked --mask-layers re:^(_blocks\\.15\\.|_conv_head) ${E8[*]} ${EXTRA:-}"
R[sw2-masked-b12-8-lr2e-2]="${SW2[*]} --lr 0.02 --bn-mode masked --mask-layers re:^(_blocks\\.1[2-5]\\.|_conv_head) ${E8[*]} ${EXTRA:-}"
R[sw2-head-ch-8-lr2e-2-s1]="${SW2[*]} --lr 0.02 --bn-mode head --mask-layers re:^_conv_head --seed 1 ${E8[*]} ${EXTRA:-}"
R[sw2-masked-b8-8-lr2e-2]="${SW2[*]} --lr 0.02 --bn-mode masked --mask-layers re:^(_blocks\\.(8|9|1[0-5])\\.|_conv_head) ${E8[*]} ${EXTRA:-}"
R[sw2-masked-last13-8-s1]="${SW2[*]} --lr 0.02 --bn-mode masked --mask-layers last:13 --seed 1 ${E8[*]} ${EXTRA:-}"
# supervised with the SwAV default's layer choice: masks on the last 13 tensors, their BN adapting
R[sup-last13-8]="--method mask --bn-mode masked --mask-layers last:13 ${E8[*]} ${EXTRA:-}"
R[sup-last13-8-s1]="--method mask --bn-mode masked --mask-layers last:13 --seed 1 ${E8[*]} ${EXTRA:-}"
R[sup-last25-8]="--method mask --bn-mode masked --mask-layers last:25 ${E8[*]} ${EXTRA:-}"
R[sup-last25-8-s1]="--method mask --bn-mode masked --mask-layers last:25 --seed 1 ${E8[*]} ${EXTRA:-}"
# fft with the same BN idea (every weight trains, only the conv head's BN statistics adapt)
R[fft-8-bnhead]="--method fft --bn-mode head ${E8[*]} ${EXTRA:-}"
R[fft-8-s2]="--method fft --seed 2 ${E8[*]} ${EXTRA:-}"
R[sup-last25-8-s2]="--method mask --bn-mode masked --mask-layers last:25 --seed 2 ${E8[*]} ${EXTRA:-}"
R[swav-smoke]="${SW[*]} --recipe normalized --lr 0.002 --head-lr 0.1 --set bn_lr=0.01 --epochs 1 --set max_steps_per_epoch=6"
R[head-S2]="--method mask --lr 50 --warmup 1 --head-lr 0.01 --set head_only_epochs=2 ${S2[*]}"
for name in "$@"; do
  args=${R[$name]:?unknown run $name}
  out=runs/rs-$name
  t0=$(date +%s)
  # shellcheck disable=SC2086
  $MP train "${COMMON[@]}" $args --out "$out" > "$out.json" 2> "$out.err" || echo "FAILED $name" >&2
  echo "$name seconds=$(( $(date +%s) - t0 )) $(tail -c 400 "$out.json" | tr -d '\n')"
done
