"""Where an ``ans`` .mask file's bytes go, against the conditional-entropy bound, and the floor
of any code that, like ``ans``, learns each |W| bucket's rate from the mask itself.

    PYTHONPATH=. python bench/ans_overhead.py runs/bench-codecs/digits-32px-4ep.mask

The bound (bench/codecs.py) is the empirical entropy of each mask given 16 |W| buckets: it
assumes the 16 rates per tensor are known for free. A decoder does not know them, so any code
pays for them; the least it can pay for a rate estimated from n elements is the minimax regret of
a Bernoulli source, about 0.5 * log2(pi * n / 2) bits (Rissanen; Xie and Barron). The floor below
takes, per tensor, the bucket count (1..16) that minimises entropy + regret, and adds nothing for
the header (names, shapes, active counts, lengths, checksums) or the coder's own loss.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import maskpack  # noqa: E402
from maskpack import io as mio  # noqa: E402
from maskpack.storage.entropy import (  # noqa: E402
    TensorContexts,
    _count_bits,
    _entropy_bits,
    conditional_entropy_bits,
    contexts,
    encode_mask,
)


def _regret_bits(sizes: np.ndarray) -> float:
    return sum(0.5 * math.log2(math.pi * max(int(n), 1) / 2) for n in sizes)


def breakdown(path: str) -> dict:
    """Byte counts of the ``ans`` encoding of the masks in ``path`` (any codec) and the floors."""
    mf = maskpack.read(path)
    bb = maskpack.load_backbone(mf.backbone_name)
    masks, weights = mf.masks(bb), mio.backbone_tensors(bb)
    out = dict(tensors=len(masks), bound=0.0, payload=0, counts=0, words=0, entropy_chosen=0.0, floor=0.0)
    for name, m in masks.items():
        absw = weights[name].detach().abs().reshape(-1).float().numpy()
        flat = m.reshape(-1).numpy().astype(bool)
        ctx = TensorContexts(absw)
        payload = encode_mask(flat, ctx)
        lb = payload[0] & 0x0F
        sizes = np.asarray(ctx.order(lb)[1])
        counts = np.bincount(contexts(absw, 1 << lb), weights=flat, minlength=1 << lb).astype(np.int64)
        out["bound"] += conditional_entropy_bits(flat, absw, 16) / 8
        out["payload"] += len(payload)
        out["counts"] += _count_bits(sizes, counts) / 8  # ideal bits of the counts inside the stream
        out["words"] += len(payload) - 1
        out["entropy_chosen"] += _entropy_bits(sizes, counts) / 8
        costs = []
        for lb2 in range(5):
            sizes = np.asarray(ctx.order(lb2)[1])
            ones = np.bincount(contexts(absw, 1 << lb2), weights=flat, minlength=1 << lb2).astype(np.int64)
            costs.append((_entropy_bits(sizes, ones) + _regret_bits(sizes)) / 8)
        out["floor"] += min(costs)
    blob = mio.to_bytes(masks, bb, codec="ans")
    out["file"] = len(blob)
    out["header"] = len(blob) - out["payload"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mask", help="a .mask file over a registry backbone (any codec)")
    r = breakdown(ap.parse_args().mask)
    b = r["bound"]
    print(json.dumps({k: round(v) if isinstance(v, float) else v for k, v in r.items()}))
    print(f"bound {b:,.0f} B | ans file {r['file']:,} B = {r['file'] / b:.4f}x: "
          f"payloads {r['payload'] / b:.4f}x (bucket counts {r['counts']:,.0f} B, coder loss "
          f"{r['words'] - r['entropy_chosen'] - r['counts']:,.0f} B, fewer buckets than 16 "
          f"{r['entropy_chosen'] - b:,.0f} B), "
          f"header and preamble {r['header']:,} B")
    print(f"floor of the payloads (rates learned from the mask, no header): {r['floor']:,.0f} B = "
          f"{r['floor'] / b:.4f}x; 1.01x leaves {1.01 * b - r['floor']:,.0f} B for the header and the coder")


if __name__ == "__main__":
    main()
