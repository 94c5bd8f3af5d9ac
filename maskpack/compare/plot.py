"""Bar chart of the storage comparison (needs matplotlib: ``pip install 'maskpack[plot]'``)."""

from __future__ import annotations

import os

import numpy as np

from ..errors import ConfigError
from .result import BenchResult


def plot(result: BenchResult, path: str | os.PathLike) -> None:
    """Bar chart of compressed sizes (log scale), masks and fp32 weights side by side.

    Raises:
        ConfigError: matplotlib is not installed (``pip install 'maskpack[plot]'``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ConfigError("--plot needs matplotlib: pip install 'maskpack[plot]' (or pip install "
                          "matplotlib)") from exc
    rows = result.mask_rows + result.fp32_rows
    labels = [f"{r.side}: {r.method}" for r in rows]
    sizes = [r.compressed_bytes / 1e6 for r in rows]
    colors = ["#2a7ab9" if r.side == "mask" else "#d9822b" for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.26 * len(rows) + 1.4), dpi=90)
    y = np.arange(len(rows))[::-1]
    ax.barh(y, sizes, color=colors)
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("compressed size, MB (log scale)")
    for yi, r, s in zip(y, rows, sizes, strict=True):
        ax.text(s, yi, f" {s:.3g} MB ({r.reduction:.1f}%)", va="center", fontsize=7)
    ax.set_xlim(min(sizes) / 2, max(sizes) * 8)
    ax.set_title(f"{result.backbone}, {result.numel:,} masked weights: masks are "
                 f"{result.ratios['honest']:.0f}x smaller\n(best codec on each side; "
                 f"{result.ratios['paper']:.0f}x with lzma -9 on both)", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.fspath(path))
    plt.close(fig)
