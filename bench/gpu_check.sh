#!/usr/bin/env bash
# GPU check for `maskpack train`: a few hundred CUDA steps of a mask and of full fine-tuning.
#
# Prints, for each method: end-to-end training images/s through the real data pipeline
# (digits upsampled to SIZE px, DataLoader workers, pinned memory, bf16 autocast, channels_last),
# the pure step time on a resident synthetic batch, and the masked/fft step-time ratio.
#
# Usage (from the repository root):
#   bash bench/gpu_check.sh                    # CUDA, 128 px, batch 64, ~300 steps each
#   DEVICE=cpu STEPS=6 SIZE=32 bash bench/gpu_check.sh   # smoke test of the script on a CPU
# Env: DEVICE (cuda), SIZE (128), BATCH (64), STEPS (300), WORKERS (8), PY (.venv/bin/python or python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
DEVICE=${DEVICE:-cuda} SIZE=${SIZE:-128} BATCH=${BATCH:-64} STEPS=${STEPS:-300} WORKERS=${WORKERS:-8} \
"$PY" - <<'EOF'
import json, math, os, time

import torch

from maskpack.train import TrainConfig, run

dev, size, bs = os.environ["DEVICE"], int(os.environ["SIZE"]), int(os.environ["BATCH"])
steps, workers = int(os.environ["STEPS"]), int(os.environ["WORKERS"])
if dev == "cuda" and not torch.cuda.is_available():
    raise SystemExit("no CUDA GPU visible: run with DEVICE=cpu for a smoke test")
if dev == "cuda":
    print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__)
per_epoch = min(1400 // bs, steps)
epochs = max(2, math.ceil(steps / per_epoch))


def loop(method):
    """End-to-end: real loader + training loop, no evaluation; images/s after the first epoch."""
    cfg = TrainConfig(dataset="digits", image_size=size, batch_size=bs, epochs=epochs, method=method,
                      device=dev, num_workers=workers, quiet=True, eval_every=0, eval_knn="never",
                      bn_reestimate=False, save_task=False, seed=0, max_steps_per_epoch=per_epoch)
    t = time.perf_counter()
    r = run(cfg)
    wall = time.perf_counter() - t
    ips = [h["images_per_s"] for h in r.history[1:]] or [r.history[0]["images_per_s"]]
    return sum(ips) / len(ips), r.history[-1]["step"], wall


def pure_step(method, n):
    """Step time on a resident batch (no data loading): the compute cost of one method."""
    from maskpack import load_backbone, masking
    from maskpack.evaluate import autocast
    from maskpack.objectives import SupervisedObjective

    d = torch.device(dev)
    net = load_backbone().copy_model()
    if method == "mask":
        masking.apply_masks_(net)
    else:
        net.requires_grad_(True)
    obj = SupervisedObjective(1280, 10)
    net.to(d).train(); obj.to(d)
    cl = torch.channels_last if dev == "cuda" else torch.contiguous_format
    net.to(memory_format=cl)
    params = [p for p in list(net.parameters()) + list(obj.parameters()) if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    x = torch.randn(bs, 3, size, size, device=d).contiguous(memory_format=cl)
    y = torch.randint(0, 10, (bs,), device=d)
    def step():
        with autocast(d):
            loss, _ = obj.loss(net, (x, y), 0)
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
    for _ in range(min(10, n)):
        step()
    if dev == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        step()
    if dev == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / n


out = {"device": dev, "size": size, "batch": bs, "workers": workers}
for m in ("mask", "fft"):
    ips, n, wall = loop(m)
    out[f"{m}_loop_images_per_s"] = round(ips, 1)
    out[f"{m}_loop_steps"] = n
    out[f"{m}_step_ms"] = round(1000 * pure_step(m, steps), 2)
    out[f"{m}_pure_images_per_s"] = round(bs / (out[f"{m}_step_ms"] / 1000), 1)
    print(f"{m:4s}: loop {ips:8.1f} img/s over {n} steps ({wall:.0f} s) | "
          f"pure step {out[f'{m}_step_ms']:.2f} ms = {out[f'{m}_pure_images_per_s']:.0f} img/s")
out["mask_over_fft_step"] = round(out["mask_step_ms"] / out["fft_step_ms"], 3)
out["loop_over_pure_mask"] = round(out["mask_loop_images_per_s"] / out["mask_pure_images_per_s"], 3)
print(f"masked/fft step time ratio: {out['mask_over_fft_step']:.3f}; data pipeline keeps "
      f"{100 * out['loop_over_pure_mask']:.0f}% of the pure mask step rate")
print(json.dumps(out))
EOF
