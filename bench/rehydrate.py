"""Rehydration and in-place task switching speed on a ~25M-parameter model, one CPU core.

Usage:
    .venv/bin/python bench/rehydrate.py [--backbone torchvision:resnet50?weights=none] [--repeats 10]

Two tasks with random masks (~90% active, like trained masks) and their BN statistics are
switched back and forth on one loaded backbone with :class:`maskpack.rehydrate.TaskHost`; each
switch is checked bit-identical against a fresh :func:`maskpack.rehydrate.rehydrate`. Also times
``backbone_hash`` for Lite0 and the chosen model. Weights do not affect speed, so the default
uses torchvision's ResNet-50 architecture without downloading its weights.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from maskpack import load_backbone, masking
from maskpack.backbones.hashing import backbone_hash
from maskpack.rehydrate import TaskHost, rehydrate


def random_task(bb, seed: int, active: float = 0.9):
    g = torch.Generator().manual_seed(seed)
    names = [n for n, _, _ in masking.select_parameters(bb.model)]
    params = dict(bb.model.named_parameters())
    masks = {n: torch.rand(params[n].shape, generator=g) < active for n in names}
    extras = {f"backbone.{n}": (b + 0.01 * seed if b.is_floating_point() else b)
              for n, b in bb.model.named_buffers()}
    extras["head.weight"] = torch.randn(10, bb.feature_dim, generator=g)
    extras["head.bias"] = torch.zeros(10)
    return masks, extras


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="torchvision:resnet50?weights=none")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(1)
    bb = load_backbone(args.backbone)
    n_params = sum(p.numel() for p in bb.model.parameters())
    n_masked = sum(p.numel() for _, m, p in ((n, m, getattr(m, p)) for n, m, p in
                                              masking.select_parameters(bb.model)))
    (ma, ea), (mb, eb) = random_task(bb, 1), random_task(bb, 2)
    host = TaskHost(bb)
    x = torch.randn(2, 3, 64, 64)
    for masks, extras in [(ma, ea), (mb, eb)]:  # correctness first
        with torch.no_grad():
            assert torch.equal(host.switch_(masks, extras)(x), rehydrate(bb, masks, extras)(x))
    flip = iter(int(i % 2) for i in range(10**6))
    tasks = [(ma, ea), (mb, eb)]
    t_switch = timed(lambda: host.switch_(*tasks[next(flip)]), args.repeats)
    t_rehydrate = timed(lambda: rehydrate(bb, ma, ea), max(3, args.repeats // 3))
    lite0 = load_backbone()
    t_hash_lite0 = timed(lambda: backbone_hash(lite0.model), args.repeats)
    t_hash_bb = timed(lambda: backbone_hash(bb.model), max(3, args.repeats // 3))
    print(f"{bb.name}: {n_params / 1e6:.1f}M parameters, {n_masked / 1e6:.1f}M masked; 1 thread")
    print(f"switch task in place (TaskHost.switch_): {t_switch * 1000:7.1f} ms  (target < 50 ms)")
    print(f"rehydrate a fresh copy (rehydrate):        {t_rehydrate * 1000:7.1f} ms")
    print(f"backbone_hash efficientnet_lite0 (4.7M):   {t_hash_lite0 * 1000:7.1f} ms")
    print(f"backbone_hash {bb.name} ({n_params / 1e6:.1f}M): {t_hash_bb * 1000:7.1f} ms")
    print(f"switch_ms {t_switch * 1000:.1f}")


if __name__ == "__main__":
    main()
