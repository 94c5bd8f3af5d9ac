"""maskpack.save / read / load: round trips, backbone binding, laziness, atomic writes."""

import os

import pytest
import torch
from torch import nn

import maskpack
from maskpack.errors import BackboneMismatchError, CodecError, ConfigError, FormatError
from maskpack.masking import select_parameters
from maskpack.rehydrate import TaskHost, rehydrate
from maskpack.storage import available_codecs
from maskpack.storage.container import VERSION


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


def _rename(path, new_names: dict[str, str]) -> None:
    """Rename tensors in a file's header (checksums and offsets stay valid)."""
    import json
    import struct
    import zlib

    data = path.read_bytes()
    hlen = struct.unpack("<I", data[10:14])[0]
    header = json.loads(zlib.decompress(data[18:18 + hlen], -15))
    for t in header["tensors"]:
        t["name"] = new_names.get(t["name"], t["name"])
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    hdr = c.compress(json.dumps(header).encode()) + c.flush()
    preamble = struct.pack("<8sHII", data[:8], VERSION, len(hdr), zlib.crc32(hdr))
    path.write_bytes(preamble + hdr + data[18 + hlen:])


def test_prefixed_names_decode_against_the_backbone_tensor(tmp_path, tiny_net):
    # a cascade stores expert masks as "expert<k>/<name>": the backbone tensor is the last part
    masks = _masks(tiny_net)
    for codec in ("ans", "raw"):
        path = tmp_path / f"{codec}.mask"
        maskpack.save(path, masks, tiny_net, codec=codec)
        _rename(path, {"conv1.weight": "expert1/conv1.weight", "fc.weight": "a/b/fc.weight"})
        got = maskpack.read(path).masks(tiny_net)
        assert list(got) == ["expert1/conv1.weight", "dw.weight", "a/b/fc.weight"]
        assert torch.equal(got["expert1/conv1.weight"], masks["conv1.weight"])
        assert torch.equal(got["a/b/fc.weight"], masks["fc.weight"])


def test_ans_contexts_are_cached_per_backbone(tmp_path, tiny_net):
    from maskpack import io

    other = type(tiny_net)()  # same names, other weights
    ma, mb = _masks(tiny_net, 0), _masks(other, 1)
    maskpack.save(tmp_path / "a.mask", ma, tiny_net)
    maskpack.save(tmp_path / "b.mask", mb, other)
    maskpack.save(tmp_path / "z.mask", ma, tiny_net, codec="zstd")
    io._CONTEXTS.clear()
    maskpack.read(tmp_path / "z.mask").masks(tiny_net)
    assert io._CONTEXTS == {}  # only ans needs contexts
    maskpack.read(tmp_path / "a.mask").masks(tiny_net)
    first = dict(io._CONTEXTS)
    ha, hb = maskpack.backbone_hash(tiny_net), maskpack.backbone_hash(other)
    assert set(first) == {(ha, n) for n in ma}
    got = maskpack.read(tmp_path / "a.mask").masks(tiny_net)
    assert all(io._CONTEXTS[k] is first[k] for k in first)  # computed once, reused
    assert all(torch.equal(got[n], ma[n]) for n in ma)
    got = maskpack.read(tmp_path / "b.mask").masks(other)
    assert set(io._CONTEXTS) == {(hb, n) for n in mb}  # one backbone at a time
    assert all(torch.equal(got[n], mb[n]) for n in mb)
    # without the hash check nothing is cached under a guessed key: each backbone gets its own
    io._CONTEXTS.clear()
    for path, net, m in (("a", tiny_net, ma), ("b", other, mb), ("a", tiny_net, ma)):
        got = maskpack.read(tmp_path / f"{path}.mask").masks(net, check_hash=False)
        assert all(torch.equal(got[n], m[n]) for n in m)
    assert io._CONTEXTS == {}


