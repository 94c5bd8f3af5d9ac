"""The LoRA baseline of ``maskpack bench --lora``: targets, the adapter file, the CLI end to end.

A tiny registry backbone (conv, depthwise conv, pointwise conv, each with BN) keeps the runs and
the compression at milliseconds; digits at 32 px, one epoch of two steps.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from maskpack import backbones
from maskpack.cli import main
from maskpack.errors import BackboneMismatchError, ConfigError, FormatError

TINY = "tiny_lora"


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn_dw = nn.BatchNorm2d(8)
        self.pw = nn.Conv2d(8, 16, 1, bias=False)
        self.bn_pw = nn.BatchNorm2d(16)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = torch.relu(self.bn_dw(self.dw(x)))
        return torch.relu(self.bn_pw(self.pw(x))).mean((2, 3))


def _tiny_backbone(seed: int = 0) -> backbones.Backbone:
    torch.manual_seed(seed)
    net = _Tiny().eval().requires_grad_(False)
    return backbones.Backbone(TINY, net, 16, 32, (0.5,) * 3, (0.25,) * 3)


@pytest.fixture
def peft():
    return pytest.importorskip("peft")


@pytest.fixture
def tiny_registry(monkeypatch):
    real = backbones.load_backbone

    def load(name=backbones.DEFAULT_BACKBONE, *, weights=None):
        return _tiny_backbone() if name == TINY else real(name, weights=weights)

    monkeypatch.setattr(backbones, "load_backbone", load)


def _bench(out, js, *extra):
    args = ["bench", "--backbone", TINY, "--dataset", "digits", "--image-size", "32", "--epochs", "1",
            "--max-steps", "2", "--batch-size", "8", "--device", "cpu", "--out", str(out), "--json", str(js)]
    return CliRunner().invoke(main, [*args, *extra])


def test_targets_skip_grouped_convs(peft):
    from maskpack.compare.lora import lora_targets

    net = _tiny_backbone().copy_model()
    assert lora_targets(net, "all") == (["conv", "pw"], ["dw"])
    assert lora_targets(net, "last:2") == (["pw"], ["dw"])
    with pytest.raises(ConfigError, match="no layer of 're:dw' can take a LoRA"):
        lora_targets(net, "re:dw")


def test_lora_starts_as_the_backbone_and_trains_only_adapters(peft):
    from maskpack.compare.lora import apply_lora_

    bb = _tiny_backbone()
    net = apply_lora_(bb.copy_model(), ["conv", "pw"], 2)
    x = torch.randn(2, 3, 12, 12)
    torch.testing.assert_close(net.eval()(x), bb.model(x))  # B starts at zero: no change yet
    trainable = sorted(n for n, p in net.named_parameters() if p.requires_grad)
    assert trainable == ["conv.lora_A.default.weight", "conv.lora_B.default.weight",
                         "pw.lora_A.default.weight", "pw.lora_B.default.weight"]
    with pytest.raises(ConfigError, match="LoRA rank must be at least 1, got 0"):
        apply_lora_(bb.copy_model(), ["pw"], 0)


def test_adapter_file_round_trips(peft, tmp_path, tiny_registry):
    from maskpack.compare.lora import adapter_bytes, adapter_state, apply_lora_, load_lora
    from maskpack.model import TaskModel

    bb = _tiny_backbone()
    net = apply_lora_(bb.copy_model(), ["conv", "pw"], 2)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "lora_B" in n:
                p.normal_()
        net.bn_pw.running_mean.add_(0.5)
    model = TaskModel(net, nn.Linear(16, 10)).eval()
    state = adapter_state(model, ["bn_pw"])
    assert "backbone.bn_pw.running_var" in state and "backbone.bn.running_mean" not in state
    meta = {"backbone": TINY, "backbone.hash": bb.hash(), "lora.rank": "2", "lora.alpha": "4",
            "lora.targets": json.dumps(["conv", "pw"])}
    path = tmp_path / "adapter.safetensors"
    path.write_bytes(adapter_bytes(state, meta))
    assert adapter_bytes(state, meta) == path.read_bytes()  # deterministic
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(load_lora(path)(x), model(x))
    with pytest.raises(BackboneMismatchError, match="adapts backbone 'tiny_lora'"):
        load_lora(path, _tiny_backbone(seed=1))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(FormatError, match="junk.safetensors is not a readable safetensors file"):
        load_lora(junk)
    from safetensors.torch import save_file

    save_file({"head.weight": torch.zeros(2, 2)}, str(junk))
    with pytest.raises(FormatError, match="junk.safetensors is not a maskpack LoRA adapter"):
        load_lora(junk)


def test_bench_lora_row_and_reuse(peft, tmp_path, tiny_registry):
    out, js = tmp_path / "runs", tmp_path / "res.json"
    res = _bench(out, js, "--lora", "2")
    assert res.exit_code == 0, res.output
    assert "and a LoRA of rank 2 into" in res.output and "LoRA r=2" in res.output
    d = json.loads(js.read_text())
    lo = d["lora"]
    assert lo["rank"] == 2 and lo["targets"] == ["conv", "pw"] and lo["skipped"] == ["dw"]
    assert lo["raw_bytes"] == (out / "lora" / "adapter.safetensors").stat().st_size > 0
    assert 0 < lo["best_bytes"] <= lo["raw_bytes"] and lo["best_method"] in [r["method"] for r in lo["rows"]]
    assert 0.0 <= lo["accuracy"] <= 1.0 and d["accuracy"]["lora"] == lo["accuracy"]
    assert d["info"]["train_s"]["lora"] > 0
    from maskpack.compare import BenchResult

    assert BenchResult.from_dict(d).to_dict()["lora"] == lo  # the JSON re-reads (e.g. to re-plot)
    # a second run reuses the finished LoRA (and says so) ...
    again = _bench(out, js, "--lora", "2")
    assert again.exit_code == 0, again.output
    d2 = json.loads(js.read_text())
    assert d2["info"]["train_s"]["lora"] == 0.0 and d2["lora"]["raw_bytes"] == lo["raw_bytes"]
    assert d2["lora"]["accuracy"] == lo["accuracy"]
    # ... but not one of another rank
    other = _bench(out, js, "--lora", "3")
    assert other.exit_code == 1
    assert f"Error: {out / 'lora'} holds a LoRA of rank 2, not 3: choose another --out" in other.output


def test_bench_lora_without_peft_is_one_clear_error(tmp_path, monkeypatch, tiny_registry):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError
    res = _bench(tmp_path / "runs", tmp_path / "r.json", "--lora", "8")
    assert res.exit_code == 1
    assert "Error: --lora needs PEFT: pip install 'maskpack[lora]' (or pip install peft)" in res.output
    assert not (tmp_path / "runs").exists()  # refused before any training


def test_bench_lora_refuses_existing_files(tmp_path):
    res = CliRunner().invoke(main, ["bench", "--mask", "a.mask", "--finetuned", "b.mask", "--lora", "2"])
    assert res.exit_code == 1
    assert "Error: --lora trains beside the mask and the fine-tune it trains" in res.output
    bad = CliRunner().invoke(main, ["bench", "--lora", "0"])
    assert bad.exit_code == 2 and "0 is not in the range x>=1" in bad.output
