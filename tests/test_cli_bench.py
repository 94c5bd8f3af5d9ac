"""``maskpack bench`` end to end through click's CliRunner.

Fast tests swap the registry's backbone for a tiny one (so compressing its weights takes
milliseconds); the CIFAR-100 path reads a tiny archive in the official python format. The
embedded Lite0 runs are marked slow.
"""

from __future__ import annotations

import hashlib
import json
import pickle

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import maskpack
from maskpack import backbones
from maskpack.cli import main

TINY = "tiny_bench"


class _TinyFeatures(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.pw = nn.Conv2d(16, 32, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return torch.relu(self.bn2(self.pw(x))).mean((2, 3))


def _tiny_backbone() -> backbones.Backbone:
    torch.manual_seed(0)
    net = _TinyFeatures().eval().requires_grad_(False)
    return backbones.Backbone(TINY, net, 32, 32, (0.5,) * 3, (0.25,) * 3)


@pytest.fixture
def tiny_registry(monkeypatch):
    """``load_backbone("tiny_bench")`` gives a small conv net; other names load as usual."""
    real = backbones.load_backbone

    def load(name=backbones.DEFAULT_BACKBONE, *, weights=None):
        return _tiny_backbone() if name == TINY else real(name, weights=weights)

    monkeypatch.setattr(backbones, "load_backbone", load)
    return load


def _write_cifar100(root, n_train=12, n_test=6):
    """A tiny CIFAR-100 (``cifar-100-python/{train,test,meta}``, pickled dicts as torchvision reads them)."""
    d = root / "cifar-100-python"
    d.mkdir()
    rng = np.random.default_rng(0)
    md5 = {}
    for name, n in (("train", n_train), ("test", n_test)):
        fine = [i % 100 for i in range(n)]
        entry = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "fine_labels": fine,
                 "coarse_labels": [f // 5 for f in fine],
                 "filenames": [f"{i}.png" for i in range(n)]}
        (d / name).write_bytes(pickle.dumps(entry))
        md5[name] = hashlib.md5((d / name).read_bytes()).hexdigest()
    meta = {"fine_label_names": [f"class{i}" for i in range(100)],
            "coarse_label_names": [f"super{i}" for i in range(20)]}
    (d / "meta").write_bytes(pickle.dumps(meta))
    md5["meta"] = hashlib.md5((d / "meta").read_bytes()).hexdigest()
    return md5


@pytest.fixture
def tiny_cifar100(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR100

    root = tmp_path / "data"
    root.mkdir()
    md5 = _write_cifar100(root)
    # torchvision checks the official archives' md5: point it at the tiny files' checksums.
    monkeypatch.setattr(CIFAR100, "train_list", [["train", md5["train"]]])
    monkeypatch.setattr(CIFAR100, "test_list", [["test", md5["test"]]])
    monkeypatch.setattr(CIFAR100, "meta", {"filename": "meta", "key": "fine_label_names", "md5": md5["meta"]})
    return root


def _fake_pair(tmp_path, backbone, *, fft_backbone=None, head_bits=None):
    """A .mask file and a model.safetensors made directly (no training), with metrics beside them
    (``head_bits``: the task stores its head as per-class int8 / int4)."""
    from safetensors.torch import save_file

    from maskpack.extras import head_metadata, stored_extras

    g = torch.Generator().manual_seed(0)
    net = backbone.model
    masks = {n: torch.rand(p.shape, generator=g) > 0.05 for n, p in net.named_parameters() if p.ndim == 4}
    head = {"head.weight": torch.randn(10, backbone.feature_dim, generator=g), "head.bias": torch.zeros(10)}
    mdir, fdir = tmp_path / "m", tmp_path / "f"
    mdir.mkdir()
    fdir.mkdir()
    stored = stored_extras(head, "bfloat16", head_bits) if head_bits else head
    maskpack.save(mdir / "task.mask", masks, backbone, extras=stored,
                  metadata={"dataset": "digits", **head_metadata(head["head.weight"], head_bits)})
    (mdir / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "accuracy": 0.5}) + "\n")
    fb = fft_backbone or backbone
    state = {f"backbone.{k}": (v + 1e-3 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v)
             for k, v in fb.model.state_dict().items()}
    state.update(head)
    save_file(state, str(fdir / "model.safetensors"),
              metadata={"backbone": fb.name, "backbone.hash": fb.hash()})
    (fdir / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "accuracy": 0.75}) + "\n")
    return mdir / "task.mask", fdir / "model.safetensors"


