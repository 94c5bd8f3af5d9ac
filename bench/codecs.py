"""Codec comparison on real trained masks: sizes (whole .mask files), entropy bound, speed.

Masks come from a short supervised run of the embedded Lite0 on scikit-learn digits (upsampled
to RGB), cached as a raw .mask under runs/bench-codecs/ (gitignored), or from ``--masks FILE``.

    .venv/bin/python bench/codecs.py                 # train (a few minutes on CPU) or reuse the cache
    .venv/bin/python bench/codecs.py --masks task.mask --repeats 5

Speeds are on one thread (torch.set_num_threads(1); the codecs themselves are single-threaded).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import maskpack  # noqa: E402
from maskpack import io as mio  # noqa: E402
from maskpack import masking  # noqa: E402
from maskpack.bn import reestimate_bn_  # noqa: E402
from maskpack.storage import available_codecs, get_codec  # noqa: E402
from maskpack.storage.entropy import TensorContexts, conditional_entropy_bits  # noqa: E402

CACHE = Path("runs/bench-codecs")
LEVELS = {"gzip": 9, "bz2": 9, "lzma": 9, "zstd": 19}


def digits_tensors(size: int, bb) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.repeat(1, 3, 1, 1)
    x = bb.normalize(x.clamp(0, 1))
    y = torch.tensor(d.target)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=397, random_state=0, stratify=y)
    return xtr, ytr, xte, yte


def train_masks(epochs: int, size: int, seed: int = 0) -> tuple[dict, dict]:
    """Supervised mask on digits: SGD momentum 0.9, lr 50 on scores, 0.01 on a linear head."""
    torch.manual_seed(seed)
    bb = maskpack.load_backbone()
    net = bb.copy_model()
    masking.apply_masks_(net)
    head = nn.Linear(bb.feature_dim, 10)
    xtr, ytr, xte, yte = digits_tensors(size, bb)
    opt = torch.optim.SGD([{"params": masking.score_parameters(net), "lr": 50.0},
                           {"params": head.parameters(), "lr": 0.01}], momentum=0.9)
    steps_per_epoch = math.ceil(len(xtr) / 64)
    total = epochs * steps_per_epoch
    base = [g["lr"] for g in opt.param_groups]
    step = 0
    for ep in range(epochs):
        net.train()
        perm = torch.randperm(len(xtr))
        t0 = time.perf_counter()
        for i in range(0, len(xtr), 64):
            idx = perm[i:i + 64]
            warm = min(1.0, (step + 1) / steps_per_epoch)  # linear warm-up over the first epoch
            cos = 0.5 * (1 + math.cos(math.pi * step / total))
            for g, lr in zip(opt.param_groups, base, strict=True):
                g["lr"] = lr * warm * cos
            loss = nn.functional.cross_entropy(head(net(xtr[idx])), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        # The masked weights differ from the ones the ImageNet BN statistics were measured on:
        # re-estimate them on the training images (as the trainer does) before evaluating.
        reestimate_bn_(net, ((xtr[i:i + 64], None) for i in range(0, len(xtr), 64)), amp=False)
        net.eval()
        with torch.no_grad():
            acc = (head(net(xte)).argmax(1) == yte).float().mean().item()
        masks = masking.extract_masks(net)
        print(f"epoch {ep + 1}/{epochs}: loss {loss.item():.3f} test acc {acc:.3f} "
              f"active {masking.active_fraction(masks):.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    info = {"epochs": str(epochs), "size": str(size), "test_acc": f"{acc:.4f}", "dataset": "digits"}
    return masks, info


def get_masks(args) -> tuple[dict, object, dict]:
    bb = maskpack.load_backbone()
    path = Path(args.masks) if args.masks else CACHE / f"digits-{args.size}px-{args.epochs}ep.mask"
    if path.exists():
        mf = maskpack.read(path)
        bb = maskpack.load_backbone(mf.backbone_name)
        return mf.masks(bb), bb, dict(mf.metadata, source=str(path))
    masks, info = train_masks(args.epochs, args.size)
    path.parent.mkdir(parents=True, exist_ok=True)
    maskpack.save(path, masks, bb, metadata=info, codec="raw")
    return masks, bb, dict(info, source=str(path))


def _best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bench(masks: dict, bb, repeats: int) -> dict:
    weights = mio._tensors(bb.model)
    flat = {k: m.reshape(-1).numpy() for k, m in masks.items()}
    absw = {k: mio._absw(weights[k]) for k in masks}
    numel = sum(m.size for m in flat.values())
    bound = sum(conditional_entropy_bits(flat[k], absw[k], 16) for k in masks) / 8
    rows = []
    tmp = Path(tempfile.mkdtemp())
    for name in available_codecs():
        codec, level = get_codec(name), LEVELS.get(name)
        ctx = name == "ans"

        def enc(codec=codec, level=level, ctx=ctx):
            return {k: codec.encode(flat[k], TensorContexts(absw[k]) if ctx else None, level) for k in flat}

        payloads = enc()
        t_enc = _best_time(enc, repeats)

        def dec(cache=None, codec=codec, payloads=payloads, ctx=ctx):
            for k, p in payloads.items():
                c = (cache[k] if cache is not None else TensorContexts(absw[k])) if ctx else None
                codec.decode(p, flat[k].size, c)

        t_dec = _best_time(dec, repeats)
        warm = None
        if ctx:  # contexts computed once per backbone and reused (maskpack.io caches them)
            cache = {k: TensorContexts(absw[k]) for k in flat}
            dec(cache)
            warm = numel / _best_time(lambda cache=cache: dec(cache), repeats) / 1e6
        path = tmp / f"{name}.mask"
        maskpack.save(path, masks, bb, codec=name, level=level)
        rows.append({"codec": name + (f"-{level}" if level else ""), "bytes": path.stat().st_size,
                     "payload_bytes": sum(len(p) for p in payloads.values()),
                     "encode_mbit_s": numel / t_enc / 1e6, "decode_mbit_s": numel / t_dec / 1e6,
                     "decode_warm_mbit_s": warm})
    raw = next(r for r in rows if r["codec"] == "raw")["bytes"]
    best_general = min(r["bytes"] for r in rows if r["codec"].split("-")[0] in LEVELS)
    for r in rows:
        r["vs_raw"] = r["bytes"] / raw
        r["vs_best_general"] = r["bytes"] / best_general
    return {"numel": numel, "active": sum(int(m.sum()) for m in flat.values()) / numel,
            "tensors": len(flat), "bound_bytes": bound, "best_general_bytes": best_general, "rows": rows}


def report(res: dict, meta: dict) -> list[str]:
    about = ", ".join(f"{k}={v}" for k, v in meta.items() if k != "source")
    lines = [f"masks: {meta.get('source')} ({res['tensors']} tensors, {res['numel']:,} weights, "
             f"{res['active']:.2%} active; {about})",
             f"conditional-entropy bound (16 |W| buckets per tensor): {res['bound_bytes']:,.0f} bytes", "",
             "| codec | bytes (file) | vs raw | vs best general | payload vs bound | encode Mbit/s | "
             "decode Mbit/s |", "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        warm = f" ({r['decode_warm_mbit_s']:.0f} cached ctx)" if r["decode_warm_mbit_s"] else ""
        lines.append(f"| {r['codec']} | {r['bytes']:,} | {r['vs_raw']:.3f} | {r['vs_best_general']:.3f} | "
                     f"{r['payload_bytes'] / res['bound_bytes']:.4f} | {r['encode_mbit_s']:.1f} | "
                     f"{r['decode_mbit_s']:.1f}{warm} |")
    ans = next(r for r in res["rows"] if r["codec"] == "ans")
    bound = res["bound_bytes"]
    checks = [("ans file <= 0.85x best of gzip-9/bz2-9/lzma-9/zstd-19", ans["vs_best_general"], 0.85, "<="),
              ("ans payload within 2% of the entropy bound", ans["payload_bytes"] / bound, 1.02, "<="),
              ("ans whole file within 2% of the entropy bound", ans["bytes"] / bound, 1.02, "<="),
              ("ans decode >= 40 Mbit/s (contexts computed)", ans["decode_mbit_s"], 40, ">=")]
    lines.append("")
    for text, value, target, op in checks:
        ok = value <= target if op == "<=" else value >= target
        lines.append(f"{'PASS' if ok else 'FAIL'}: {text}: {value:.3f}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--masks", help="use the masks of this .mask file instead of training")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--size", type=int, default=64, help="digit image size in pixels")
    ap.add_argument("--repeats", type=int, default=3, help="timing repeats (best is reported)")
    ap.add_argument("--json", default=str(CACHE / "results.json"), help="where to write the results as JSON")
    args = ap.parse_args()
    masks, bb, meta = get_masks(args)
    torch.set_num_threads(1)
    res = bench(masks, bb, args.repeats)
    print("\n".join(report(res, meta)))
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(dict(res, meta=meta), f, indent=2)


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
