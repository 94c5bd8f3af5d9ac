"""Frozen-backbone k-NN when only some BatchNorm layers are re-estimated (docs/recipe-study.md).

With its ImageNet statistics Lite0's pooled features at 32 px are 98% exact zeros (k-NN 0.405);
re-estimating every BN layer on clean cifar10-5k images centres them but costs 4 points (0.359).
This asks which layers' statistics carry that loss: each policy re-estimates the BN layers whose
names match a regex (cumulative average over --batches batches of 64 clean training images,
all other BN layers keep their ImageNet statistics and stay in eval mode meanwhile), then
measures the k-NN (k=200, T=0.1) and the fraction of exact zeros in the test features.

    .venv/bin/python bench/bn_policy.py --policy all=. --policy head=^_bn1$ --policy none=
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time

import torch
from torch import nn

from maskpack.backbones import load_backbone
from maskpack.data import Augmented, EpochSampler, eval_transform, load_dataset, make_loader
from maskpack.evaluate import evaluate_features, extract_features, reestimate_bn_
from maskpack.model import TaskModel


def chosen_bns(model: nn.Module, pattern: str) -> list[tuple[str, nn.Module]]:
    """The backbone's BN layers whose names match ``pattern`` (empty pattern: none)."""
    rx = re.compile(pattern) if pattern else None
    return [(n, m) for n, m in model.backbone.named_modules()
            if isinstance(m, nn.BatchNorm2d) and rx is not None and rx.search(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="imagefolder:" + os.environ.get("CIFAR5K", "data/cifar10-5k"))
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--batches", type=int, default=16)
    ap.add_argument("--policy", action="append", required=True,
                    help="NAME=REGEX of BN layer names to re-estimate (empty: none)")
    ap.add_argument("--probe", action="store_true", help="also fit the logistic-regression probe")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset(args.dataset, image_size=args.image_size)
    bb = load_backbone(args.backbone)
    tf = eval_transform(args.image_size, bb.mean, bb.std)
    tr = make_loader(Augmented(data.train, tf), batch_size=256)
    te = make_loader(Augmented(data.test, tf), batch_size=256)
    for spec in args.policy:
        name, _, pattern = spec.partition("=")
        t0 = time.perf_counter()
        model = TaskModel(bb.copy_model())
        loader = make_loader(Augmented(data.train, tf), batch_size=64,
                             sampler=EpochSampler(len(data.train), seed=0))
        chosen = chosen_bns(model, pattern)
        reestimate_bn_(model, loader, max_batches=args.batches, only=[m for _, m in chosen])
        model.eval()
        f_tr, y_tr = extract_features(model, tr)
        f_te, y_te = extract_features(model, te)
        res = evaluate_features(f_tr, y_tr, f_te, y_te, probe=args.probe, num_classes=data.num_classes)
        res.update(policy=name, regex=pattern, layers=len(chosen),
                   zero_frac=round(float((f_te == 0).float().mean()), 4),
                   seconds=round(time.perf_counter() - t0, 1))
        print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