def _invoke(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


# ----------------------------------------------------------------------------- existing files


def test_bench_existing_files_table_and_json(tmp_path, tiny_registry):
    mask, ft = _fake_pair(tmp_path, _tiny_backbone())
    out = tmp_path / "res.json"
    res = _invoke(["bench", "--mask", str(mask), "--finetuned", str(ft), "--json", str(out), "-j", "2"])
    assert res.exit_code == 0, res.output
    for text in ("mask bits", "fp32 weights", "ans", "lzma-9", "xor+bytegroup+zstd-19", "reduction",
                 "smaller than the fine-tuned weights, best codec on each side", "paper-style, lzma -9",
                 "whole task, head and BN included", "masks only", ".mask file by part: masks",
                 "LOSSY comparison, the fine-tune rounded to bfloat16",
                 "test accuracy: mask 0.5000, fine-tune 0.7500"):
        assert text in res.output, text
    d = json.loads(out.read_text())
    p = d["whole"]["mask_file_parts"]
    assert p["total"] == (tmp_path / "m" / "task.mask").stat().st_size  # the file, computed from its parts
    assert f"header {p['header']:,} B = {p['total']:,} B" in res.output
    for key in ("whole", "whole_bf16_lossy"):
        assert f"{d['ratios'][key]:.1f}x" in res.output, key
    assert d["backbone"] == TINY and d["accuracy"] == {"mask": 0.5, "fft": 0.75}
    assert d["info"]["workers"] == 2 and d["info"]["total_s"] > 0
    best = min(r["compressed_bytes"] for r in d["fp32"]) / min(r["compressed_bytes"] for r in d["mask"])
    assert d["ratios"]["honest"] == pytest.approx(best)
    assert f"{d['ratios']['honest']:.1f}x smaller" in res.output


def test_bench_measures_a_quantised_head_as_stored(tmp_path, tiny_registry):
    mask, ft = _fake_pair(tmp_path, _tiny_backbone(), head_bits=4)
    out = tmp_path / "res.json"
    res = _invoke(["bench", "--mask", str(mask), "--finetuned", str(ft), "--json", str(out), "-q"])
    assert res.exit_code == 0, res.output
    d = json.loads(out.read_text())
    assert d["whole"]["mask_file_parts"]["total"] == mask.stat().st_size  # not re-encoded as float
    # the head's raw bytes: 10 x 32 weights as 10 x 16 bytes, 10 bfloat16 scales, 10 bfloat16 biases
    assert d["whole"]["mask_extras_bytes"] == 10 * 16 + 10 * 2 + 10 * 2


def test_bench_quiet_and_plot(tmp_path, tiny_registry):
    pytest.importorskip("matplotlib")
    mask, ft = _fake_pair(tmp_path, _tiny_backbone())
    png = tmp_path / "b.png"
    res = _invoke(["bench", "--mask", str(mask), "--finetuned", str(ft), "--plot", str(png), "-q"])
    assert res.exit_code == 0, res.output
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "wrote" not in res.output


def test_bench_plot_without_matplotlib_is_a_clear_error(tmp_path, tiny_registry, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_mpl(name, *a, **k):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_mpl)
    mask, ft = _fake_pair(tmp_path, _tiny_backbone())
    res = CliRunner().invoke(main, ["bench", "--mask", str(mask), "--finetuned", str(ft), "--plot", "x.png"])
    assert res.exit_code == 1
    assert "Error: --plot needs matplotlib: pip install 'maskpack[plot]'" in res.output


def test_bench_bad_inputs(tmp_path, tiny_registry):
    mask, ft = _fake_pair(tmp_path, _tiny_backbone())
    r = CliRunner().invoke(main, ["bench", "--mask", str(mask)])
    assert r.exit_code == 1 and "Error: give both --mask and --finetuned, or neither" in r.output
    r = CliRunner().invoke(main, ["bench", "--mask", str(tmp_path / "no.mask"), "--finetuned", str(ft)])
    assert r.exit_code == 1 and "Error: file not found:" in r.output and "no.mask" in r.output
    r = CliRunner().invoke(main, ["bench", "--mask", str(mask), "--finetuned", str(tmp_path / "none.st")])
    assert r.exit_code == 1 and "Error: file not found:" in r.output
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    r = CliRunner().invoke(main, ["bench", "--mask", str(mask), "--finetuned", str(junk)])
    assert r.exit_code == 1 and "Error:" in r.output and "not a readable safetensors file" in r.output


def test_bench_mismatched_backbones(tmp_path, tiny_registry):
    other = _tiny_backbone()
    with torch.no_grad():
        other.model.conv.weight.add_(1.0)  # same architecture, other weights: another hash
    other._hash = None
    mask, ft = _fake_pair(tmp_path, _tiny_backbone(), fft_backbone=other)
    r = CliRunner().invoke(main, ["bench", "--mask", str(mask), "--finetuned", str(ft)])
    assert r.exit_code == 1
    assert "Error:" in r.output and "compare a mask and a fine-tune of the same backbone" in r.output


def test_bench_fft_of_another_architecture(tmp_path, tiny_registry):
    from safetensors.torch import save_file

    mask, _ = _fake_pair(tmp_path, _tiny_backbone())
    ft = tmp_path / "other.safetensors"
    save_file({"backbone.conv.weight": torch.zeros(8, 3, 3, 3)}, str(ft))
    r = CliRunner().invoke(main, ["bench", "--mask", str(mask), "--finetuned", str(ft)])
    assert r.exit_code == 1
    assert "Error:" in r.output and "different backbones" in r.output


def test_bench_help_has_example():
    r = _invoke(["bench", "--help"])
    assert r.exit_code == 0 and "Example:" in r.output and "--dataset cifar100" in r.output


# ----------------------------------------------------------------------------- training both sides


def test_bench_trains_on_tiny_cifar100(tmp_path, tiny_registry, tiny_cifar100):
    out = tmp_path / "runs"
    js = tmp_path / "c100.json"
    res = _invoke(["bench", "--dataset", "cifar100", "--data-dir", str(tiny_cifar100), "--backbone", TINY,
                   "--epochs", "1", "--image-size", "8", "--batch-size", "4", "--device", "cpu",
                   "--out", str(out), "--json", str(js)])
    assert res.exit_code == 0, res.output
    assert (out / "mask" / "task.mask").exists() and (out / "fft" / "model.safetensors").exists()
    d = json.loads(js.read_text())
    assert d["info"]["dataset"] == "cifar100" and d["info"]["epochs"] == 1
    assert d["accuracy"]["mask"] is not None and d["accuracy"]["fft"] is not None
    assert maskpack.read(out / "mask" / "task.mask").metadata["dataset"] == "cifar100"
    assert "training a mask and a fine-tune on cifar100" in res.output
    # A second run reuses the finished training runs.
    again = _invoke(["bench", "--dataset", "cifar100", "--data-dir", str(tiny_cifar100), "--backbone", TINY,
                     "--epochs", "1", "--image-size", "8", "--batch-size", "4", "--out", str(out), "-q",
                     "--json", str(js)])
    assert again.exit_code == 0, again.output
    d2 = json.loads(js.read_text())
    assert d2["info"]["train_s"] == {"mask": 0.0, "fft": 0.0}
    assert [r["compressed_bytes"] for r in d2["mask"]] == [r["compressed_bytes"] for r in d["mask"]]
    # ... but not when they were trained with other settings.
    other = CliRunner().invoke(main, ["bench", "--dataset", "cifar100", "--data-dir", str(tiny_cifar100),
                                      "--backbone", TINY, "--epochs", "2", "--image-size", "8",
                                      "--batch-size", "4", "--out", str(out)])
    assert other.exit_code == 1 and "was trained with epochs=1, not 2: choose another --out" in other.output


def test_bench_missing_cifar_is_one_clear_error(tmp_path, tiny_registry):
    r = CliRunner().invoke(main, ["bench", "--dataset", "cifar100", "--data-dir", str(tmp_path),
                                  "--backbone", TINY, "--out", str(tmp_path / "r")])
    assert r.exit_code == 1 and f"Error: cifar100 is not in {tmp_path} and downloading is off" in r.output


@pytest.mark.slow
def test_bench_lite0_tiny_cifar100(tmp_path, tiny_cifar100):
    """The real embedded backbone end to end on the CIFAR-100 path (compressing Lite0 takes minutes)."""
    js = tmp_path / "r.json"
    res = _invoke(["bench", "--dataset", "cifar100", "--data-dir", str(tiny_cifar100), "--epochs", "1",
                   "--image-size", "16", "--batch-size", "4", "--device", "cpu",
                   "--out", str(tmp_path / "runs"), "--json", str(js), "-q"])
    assert res.exit_code == 0, res.output
    d = json.loads(js.read_text())
    assert d["backbone"] == "efficientnet_lite0" and d["numel"] > 3_000_000
    assert d["info"]["mask_best"] == "ans"
