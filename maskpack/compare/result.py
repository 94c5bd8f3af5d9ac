"""Rows and results of the storage comparison (``maskpack bench``), with their JSON form."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Row:
    """One method on one side.

    Attributes:
        side: ``"mask"`` (bit-packed masks) or ``"fp32"`` (fine-tuned weights).
        method: ``raw``, a general codec (``lzma-9`` ...), ``ans``, or an fp32 method.
        raw_bytes: input size (packed bits: 1 bit a weight; fp32: 4 bytes a weight).
        compressed_bytes: output size.
        encode_s, decode_s: wall time of one encode and one decode (0 for ``raw``).
    """

    side: str
    method: str
    raw_bytes: int
    compressed_bytes: int
    encode_s: float = 0.0
    decode_s: float = 0.0

    @property
    def reduction(self) -> float:
        """Saving relative to the raw size, in percent (negative when the output is larger)."""
        return 100.0 * (1.0 - self.compressed_bytes / self.raw_bytes) if self.raw_bytes else 0.0

    @property
    def encode_mbps(self) -> float | None:
        """Input megabytes (1e6) encoded per second, or None for ``raw``."""
        return self.raw_bytes / 1e6 / self.encode_s if self.encode_s > 0 else None

    @property
    def decode_mbps(self) -> float | None:
        """Input megabytes (1e6) restored per second, or None for ``raw``."""
        return self.raw_bytes / 1e6 / self.decode_s if self.decode_s > 0 else None

    def to_dict(self) -> dict[str, Any]:
        return {"side": self.side, "method": self.method, "raw_bytes": self.raw_bytes,
                "compressed_bytes": self.compressed_bytes, "reduction_pct": round(self.reduction, 3),
                "encode_s": self.encode_s, "decode_s": self.decode_s,
                "encode_mbps": self.encode_mbps, "decode_mbps": self.decode_mbps}


@dataclass
class BenchResult:
    """Everything ``maskpack bench`` prints; ``to_dict()`` is the ``--json`` file.

    Attributes:
        backbone: backbone name; tensors / numel: how many tensors and weights are masked.
        active: fraction of mask entries kept; changed: fraction of those weights the fine-tune changed.
        mask_rows, fp32_rows: one :class:`Row` per method (backbone-only: the masked tensors).
        whole: whole-checkpoint sizes (``mask_file_bytes``, ``fft_raw_bytes``, ``fft_best_bytes``,
            ``fft_best_method`` ...).
        ratios: ``paper``, ``honest``, ``whole`` (and ``whole_paper``), fp32 size / mask size.
        accuracy: ``{"mask": float | None, "fft": float | None}``.
        info: free-form provenance (dataset, epochs, file paths, timings).
        lora: with ``--lora``, the LoRA run (:func:`maskpack.compare.lora.lora_summary`): rank,
            ``raw_bytes`` / ``best_bytes`` / ``best_method`` of its adapter file, one row per method,
            accuracy, training time; None without.
    """

    backbone: str
    tensors: int
    numel: int
    active: float
    changed: float
    mask_rows: list[Row]
    fp32_rows: list[Row]
    whole: dict[str, Any]
    ratios: dict[str, float]
    accuracy: dict[str, float | None] = field(default_factory=lambda: {"mask": None, "fft": None})
    info: dict[str, Any] = field(default_factory=dict)
    lora: dict[str, Any] | None = None

    def row(self, side: str, method: str) -> Row:
        """The row of ``method`` on ``side``; KeyError when absent."""
        for r in self.mask_rows if side == "mask" else self.fp32_rows:
            if r.method == method:
                return r
        raise KeyError(f"{side}/{method}")

    def best(self, side: str) -> Row:
        """The smallest row of a side (``raw`` included: storing uncompressed is a choice too)."""
        return min(self.mask_rows if side == "mask" else self.fp32_rows, key=lambda r: r.compressed_bytes)

    def to_dict(self) -> dict[str, Any]:
        return {"backbone": self.backbone, "tensors": self.tensors, "numel": self.numel,
                "active": self.active, "changed": self.changed,
                "mask": [r.to_dict() for r in self.mask_rows], "fp32": [r.to_dict() for r in self.fp32_rows],
                "whole": self.whole, "ratios": self.ratios, "accuracy": self.accuracy, "info": self.info,
                **({"lora": self.lora} if self.lora is not None else {})}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BenchResult:
        """Rebuild a result from :meth:`to_dict` output (e.g. a ``--json`` file, to re-plot it)."""
        keys = ("side", "method", "raw_bytes", "compressed_bytes", "encode_s", "decode_s")
        rows = {side: [Row(**{k: r[k] for k in keys}) for r in d[side]] for side in ("mask", "fp32")}
        return cls(d["backbone"], d["tensors"], d["numel"], d["active"], d["changed"], rows["mask"],
                   rows["fp32"], d["whole"], d["ratios"], d.get("accuracy", {}), d.get("info", {}),
                   d.get("lora"))
