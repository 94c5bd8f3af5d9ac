"""Extras study: BN-affine scope x extras precision x BN folding, accuracy and whole-file size.

One training run per (seed, scope); the extras precision and folding act only at the end of a run
(they do not change training), so each finished run is finalised once per variant from the same
trained state, exactly as ``maskpack train`` would (BN re-estimation, folding, rounding, final
evaluation, the task file's bytes). Prints one JSON line per variant.

    PYTHONPATH=. python bench/extras_study.py --scope masked --seed 0 [--dataset digits --epochs 6]

Scopes: ``all`` (BN weight/bias train on every BN layer), ``masked`` (only the BN right after
each masked layer), ``none`` (no BN weight/bias training).
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from maskpack import io
from maskpack.extras import cast_extras
from maskpack.train import TrainConfig
from maskpack.train.evaluation import evaluate_run
from maskpack.train.loop import start, train_epoch
from maskpack.train.state import task_extras, task_metadata

VARIANTS = (("float32", False), ("bfloat16", False), ("float32", True), ("bfloat16", True))


def _sizes(s, dtype: str) -> dict[str, int]:
    from maskpack import masking

    masks = masking.extract_masks(s.model.backbone)
    extras = task_extras(s)
    blob = io.to_bytes(masks, s.backbone, extras=cast_extras(extras, dtype), metadata=task_metadata(s),
                       codec=s.config.codec)
    head = sum(v.numel() for k, v in extras.items() if k.startswith("head."))
    return {"file_bytes": len(blob), "raw_extras_values": sum(v.numel() for v in extras.values()),
            "head_values": head, "active": masking.active_fraction(masks), "blob": blob}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scope", choices=("all", "masked", "none"), required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    scope = {"train_bn_affine": args.scope != "none", "bn_affine_scope": "masked" if args.scope == "masked"
             else "all"}
    c = TrainConfig(dataset=args.dataset, epochs=args.epochs, image_size=args.image_size, batch_size=64,
                    seed=args.seed, eval_every=0, eval_knn="never", quiet=True, threads=args.threads,
                    download=False, **scope)
    t0 = time.perf_counter()
    s = start(c)
    while s.epoch < s.config.epochs:
        s.history.append(train_epoch(s, None))
    trained = copy.deepcopy(s.model.state_dict())
    train_s = time.perf_counter() - t0
    for dtype, fold in VARIANTS:
        s.model.load_state_dict(trained)
        s.finalized = False
        s.config.extras_dtype, s.config.bn_fold = dtype, fold
        acc = evaluate_run(s, final=True)["accuracy"]
        size = _sizes(s, dtype)
        mf_extras = _extras_bytes(size.pop("blob"))
        print(json.dumps({"dataset": args.dataset, "seed": args.seed, "scope": args.scope,
                          "extras_dtype": dtype, "bn_fold": fold, "accuracy": acc, **size,
                          "extras_bytes": mf_extras, "train_s": round(train_s, 1)}), flush=True)


def _extras_bytes(blob: bytes) -> int:
    import os
    import tempfile

    fd, path = tempfile.mkstemp(suffix=".mask")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        return io.read(path).extras_bytes
    finally:
        os.unlink(path)


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    main()