def test_verify_checks_what_it_can_without_the_backbone(tmp_path, tiny_net):
    masks, extras = _masks(tiny_net), _extras(tiny_net)
    maskpack.save(tmp_path / "a.mask", masks, tiny_net, extras=extras)
    maskpack.read(tmp_path / "a.mask").verify(tiny_net)
    # a tensor payload replaced by other bytes of the same length (checksum updated): only
    # decoding can tell, which needs the backbone for ans
    data = bytearray((tmp_path / "a.mask").read_bytes())
    mf = maskpack.read(tmp_path / "a.mask")
    t = mf.tensors[0]
    start = mf._info.data_offset + t.offset
    data[start + 1:start + t.length] = bytes(t.length - 1)
    (tmp_path / "b.mask").write_bytes(bytes(data))
    _rename_crc(tmp_path / "b.mask", 0)
    bad = maskpack.read(tmp_path / "b.mask")
    bad.verify()  # checksums and extras are fine
    with pytest.raises((CodecError, FormatError), match="ans payload|active entries"):
        bad.verify(tiny_net)
    # raw needs no backbone: verify() decodes
    maskpack.save(tmp_path / "r.mask", masks, tiny_net, codec="raw", extras=extras)
    _rename(tmp_path / "r.mask", {"fc.weight": "nope.weight"})
    maskpack.read(tmp_path / "r.mask").verify()
    with pytest.raises(FormatError, match="mask 'nope.weight'"):
        maskpack.read(tmp_path / "r.mask").verify(tiny_net)
    with pytest.raises(FormatError, match="checksum mismatch in extras"):
        _corrupt_extras(tmp_path / "r.mask").verify()


def _rename_crc(path, index: int) -> None:
    """Recompute the crc32 of tensor ``index`` in the header after its payload was changed."""
    import json
    import struct
    import zlib

    data = path.read_bytes()
    hlen = struct.unpack("<I", data[10:14])[0]
    header = json.loads(zlib.decompress(data[18:18 + hlen], -15))
    t = header["tensors"][index]
    body = data[18 + hlen:]
    t["crc32"] = zlib.crc32(body[t["offset"]:t["offset"] + t["length"]])
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    hdr = c.compress(json.dumps(header).encode()) + c.flush()
    path.write_bytes(struct.pack("<8sHII", data[:8], VERSION, len(hdr), zlib.crc32(hdr)) + hdr + body)


