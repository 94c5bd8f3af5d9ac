"""Test accuracy of task files, loaded from the files, and where their predictions differ from the first's.

    PYTHONPATH=. python bench/head_agree.py runs/off/task.mask runs/bits8/task.mask runs/bits4/task.mask

Each file is loaded with ``maskpack.load`` and evaluated on its dataset's test split at its stored
image size (one JSON line per file: accuracy, and the test images whose predicted class differs
from the first file's).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from maskpack import io, load, load_backbone
from maskpack.data import Augmented, eval_transform, load_dataset, make_loader
from maskpack.evaluate import extract_features


def predictions(path: Path, backbone) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted classes and labels of the task's test split."""
    meta = io.read(path).metadata
    size = int(meta["image_size"])
    data = load_dataset(meta["dataset"], image_size=size)
    tf = eval_transform(size, json.loads(meta["mean"]), json.loads(meta["std"]))
    loader = make_loader(Augmented(data.test, tf), batch_size=256)
    _, y, logits = extract_features(load(path, backbone), loader, with_logits=True)
    return logits.argmax(dim=1), y


def main() -> None:
    """Print one JSON line per task file."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", type=Path)
    args = ap.parse_args()
    backbone = load_backbone(io.read(args.files[0]).backbone_name)
    first = None
    for f in args.files:
        pred, y = predictions(f, backbone)
        first = pred if first is None else first
        print(json.dumps({"file": str(f), "accuracy": float((pred == y).float().mean()), "n": len(y),
                          "differs_from_first": int((pred != first).sum())}))


if __name__ == "__main__":
    main()
