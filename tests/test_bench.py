"""maskpack.compare: fp32 baselines round-trip exactly, ratios are computed from the rows, JSON shape."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from maskpack import compare as bench
from maskpack.errors import BackboneMismatchError, ConfigError, FormatError


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.Conv2d(16, 32, 1), nn.Flatten(),
                         nn.Linear(32, 8))


def _task(net: nn.Module, *, keep: float = 0.9, noise: float = 1e-3, seed: int = 1):
    """Masks that drop the largest |w| more often (as trained masks do) and a perturbed fine-tune."""
    g = torch.Generator().manual_seed(seed)
    masks, ft = {}, {}
    for name, p in net.named_parameters():
        if name.endswith("weight") and p.ndim > 1:
            rank = p.abs().flatten().argsort().argsort().float() / p.numel()
            drop = torch.rand(p.numel(), generator=g) < (1 - keep) * 2 * rank
            masks[name] = (~drop).view_as(p)
    for name, t in net.state_dict().items():
        v = t.clone()
        if v.is_floating_point():
            v = v + noise * torch.randn(v.shape, generator=g) * (v.abs().mean() + 1e-3)
        ft[f"backbone.{name}"] = v
    ft["head.weight"] = torch.randn(5, 8, generator=g)
    ft["head.bias"] = torch.zeros(5)
    extras = {"head.weight": ft["head.weight"], "head.bias": ft["head.bias"],
              "backbone.1.running_mean": ft["backbone.1.running_mean"]}
    return masks, ft, extras


# ----------------------------------------------------------------------------- fp32 methods


def test_byte_group_roundtrip_and_planes():
    data = np.array([1.0, -2.5, 3.25e-8], dtype="<f4").tobytes()
    planes = bench.byte_group(data)
    assert [len(p) for p in planes] == [3, 3, 3, 3]
    assert planes[3] == bytes(data[i * 4 + 3] for i in range(3))  # sign + high exponent bits
    assert bench.byte_ungroup(planes) == data
    with pytest.raises(ConfigError):
        bench.byte_group(b"abc")
    with pytest.raises(FormatError):
        bench.byte_ungroup([b"a", b"b", b"c"])


def test_xor_is_self_inverse():
    rng = np.random.default_rng(0)
    a, b = rng.bytes(64), rng.bytes(64)
    assert bench.xor_bytes(bench.xor_bytes(a, b), b) == a
    assert bench.xor_bytes(a[:7], b[:7]) == bytes(x ^ y for x, y in zip(a[:7], b[:7], strict=True))


@pytest.mark.parametrize("n", [0, 1, 1000, 4097])
def test_fp32_methods_roundtrip_exactly(n):
    rng = np.random.default_rng(n)
    base = rng.standard_normal(n).astype("<f4")
    ft = (base + 1e-3 * rng.standard_normal(n)).astype("<f4")
    ft[: n // 3] = base[: n // 3]  # some weights unchanged
    every = list(bench.fp32_methods())
    rows = bench.fp32_rows(ft.tobytes(), base.tobytes(), methods=every)  # raises unless exact
    assert [r.method for r in rows] == every
    for name, (enc, dec) in bench.fp32_methods().items():
        assert dec(enc(ft.tobytes(), base.tobytes()), base.tobytes(), 4 * n) == ft.tobytes(), name


def test_fp32_rows_sizes_and_order():
    rng = np.random.default_rng(1)
    base = rng.standard_normal(50_000).astype("<f4")
    ft = (base * (1 + 1e-4 * rng.standard_normal(base.size))).astype("<f4")
    every = list(bench.fp32_methods())
    rows = {r.method: r for r in bench.fp32_rows(ft.tobytes(), base.tobytes(), methods=every)}
    assert rows["raw"].compressed_bytes == rows["raw"].raw_bytes == 200_000
    assert rows["raw"].encode_mbps is None and rows["raw"].reduction == 0.0
    # Byte grouping beats plain zstd on fp32; the XOR delta beats both when the change is small.
    assert rows["bytegroup+zstd-19"].compressed_bytes < rows["zstd-19"].compressed_bytes
    assert rows["xor+bytegroup+zstd-19"].compressed_bytes < rows["bytegroup+zstd-19"].compressed_bytes
    assert rows["zstd-19"].encode_mbps > 0 and rows["zstd-19"].decode_mbps > 0


def test_unknown_method_and_length_mismatch():
    with pytest.raises(ConfigError, match="unknown fp32 method 'nope'"):
        bench.fp32_rows(bytes(8), bytes(8), methods=["nope"])
    with pytest.raises(ConfigError, match="differ in length"):
        bench.fp32_rows(bytes(8), bytes(4))


def test_parallel_runs_give_the_same_sizes():
    rng = np.random.default_rng(3)
    base = rng.standard_normal(20_000).astype("<f4")
    ft = (base + 1e-3).astype("<f4")
    one = bench.fp32_rows(ft.tobytes(), base.tobytes(), workers=1)
    labels = []
    two = bench.fp32_rows(ft.tobytes(), base.tobytes(), workers=2, progress=labels.append)
    assert [(r.method, r.compressed_bytes) for r in one] == [(r.method, r.compressed_bytes) for r in two]
    assert sorted(labels) == sorted(f"fp32 {m}" for m in bench.FP32_DEFAULT)


def test_grouped_payload_validation():
    enc, dec = bench.fp32_methods()["bytegroup+zstd-19"]
    payload = enc(bytes(400), bytes(400))
    with pytest.raises(FormatError):
        dec(payload[:10], b"", 400)
    with pytest.raises(FormatError):
        dec(payload + b"x", b"", 400)


# ----------------------------------------------------------------------------- mask rows, ratios


def test_mask_rows_roundtrip_and_ans_wins():
    rng = np.random.default_rng(2)
    absw = {"a": np.abs(rng.standard_normal(40_000)).astype(np.float32)}
    # Large weights are dropped more often: the backbone-conditioned coder can exploit it.
    p_drop = 0.25 * (absw["a"].argsort().argsort() / absw["a"].size)
    masks = {"a": rng.random(absw["a"].size) >= p_drop}
    rows = {r.method: r for r in bench.mask_rows(masks, absw)}
    assert set(rows) == {"raw", "ans"} | {n for n, _, _ in bench.GENERAL}
    assert rows["raw"].compressed_bytes == 5000
    general = min(r.compressed_bytes for m, r in rows.items() if m not in ("raw", "ans"))
    assert rows["ans"].compressed_bytes < general


def test_row_reduction_and_speeds():
    r = bench.Row("fp32", "x", 1000, 250, encode_s=0.5, decode_s=0.25)
    assert r.reduction == pytest.approx(75.0)
    assert r.encode_mbps == pytest.approx(0.002) and r.decode_mbps == pytest.approx(0.004)
    assert bench.Row("fp32", "x", 100, 120).reduction == pytest.approx(-20.0)


def test_compare_ratios_from_rows():
    net = _net()
    masks, ft, extras = _task(net)
    res = bench.compare(masks, net, ft, mask_extras=extras, accuracy={"mask": 0.9, "fft": 0.91})
    numel = sum(m.numel() for m in masks.values())
    assert res.numel == numel and res.tensors == 3
    assert res.active == pytest.approx(sum(int(m.sum()) for m in masks.values()) / numel)
    assert res.changed > 0.99
    assert res.row("mask", "raw").raw_bytes == (numel + 7) // 8
    assert res.row("fp32", "raw").raw_bytes == 4 * numel
    mask_best = min(r.compressed_bytes for r in res.mask_rows)
    fp32_best = min(r.compressed_bytes for r in res.fp32_rows)
    assert res.ratios["honest"] == pytest.approx(fp32_best / mask_best)
    assert res.ratios["paper"] == pytest.approx(res.row("fp32", "lzma-9").compressed_bytes
                                                / res.row("mask", "lzma-9").compressed_bytes)
    assert res.ratios["raw"] == pytest.approx(4 * numel / ((numel + 7) // 8), rel=1e-3)  # ~32x
    w = res.whole
    rest = sum(t.numel() * t.element_size() for k, t in ft.items()
               if not (k.startswith("backbone.") and k[9:] in masks))
    assert w["fft_rest_bytes"] == rest
    assert w["fft_raw_bytes"] == 4 * numel + rest + (-rest % 4)
    assert w["fft_best_bytes"] == min(w["fft_by_method"].values())
    assert res.ratios["whole"] == pytest.approx(w["fft_best_bytes"] / w["mask_file_bytes"])
    assert w["mask_file_bytes"] > mask_best  # the file also holds the extras and a header
    # the file's bytes by part add up; its masks are the ans row (the same per-tensor coder)
    p = w["mask_file_parts"]
    assert p["total"] == w["mask_file_bytes"] == p["masks"] + p["extras"] + p["header"]
    assert p["masks"] == res.row("mask", "ans").compressed_bytes
    assert p["extras"] == p["head"] + p["bn"] and p["head"] > 0 and p["header"] > 0
    # LOSSY reference: the whole fine-tune in bfloat16, 2 bytes a float value
    floats = sum(t.numel() for t in ft.values() if t.is_floating_point())
    ints = sum(t.numel() * t.element_size() for t in ft.values() if not t.is_floating_point())
    raw16 = 2 * floats + ints
    assert w["fft_bf16_raw_bytes"] == raw16 + (-raw16 % 4)
    assert w["fft_bf16_best_bytes"] == min(w["fft_bf16_by_method"].values())
    assert set(w["fft_bf16_by_method"]) == set(bench.BF16_METHODS)
    assert res.ratios["whole_bf16_lossy"] == pytest.approx(w["fft_bf16_best_bytes"] / w["mask_file_bytes"])
    assert w["fft_bf16_best_bytes"] < w["fft_best_bytes"]
    assert res.accuracy == {"mask": 0.9, "fft": 0.91}


def test_result_json_shape():
    net = _net()
    masks, ft, extras = _task(net)
    res = bench.compare(masks, net, ft, mask_extras=extras, info={"dataset": "synthetic"})
    d = json.loads(res.to_json())
    assert set(d) == {"backbone", "tensors", "numel", "active", "changed", "mask", "fp32", "whole", "ratios",
                      "accuracy", "info"}
    assert set(d["ratios"]) == {"paper", "honest", "raw", "whole", "whole_paper", "whole_bf16_lossy"}
    assert [r["method"] for r in d["mask"]] == ["raw"] + [n for n, _, _ in bench.GENERAL] + ["ans"]
    assert [r["method"] for r in d["fp32"]] == list(bench.FP32_DEFAULT)
    assert set(d["mask"][0]) == {"side", "method", "raw_bytes", "compressed_bytes", "reduction_pct",
                                 "encode_s", "decode_s", "encode_mbps", "decode_mbps"}
    assert d["info"]["dataset"] == "synthetic" and d["info"]["mask_best"] in {r["method"] for r in d["mask"]}
    again = bench.BenchResult.from_dict(d)
    assert again.to_dict() == d


def test_compare_rejects_mismatched_pair():
    net = _net()
    masks, ft, _ = _task(net)
    missing = {k: v for k, v in ft.items() if k != "backbone.0.weight"}
    with pytest.raises(BackboneMismatchError, match="backbone.0.weight"):
        bench.compare(masks, net, missing)
    reshaped = dict(ft, **{"backbone.2.weight": torch.zeros(32, 16, 3, 3)})
    with pytest.raises(BackboneMismatchError, match="different backbones"):
        bench.compare(masks, net, reshaped)
    extra = dict(ft, **{"backbone.9.weight": torch.zeros(3)})
    with pytest.raises(BackboneMismatchError, match="backbone.9.weight"):
        bench.compare(masks, net, extra)
    with pytest.raises(ConfigError):
        bench.compare({}, net, ft)


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    net = _net()
    masks, ft, extras = _task(net)
    res = bench.compare(masks, net, ft, mask_extras=extras)
    out = tmp_path / "p.png"
    bench.plot(res, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
