"""maskpack.save / read / load: round trips, backbone binding, laziness, atomic writes."""

import os

import pytest
import torch

import maskpack
from maskpack.errors import BackboneMismatchError, CodecError, ConfigError, FormatError
from maskpack.masking import select_parameters
from maskpack.rehydrate import TaskHost, rehydrate
from maskpack.storage import available_codecs


def _masks(net, seed=0, keep=0.8):
    g = torch.Generator().manual_seed(seed)
    return {name: torch.rand(getattr(mod, p).shape, generator=g) < keep
            for name, mod, p in select_parameters(net)}


def _extras(net):
    return {"head.weight": torch.randn(5, 16), "head.bias": torch.randn(5),
            "backbone.bn1.running_mean": torch.randn(8), "backbone.bn1.num_batches_tracked": torch.tensor(7),
            "backbone.bn2.running_var": torch.rand(8).to(torch.float16).float()}


@pytest.mark.parametrize("codec", available_codecs())
def test_roundtrip_every_codec(tmp_path, tiny_net, codec):
    masks, extras = _masks(tiny_net), _extras(tiny_net)
    path = tmp_path / "t.mask"
    maskpack.save(path, masks, tiny_net, extras=extras, metadata={"dataset": "digits"}, codec=codec)
    mf = maskpack.read(path)
    assert mf.codec == codec and mf.backbone_hash == maskpack.backbone_hash(tiny_net)
    assert mf.backbone_name == "TinyNet" and mf.metadata == {"dataset": "digits"}
    got = mf.masks(tiny_net)
    assert list(got) == list(masks) and all(torch.equal(got[k], masks[k]) for k in masks)
    assert set(mf.extras) == set(extras)
    for k, v in extras.items():
        assert mf.extras[k].dtype == v.dtype and torch.equal(mf.extras[k], v)
    assert mf.active_fraction == pytest.approx(
        sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values()))


def test_masks_without_backbone(tmp_path, tiny_net):
    masks = _masks(tiny_net)
    maskpack.save(tmp_path / "z.mask", masks, tiny_net, codec="zstd")
    assert torch.equal(maskpack.read(tmp_path / "z.mask").masks()["fc.weight"], masks["fc.weight"])
    maskpack.save(tmp_path / "a.mask", masks, tiny_net, codec="ans")
    with pytest.raises(FormatError, match="needs the backbone"):
        maskpack.read(tmp_path / "a.mask").masks()


@pytest.mark.parametrize("scale", [True, False])
def test_load_equals_rehydrate(tmp_path, tiny_net, scale):
    masks, extras = _masks(tiny_net), _extras(tiny_net)
    maskpack.save(tmp_path / "t.mask", masks, tiny_net, extras=extras,
                  metadata={"mask.scale": "true" if scale else "false"})
    model = maskpack.load(tmp_path / "t.mask", tiny_net)
    ref = rehydrate(tiny_net, masks, extras, scale=scale)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(model(x), ref(x))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values(),
                                                 strict=True))


def test_backbone_mismatch_names_both_hashes(tmp_path, tiny_net):
    maskpack.save(tmp_path / "t.mask", _masks(tiny_net), tiny_net)
    other = type(tiny_net)()
    with pytest.raises(BackboneMismatchError) as info:
        maskpack.load(tmp_path / "t.mask", other)
    msg = str(info.value)
    assert maskpack.backbone_hash(tiny_net) in msg and maskpack.backbone_hash(other) in msg
    assert "'TinyNet'" in msg and info.value.backbone_name == "TinyNet"
    assert info.value.expected == maskpack.backbone_hash(tiny_net)


def test_save_rejects_bad_input(tmp_path, tiny_net):
    masks = _masks(tiny_net)
    with pytest.raises(FormatError, match="names no tensor"):
        maskpack.save(tmp_path / "x.mask", {"nope.weight": masks["fc.weight"]}, tiny_net)
    with pytest.raises(FormatError, match="shape"):
        maskpack.save(tmp_path / "x.mask", {"fc.weight": masks["fc.weight"].T}, tiny_net)
    with pytest.raises(FormatError, match="torch.bool"):
        maskpack.save(tmp_path / "x.mask", {"fc.weight": masks["fc.weight"].float()}, tiny_net)
    with pytest.raises(ConfigError, match="strings"):
        maskpack.save(tmp_path / "x.mask", masks, tiny_net, metadata={"acc": 0.9})
    with pytest.raises(CodecError, match="unknown codec"):
        maskpack.save(tmp_path / "x.mask", masks, tiny_net, codec="brotli")
    with pytest.raises(CodecError, match="levels"):
        maskpack.save(tmp_path / "x.mask", masks, tiny_net, codec="gzip", level=99)
    assert not os.listdir(tmp_path)


def test_atomic_write_keeps_old_file(tmp_path, tiny_net, monkeypatch):
    path = tmp_path / "t.mask"
    maskpack.save(path, _masks(tiny_net), tiny_net)
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        maskpack.save(path, _masks(tiny_net, seed=1), tiny_net)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["t.mask"]


def test_bad_scale_metadata(tmp_path, tiny_net):
    maskpack.save(tmp_path / "t.mask", _masks(tiny_net), tiny_net, metadata={"mask.scale": "maybe"})
    with pytest.raises(FormatError, match="mask.scale"):
        maskpack.load(tmp_path / "t.mask", tiny_net)


def test_task_host_switching(tmp_path, tiny_net):
    a, b = _masks(tiny_net, 0), _masks(tiny_net, 1, keep=0.5)
    ea, eb = _extras(tiny_net), _extras(tiny_net)
    maskpack.save(tmp_path / "a.mask", a, tiny_net, extras=ea)
    maskpack.save(tmp_path / "b.mask", b, tiny_net, extras=eb)
    host = TaskHost(tiny_net)
    x = torch.randn(2, 3, 8, 8)
    for path, m, e in [("a", a, ea), ("b", b, eb), ("a", a, ea)]:
        model = maskpack.io.load_task_into(host, tmp_path / f"{path}.mask")
        assert torch.equal(model(x), rehydrate(tiny_net, m, e)(x))


def test_real_lite0_roundtrip(tmp_path, lite0):
    masks = _masks(lite0.model, keep=0.9)
    extras = {"head.weight": torch.randn(10, 1280), "head.bias": torch.zeros(10)}
    maskpack.save(tmp_path / "l.mask", masks, lite0, extras=extras, metadata={"mask.scale": "true"})
    mf = maskpack.read(tmp_path / "l.mask")
    assert mf.backbone_name == "efficientnet_lite0" and len(mf.tensors) == len(masks)
    model = maskpack.load(tmp_path / "l.mask")  # the backbone named in the file
    ref = rehydrate(lite0, masks, extras)
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(model(x), ref(x))
