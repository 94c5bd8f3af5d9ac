"""Can a SwAV head learn on the frozen backbone's features? (docs/recipe-study.md)

Self-masks collapsed in every SwAV run: the loss never fell below ln(K) (uniform predictions)
even while only the head trained, so the scores had nothing to follow but the shortcut to a
constant output. This script isolates the head: it caches the frozen backbone's features
(BN in eval mode, ImageNet statistics) of P passes of 2 augmented global crops per image, then
trains the SwAV projection + prototypes on those cached features under several settings and
prints the loss per pass against ln(K). It also prints how alike the two views of one image are
(cosine of their features) next to two different images, for each augmentation strength.

    .venv/bin/python bench/swav_head.py --passes 4
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
from torch import nn

from maskpack.backbones import load_backbone
from maskpack.data import MultiCrop, load_dataset
from maskpack.objectives import SwAVObjective


def transform(size: int, mean, std, *, scale, jitter: float, blur: bool):
    """One global crop of the trainer's SwAV multi-crop with these settings."""
    return MultiCrop(size, mean, std, n_global=1, n_local=0, global_scale=scale, jitter=jitter,
                     blur=blur).pipes[0]


@torch.no_grad()
def cache(net, data, tf, passes: int, batch: int = 500) -> torch.Tensor:
    """(passes, N, 2, D) features of two crops per image per pass."""
    n = len(data.train)
    out = []
    torch.manual_seed(0)
    for _ in range(passes):
        feats = torch.empty(n, 2, net(torch.zeros(1, 3, 32, 32)).shape[1])
        for s in range(0, n, batch):
            imgs = [data.train[i][0] for i in range(s, min(n, s + batch))]
            for v in range(2):
                feats[s:s + len(imgs), v] = net(torch.stack([tf(im) for im in imgs]))
        out.append(feats)
    return torch.stack(out)


def view_similarity(f: torch.Tensor) -> tuple[float, float]:
    a = nn.functional.normalize(f[0, :, 0], dim=1)
    b = nn.functional.normalize(f[0, :, 1], dim=1)
    same = (a * b).sum(1).mean().item()
    other = (a * b.roll(1, 0)).sum(1).mean().item()
    return same, other


def train_head(feats: torch.Tensor, *, prototypes: int, hidden: int, lr: float, temperature: float,
               batch: int = 64, queue: int = 1024, seed: int = 0) -> list[float]:
    torch.manual_seed(seed)
    obj = SwAVObjective(feats.shape[-1], dim=128, hidden=hidden, prototypes=prototypes,
                        temperature=temperature, n_global=2, queue_length=queue)
    passes, n = feats.shape[0], feats.shape[1]
    steps = n // batch
    obj.freeze_iters = min(313, passes * steps // 10)
    opt = torch.optim.SGD(obj.parameters(), lr=lr, momentum=0.9)
    ident, losses, step = nn.Identity(), [], 0
    g = torch.Generator().manual_seed(seed)
    for p in range(passes):
        obj.use_queue = p >= 1
        perm = torch.randperm(n, generator=g)
        tot = 0.0
        for i in range(steps):
            idx = perm[i * batch:(i + 1) * batch]
            crops = [feats[p, idx, 0], feats[p, idx, 1]]
            factor = 0.5 * (1 + math.cos(math.pi * step / (passes * steps)))
            for grp in opt.param_groups:
                grp["lr"] = lr * factor
            loss, _ = obj.loss(ident, (crops, None), step)
            opt.zero_grad()
            loss.backward()
            obj.after_backward(step)
            opt.step()
            tot += float(loss.detach())
            step += 1
        losses.append(round(tot / steps, 4))
    return losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="imagefolder:" + os.environ.get("CIFAR5K", "data/cifar10-5k"))
    ap.add_argument("--passes", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset(args.dataset, image_size=32)
    bb = load_backbone("efficientnet_lite0")
    net = bb.copy_model().eval()
    augs = {
        "trainer (scale 0.3-1, jitter 0.8, blur)": dict(scale=(0.3, 1.0), jitter=0.8, blur=True),
        "mild (scale 0.5-1, jitter 0.4, no blur)": dict(scale=(0.5, 1.0), jitter=0.4, blur=False),
        "crop+flip only (scale 0.5-1)": dict(scale=(0.5, 1.0), jitter=0.0, blur=False),
    }
    heads = {
        "K=100 mlp lr0.1 T0.1": dict(prototypes=100, hidden=2048, lr=0.1, temperature=0.1),
        "K=100 mlp lr1 T0.1": dict(prototypes=100, hidden=2048, lr=1.0, temperature=0.1),
        "K=100 linear lr1 T0.1": dict(prototypes=100, hidden=0, lr=1.0, temperature=0.1),
        "K=30 mlp lr1 T0.1": dict(prototypes=30, hidden=2048, lr=1.0, temperature=0.1),
    }
    for aname, akw in augs.items():
        t = time.perf_counter()
        f = cache(net, data, transform(32, bb.mean, bb.std, **akw), args.passes)
        same, other = view_similarity(f)
        print(json.dumps({"aug": aname, "cache_s": round(time.perf_counter() - t),
                          "cos_same_image": round(same, 3), "cos_other_image": round(other, 3)}), flush=True)
        for hname, hkw in heads.items():
            losses = train_head(f, **hkw)
            print(json.dumps({"aug": aname, "head": hname, "ln_K": round(math.log(hkw["prototypes"]), 4),
                              "loss_per_pass": losses}), flush=True)


if __name__ == "__main__":
    main()
