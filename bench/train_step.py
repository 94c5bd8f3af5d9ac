"""Masked vs full fine-tuning training step, side by side: step time, images/s, ratio.

Usage:
    .venv/bin/python bench/train_step.py                      # CPU: Lite0 64 px, batch 64, 1 thread
    .venv/bin/python bench/train_step.py --device cuda --compile   # Lite0 128/224 px, ResNet-50 224 px
    .venv/bin/python bench/train_step.py --model resnet50 --size 224 --batch 32 --steps 5
    .venv/bin/python bench/train_step.py --configs lite0:128,resnet50:224 --memory --json

Methods: ``fft`` (every weight trains), ``mask`` (scores on every conv/linear weight, the
per-layer path) and, with ``--compile``, ``mask-compiled`` (the same masks through
:func:`maskpack.masking.compile_masks_`, one fused pass for all masked weights). Each repeat
times ``--inner`` steps of every method in turn (the order rotates), so machine drift hits all
alike; the figures are medians over ``--steps`` repeats, of wall time and (on CPU) of the
process's CPU time, which a shared machine disturbs less. On CUDA: bf16 autocast and
channels_last unless ``--no-amp`` / ``--no-channels-last``. ResNet-50 is torchvision's with
random weights (``weights=None``; speed does not depend on the values). The last line is
``ratio <mask step time / fft step time>`` of the first configuration (on CPU preceded by
``cpu_time_ratio``, the same from process CPU time).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torchvision
from torch import nn

from maskpack import load_backbone, masking


def backbone(model: str) -> tuple[nn.Module, int]:
    """A fresh feature extractor and its feature width."""
    if model == "lite0":
        bb = load_backbone()
        return bb.copy_model(), bb.feature_dim
    if model == "resnet50":
        net = torchvision.models.resnet50(weights=None)
        net.fc = nn.Identity()
        return net, 2048
    raise SystemExit(f"unknown model {model!r}: use lite0 or resnet50")


def build(method: str, model: str, args) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Model (backbone + 10-way head) and optimizer of one method, on the device, train mode."""
    torch.manual_seed(0)
    net, feat = backbone(model)
    device = torch.device(args.device)
    if method == "fft":
        net.requires_grad_(True)
    else:
        masking.apply_masks_(net)
    full = nn.Sequential(net, nn.Linear(feat, 10)).to(device)
    if args.channels_last:
        full.to(memory_format=torch.channels_last)
    if method == "fft":
        groups = [{"params": list(full.parameters()), "lr": 0.01, "weight_decay": 5e-4}]
    else:
        groups = [{"params": masking.score_parameters(net), "lr": 50.0, "weight_decay": 0.0},
                  {"params": list(full[1].parameters()), "lr": 0.01}]
    if method == "mask-compiled":
        masking.compile_masks_(net)  # after .to(device) and channels_last (it also copes with later moves)
    return full.train(), torch.optim.SGD(groups, momentum=0.9)


def batch(model: str, size: int, args) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, size, size, generator=g).to(args.device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, 10, (args.batch,), generator=g).to(args.device)


