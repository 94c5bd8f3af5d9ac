"""Masked vs full fine-tuning training step on the same batch: time and peak memory.

Usage:
    .venv/bin/python bench/train_step.py [--size 64] [--batch 64] [--steps 20] [--threads 2]

Both variants run interleaved in one process (these machines are noisy: only the ratio is
meaningful); peak memory is measured in a child process per variant (ru_maxrss on CPU,
max_memory_allocated on CUDA). The last line is ``ratio <masked time / fine-tuning time>``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

from maskpack import load_backbone, masking
from maskpack.model import TaskModel


def build(variant: str, device: str):
    bb = load_backbone()
    net = bb.copy_model()
    if variant == "mask":
        masking.apply_masks_(net)
        model = TaskModel(net, nn.Linear(bb.feature_dim, 10)).to(device)
        groups = [{"params": masking.score_parameters(net), "lr": 50.0, "weight_decay": 0.0},
                  {"params": model.head.parameters(), "lr": 0.01}]
    else:
        for p in net.parameters():
            p.requires_grad_(True)
        model = TaskModel(net, nn.Linear(bb.feature_dim, 10)).to(device)
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": 0.01,
                   "weight_decay": 5e-4}]
    opt = torch.optim.SGD(groups, momentum=0.9)
    return model.train(), opt


def step(model, opt, x, y):
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def peak_memory_child(variant: str, args) -> float:
    """Run a few steps of one variant in a fresh process; return its peak memory in MiB."""
    cmd = [sys.executable, __file__, "--child", variant, "--size", str(args.size), "--batch",
           str(args.batch), "--threads", str(args.threads), "--device", args.device]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def child(args) -> None:
    model, opt = build(args.child, args.device)
    x = torch.randn(args.batch, 3, args.size, args.size, device=args.device)
    y = torch.randint(0, 10, (args.batch,), device=args.device)
    base = _rss_mib()
    for _ in range(3):
        step(model, opt, x, y)
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:  # growth of the process's high-water mark over the loaded model: the step's own memory
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    print(json.dumps({"peak_mib": peak}))


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.child:
        return child(args)
    x = torch.randn(args.batch, 3, args.size, args.size, device=args.device)
    y = torch.randint(0, 10, (args.batch,), device=args.device)
    runs = {v: build(v, args.device) for v in ("mask", "fft")}
    times: dict[str, list[float]] = {"mask": [], "fft": []}
    for v in runs:  # warm-up
        for _ in range(2):
            step(*runs[v], x, y)
    for _ in range(args.steps):
        for v in ("mask", "fft"):  # interleaved so drift hits both alike
            sync(args.device)
            t0 = time.perf_counter()
            step(*runs[v], x, y)
            sync(args.device)
            times[v].append(time.perf_counter() - t0)
    med = {v: statistics.median(t) for v, t in times.items()}
    mem = {v: peak_memory_child(v, args) for v in ("mask", "fft")}
    print(f"Lite0, {args.size}px, batch {args.batch}, {args.threads} threads, device {args.device}, "
          f"{args.steps} interleaved steps each")
    for v in ("mask", "fft"):
        print(f"{v:5s} step median {med[v] * 1000:8.1f} ms   step memory {mem[v]:8.1f} MiB")
    print(f"memory_ratio {mem['mask'] / mem['fft']:.3f}")
    print(f"ratio {med['mask'] / med['fft']:.3f}")


if __name__ == "__main__":
    main()
