"""Frozen-backbone k-NN and probe under three BatchNorm statistics (docs/recipe-study.md).

The control that a SwAV self-mask must beat by 5 points: the untouched backbone with (a) its
ImageNet running statistics, (b) statistics re-estimated on clean training images (seeded
shuffled order, as the trainer does), 16 and 100 batches of 64.

    .venv/bin/python bench/knn_bn.py --dataset imagefolder:$CIFAR5K --image-size 32
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from maskpack.backbones import load_backbone
from maskpack.data import Augmented, EpochSampler, eval_transform, load_dataset, make_loader
from maskpack.evaluate import evaluate_model, reestimate_bn_
from maskpack.model import TaskModel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="imagefolder:" + os.environ.get("CIFAR5K", "data/cifar10-5k"))
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--batches", default="0,16,100", help="re-estimation batches (0: ImageNet stats)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset(args.dataset, image_size=args.image_size)
    bb = load_backbone(args.backbone)
    ds = Augmented(data.train, eval_transform(args.image_size, bb.mean, bb.std))
    for nb in [int(x) for x in args.batches.split(",")]:
        model = TaskModel(bb.copy_model())  # a fresh copy: re-estimation changes BN in place
        if nb:
            loader = make_loader(ds, batch_size=64, sampler=EpochSampler(len(ds), seed=0))
            reestimate_bn_(model, loader, max_batches=nb)
        res = evaluate_model(model, data, image_size=args.image_size, mean=bb.mean, std=bb.std)
        print(f"bn={nb or 'imagenet'}", json.dumps(res), flush=True)

if __name__ == "__main__":
    main()