def _corrupt_extras(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # the extras blob is last
    path.write_bytes(bytes(data))
    return maskpack.read(path)


def test_mask_file_summary(tmp_path, tiny_net):
    masks = _masks(tiny_net)
    masks["fc.weight"][:] = False
    maskpack.save(tmp_path / "t.mask", masks, tiny_net)
    mf = maskpack.read(tmp_path / "t.mask")
    assert mf.version == 2 and mf.file_size == os.path.getsize(tmp_path / "t.mask")
    assert mf.header["codec"] == "ans" and [t["name"] for t in mf.header["tensors"]] == list(masks)
    assert mf.numel == sum(m.numel() for m in masks.values())
    layer = mf.per_layer_active()
    assert layer["fc.weight"] == 0.0
    assert layer["conv1.weight"] == pytest.approx(float(masks["conv1.weight"].float().mean()))
    assert repr(mf).startswith(f"MaskFile({str(tmp_path / 't.mask')!r}, backbone='TinyNet', codec='ans'")
    maskpack.save(tmp_path / "e.mask", {}, tiny_net)
    empty = maskpack.read(tmp_path / "e.mask")
    assert empty.active_fraction == 1.0 and empty.per_layer_active() == {}


def test_save_refuses_extras_and_metadata_of_the_wrong_type(tmp_path, tiny_net):
    masks = _masks(tiny_net)
    with pytest.raises(ConfigError, match="extras must map names to tensors; got 'head.weight': list"):
        maskpack.save(tmp_path / "x.mask", masks, tiny_net, extras={"head.weight": [1.0, 2.0]})
    with pytest.raises(ConfigError, match="extras must map names to tensors; got 3: Tensor"):
        maskpack.save(tmp_path / "x.mask", masks, tiny_net, extras={3: torch.zeros(2)})
    with pytest.raises(ConfigError, match=r"metadata must map strings to strings; got 'acc': float "
                                          r"\(convert values with str\(\)\)"):
        maskpack.save(tmp_path / "x.mask", masks, tiny_net, metadata={"acc": 0.9})
    assert not os.listdir(tmp_path)


def test_bfloat16_backbone_round_trips_with_ans(tmp_path, tiny_net):
    net = tiny_net.to(torch.bfloat16)
    masks = _masks(net)
    maskpack.save(tmp_path / "b.mask", masks, net)  # contexts are |W| in float32 whatever the dtype
    got = maskpack.read(tmp_path / "b.mask").masks(net)
    assert all(torch.equal(got[n], masks[n]) for n in masks)


def test_task_host_errors_and_scale(tmp_path, tiny_net):
    masks = _masks(tiny_net)
    maskpack.save(tmp_path / "u.mask", masks, tiny_net, metadata={"mask.scale": "false"})
    host = TaskHost(tiny_net)
    assert not host.model.training and not any(p.requires_grad for p in host.model.parameters())
    model = maskpack.io.load_task_into(host, tmp_path / "u.mask")
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(model(x), rehydrate(tiny_net, masks, scale=False)(x))
    other = TaskHost(type(tiny_net)())
    with pytest.raises(BackboneMismatchError, match="the given backbone '<TaskHost backbone>' has sha256"):
        maskpack.io.load_task_into(other, tmp_path / "u.mask")


def test_save_messages_are_exact(tmp_path, tiny_net):
    masks = _masks(tiny_net)
    cases = [
        (lambda: maskpack.save(tmp_path / "x.mask", masks, "TinyNet"), ConfigError,
         "backbone must be a maskpack.Backbone or an nn.Module, got str"),
        (lambda: maskpack.save(tmp_path / "x.mask", list(masks.values()), tiny_net), ConfigError,
         "masks must be a dict of name -> BoolTensor, got list"),
        (lambda: maskpack.save(tmp_path / "x.mask", {"fc.weight": [[True]]}, tiny_net), FormatError,
         "mask 'fc.weight' must be a torch.bool tensor, got list"),
        (lambda: maskpack.save(tmp_path / "x.mask", {"fc.weight": masks["fc.weight"].float()}, tiny_net),
         FormatError, "mask 'fc.weight' must be a torch.bool tensor, got torch.float32"),
    ]
    for call, err, message in cases:
        with pytest.raises(err) as info:
            call()
        assert str(info.value) == message


def test_save_uses_the_backbone_contexts_and_the_level(tmp_path, tiny_net):
    masks = _masks(tiny_net)
    # ans: the conv weights' |W| buckets predict the mask, so more than one bucket is used
    w = tiny_net.conv1.weight.detach().abs()
    masks["conv1.weight"] = w < w.flatten().median()
    maskpack.save(tmp_path / "a.mask", masks, tiny_net)
    mf = maskpack.read(tmp_path / "a.mask")
    blob = mf._data()[mf.tensors[0].offset:mf.tensors[0].offset + mf.tensors[0].length]
    assert blob[0] > 0 and torch.equal(mf.masks(tiny_net)["conv1.weight"], masks["conv1.weight"])
    big = nn.Sequential(nn.Linear(512, 256, bias=False))
    g = torch.Generator().manual_seed(0)
    big_masks = {"0.weight": torch.rand(256, 512, generator=g) < 0.05}
    files = {}
    for level in (1, None, 19):
        maskpack.save(tmp_path / f"z{level}.mask", big_masks, big, codec="zstd", level=level)
        files[level] = (tmp_path / f"z{level}.mask").read_bytes()
    assert files[None] == files[19] and files[1] != files[19]  # the level reaches the codec


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_per_layer_active_of_an_empty_tensor(tmp_path):
    net = nn.Sequential(nn.Linear(0, 4, bias=False), nn.Linear(4, 2, bias=False))
    masks = {"0.weight": torch.zeros(4, 0, dtype=torch.bool),
             "1.weight": torch.tensor([[1, 0, 0, 0]] * 2) > 0}
    maskpack.save(tmp_path / "e.mask", masks, net, codec="raw")
    mf = maskpack.read(tmp_path / "e.mask")
    assert mf.per_layer_active() == {"0.weight": 1.0, "1.weight": 0.25}
    assert mf.active_fraction == 0.25


def test_header_is_utf8_json(tmp_path, tiny_net):
    import json
    import struct
    import zlib

    maskpack.save(tmp_path / "u.mask", _masks(tiny_net), tiny_net, metadata={"note": "Zürich ✓"})
    data = (tmp_path / "u.mask").read_bytes()
    text = zlib.decompress(data[18:18 + struct.unpack("<I", data[10:14])[0]], -15)
    assert "Zürich ✓".encode() in text and b"\\u" not in text  # UTF-8, not \u escapes
    assert json.loads(text)["metadata"]["note"] == "Zürich ✓"
    assert maskpack.read(tmp_path / "u.mask").metadata["note"] == "Zürich ✓"
