"""Per-layer active fractions and loss curves of recipe-study runs (docs/recipe-study.md).

Usage: .venv/bin/python bench/recipe_layers.py runs/rs-mask-S [runs/rs-bnaff-S ...]
"""
import json
import sys
from pathlib import Path

import torch

from maskpack import masking


def main(dirs):
    for d in map(Path, dirs):
        ck = torch.load(d / "checkpoint.pt", map_location="cpu", weights_only=True)
        cfg = json.loads(ck["config"])
        rows = [json.loads(ln) for ln in (d / "metrics.jsonl").read_text().splitlines() if ln.strip()]
        print(f"== {d}  method={cfg['method']} lr={cfg['lr']} head_lr={cfg['head_lr']}")
        print("   loss per epoch:", " ".join(f"{r['loss']:.3f}" for r in rows),
              "| train_acc:", " ".join(f"{r.get('train_acc', float('nan')):.3f}" for r in rows),
              "| acc:", rows[-1].get("accuracy"))
        if not ck["scores"]:
            continue
        masks = masking.masks_from_scores(ck["scores"])
        act = masking.per_layer_active(masks)
        names = list(act)
        groups = {"stem": [], "expand": [], "depthwise": [], "project": [], "head": []}
        for n in names:
            key = ("stem" if "conv_stem" in n else "expand" if "expand" in n else
                   "depthwise" if "depthwise" in n else "project" if "project" in n else "head")
            groups[key].append(n)
        for k, ns in groups.items():
            if ns:
                tot = sum(masks[n].numel() for n in ns)
                on = sum(int(masks[n].sum()) for n in ns)
                print(f"   {k:10s} tensors {len(ns):3d} active {on / tot:.4f}  "
                      f"min {min(act[n] for n in ns):.3f}")
        print("   first 6 / last 3 tensors:", ", ".join(f"{n.split('.')[-2] if '.' in n else n}:{act[n]:.3f}"
                                                   for n in names[:6] + names[-3:]))


if __name__ == "__main__":
    main(sys.argv[1:])