def step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, amp: bool) -> None:
    opt.zero_grad(set_to_none=True)
    ctx = torch.autocast(x.device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()
    with ctx:
        loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_config(model: str, size: int, methods: list[str], args) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall and process-CPU seconds per step of each method, interleaved."""
    runs = {m: build(m, model, args) for m in methods}
    x, y = batch(model, size, args)
    for m in methods:
        for _ in range(args.warmup):
            step(*runs[m], x, y, args.amp)
    wall: dict[str, list[float]] = {m: [] for m in methods}
    cpu: dict[str, list[float]] = {m: [] for m in methods}
    for r in range(args.steps):
        for m in methods[r % len(methods):] + methods[:r % len(methods)]:  # rotate the order
            sync(args.device)
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(args.inner):
                step(*runs[m], x, y, args.amp)
            sync(args.device)
            wall[m].append((time.perf_counter() - t0) / args.inner)
            cpu[m].append((time.process_time() - c0) / args.inner)
    med = {m: statistics.median(t) for m, t in wall.items()}
    return med, {m: statistics.median(t) for m, t in cpu.items()}


def count_ops(model: str, size: int, methods: list[str], args) -> dict[str, int]:
    """Aten operators (views excluded) that one training step dispatches: roughly its kernel launches."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args_=(), kwargs=None):  # noqa: ARG002
            if not func.is_view:
                Counter.n += 1
            return func(*args_, **(kwargs or {}))

    out = {}
    for m in methods:
        net, opt = build(m, model, args)
        x, y = batch(model, size, args)
        step(net, opt, x, y, args.amp)
        Counter.n = 0
        with Counter():
            step(net, opt, x, y, args.amp)
        out[m] = Counter.n
    return out


def peak_memory(method: str, model: str, size: int, args) -> float:
    """MiB a training step adds to the resident model: CUDA peak in-process, CPU via a child's ru_maxrss."""
    if args.device.startswith("cuda"):
        net, opt = build(method, model, args)
        x, y = batch(model, size, args)
        step(net, opt, x, y, args.amp)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(net, opt, x, y, args.amp)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    cmd = [sys.executable, __file__, "--child", method, "--configs", f"{model}:{size}", "--batch",
           str(args.batch), "--threads", str(args.threads), "--device", args.device]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def child(args) -> None:
    model, size = parse_configs(args)[0]
    net, opt = build(args.child, model, args)
    x, y = batch(model, size, args)
    base = _rss_mib()
    for _ in range(3):
        step(net, opt, x, y, args.amp)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    print(json.dumps({"peak_mib": peak}))


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def parse_configs(args) -> list[tuple[str, int]]:
    if args.configs:
        out = []
        for item in args.configs.split(","):
            name, _, size = item.partition(":")
            out.append((name, int(size or 224)))
        return out
    if args.model or args.size:
        return [(args.model or "lite0", args.size or (64 if args.device == "cpu" else 224))]
    if args.device == "cpu":
        return [("lite0", 64)]
    return [("lite0", 128), ("lite0", 224), ("resnet50", 224)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["lite0", "resnet50"], default=None)
    ap.add_argument("--size", type=int, default=None, help="input side in px (with --model)")
    ap.add_argument("--configs", default=None, help="MODEL:SIZE,... (default: cpu lite0:64; "
                    "cuda lite0:128,lite0:224,resnet50:224)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=None, help="timed repeats per method (cpu 10, cuda 20)")
    ap.add_argument("--inner", type=int, default=None, help="steps per timed repeat (cpu 1, cuda 5)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps per method (cpu 1, cuda 5)")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads (1: on a shared machine, more threads mostly time barrier waits)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compile", action="store_true", help="also time masking.compile_masks_")
    ap.add_argument("--no-amp", dest="amp", action="store_false", help="no bf16 autocast on CUDA")
    ap.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    ap.add_argument("--memory", action="store_true", help="also measure each step's peak memory")
    ap.add_argument("--ops", action="store_true", help="also count the aten operators of one step")
    ap.add_argument("--json", action="store_true", help="also print one JSON line per configuration")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    args.amp = args.amp and cuda
    args.channels_last = args.channels_last and cuda
    args.steps = args.steps or (20 if cuda else 10)
    args.inner = args.inner or (5 if cuda else 1)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    torch.set_num_threads(args.threads)
    if args.child:
        return child(args)
    if cuda:
        print(f"device: {torch.cuda.get_device_name(0)} | torch {torch.__version__}")
    methods = ["fft", "mask"] + (["mask-compiled"] if args.compile else [])
    ratios, cpu_ratios = [], []
    for model, size in parse_configs(args):
        med, cpu_med = time_config(model, size, methods, args)
        mem = {m: peak_memory(m, model, size, args) for m in methods} if args.memory else {}
        ops = count_ops(model, size, methods, args) if args.ops else {}
        print(f"{model} {size}px, batch {args.batch}, {args.device}"
              f"{', bf16 autocast' if args.amp else ''}{', channels_last' if args.channels_last else ''}"
              f"{'' if cuda else f', {args.threads} threads'}: median of {args.steps} interleaved "
              f"repeats x {args.inner} step(s)")
        row = {"model": model, "size": size, "batch": args.batch, "device": args.device, "amp": args.amp}
        for m in methods:
            ratio = med[m] / med["fft"]
            extra = "" if cuda else (f"   cpu time {cpu_med[m] * 1000:9.2f} ms, "
                                     f"{m}/fft {cpu_med[m] / cpu_med['fft']:.3f}")
            extra += f"   step memory {mem[m]:8.1f} MiB" if mem else ""
            extra += f"   {ops[m]} aten ops/step" if ops else ""
            print(f"  {m:14s} {med[m] * 1000:9.2f} ms  {args.batch / med[m]:9.1f} images/s  "
                  f"{m}/fft {ratio:.3f}{extra}")
            row[f"{m}_ms"], row[f"{m}_images_per_s"] = med[m] * 1000, args.batch / med[m]
            row[f"{m}_over_fft"] = ratio
            if not cuda:
                row[f"{m}_cpu_ms"], row[f"{m}_cpu_over_fft"] = cpu_med[m] * 1000, cpu_med[m] / cpu_med["fft"]
            if mem:
                row[f"{m}_step_mib"] = mem[m]
            if ops:
                row[f"{m}_aten_ops"] = ops[m]
        ratios.append(med["mask"] / med["fft"])
        cpu_ratios.append(cpu_med["mask"] / cpu_med["fft"])
        if args.json:
            print(json.dumps(row))
    if not cuda:
        print(f"cpu_time_ratio {cpu_ratios[0]:.3f}")
    print(f"ratio {ratios[0]:.3f}")


if __name__ == "__main__":
    main()
