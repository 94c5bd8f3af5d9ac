"""How much precision a finished task's extras need: its test accuracy with the head quantised to
per-class int8 and with the stored BN statistics rounded to fewer mantissa bits, from the file.

    PYTHONPATH=. python bench/extras_precision.py runs/c10-s0/task.mask runs/c10-s1/task.mask \
        --bn-bits 7,6,5,4,3 --head-bits 8

For each file and setting, one JSON line: the accuracy on the task's test split, how many test
predictions differ from the file as stored, and the extras blob's stored size with the rounded
values as this version's writer stores it (the head's size is the file's own: quantising it here
only changes the evaluated model).
``bn_bits`` 7 is bfloat16 as stored; fewer bits round each running mean / variance to nearest
(ties to even) with that many explicit mantissa bits, as a trainer would before its final
evaluation. The files are loaded with ``maskpack.load`` and evaluated as ``bench/head_agree.py`` does.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from maskpack import io, load, load_backbone
from maskpack.data import Augmented, eval_transform, load_dataset, make_loader
from maskpack.evaluate import extract_features
from maskpack.extras import dequantize_head, quantize_head, round_mantissa
from maskpack.storage.container import pack_extras

STATS = ("running_mean", "running_var")


def _loader(path: Path):
    meta = io.read(path).metadata
    size = int(meta["image_size"])
    data = load_dataset(meta["dataset"], image_size=size)
    tf = eval_transform(size, json.loads(meta["mean"]), json.loads(meta["std"]))
    return make_loader(Augmented(data.test, tf), batch_size=256)


def evaluate(path: Path, backbone, loader, bn_bits: int, head_bits: int | None) -> dict:
    """Accuracy of the file's task with its BN statistics and head rounded as asked."""
    mf = io.read(path)
    extras = mf.read_extras()
    model = load(path, backbone)
    state = model.state_dict()
    stats = [k for k in extras if k.endswith(STATS)]
    with torch.no_grad():
        for k in stats:
            state[k].copy_(round_mantissa(state[k], bn_bits))
        if head_bits:
            w = state["head.weight"]
            dtype = mf.metadata.get("extras.dtype", "float32")
            w.copy_(dequantize_head(*quantize_head(w, head_bits, dtype)))
    _, y, logits = extract_features(model, loader, with_logits=True)
    stored = {k: (state[k].to(v.dtype) if k in stats else v) for k, v in extras.items()}
    return {"file": str(path), "bn_bits": bn_bits, "head_bits": head_bits,
            "pred": logits.argmax(dim=1), "y": y,
            "extras_bytes": len(pack_extras(io._extras_blob(stored))[0])}


def main() -> None:
    """Print one JSON line per file and setting."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--bn-bits", default="7,6,5,4", help="mantissa bits to try (7: bfloat16 as stored)")
    ap.add_argument("--head-bits", type=int, default=None,
                    help="also evaluate with an int8 (8) or int4 (4) head")
    args = ap.parse_args()
    settings = [(int(b), None) for b in args.bn_bits.split(",")]
    if args.head_bits:
        settings.append((7, args.head_bits))
    backbone = load_backbone(io.read(args.files[0]).backbone_name)
    for path in args.files:
        loader, first = _loader(path), None
        for bn_bits, head_bits in settings:
            r = evaluate(path, backbone, loader, bn_bits, head_bits)
            pred, y = r.pop("pred"), r.pop("y")
            first = pred if first is None else first
            r.update(accuracy=round(float((pred == y).float().mean()), 4), n=len(y),
                     differs_from_first=int((pred != first).sum()))
            print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
