"""head_bits: a per-class int8 / int4 head, stored as the trainer evaluated it."""

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import maskpack
from maskpack.cli import main, parse_set
from maskpack.errors import ConfigError, FormatError
from maskpack.extras import (
    dequantize_head,
    head_metadata,
    pack_int4,
    quantize_head,
    stored_extras,
    unpack_int4,
)
from maskpack.rehydrate import TaskHost, rehydrate
from maskpack.train import TrainConfig, resolve_config, run


def _task(tmp_path, bits, width, dtype="bfloat16", classes=5):
    """A task over a tiny linear backbone with ``width`` features: (path, backbone, float head)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, width))
    head = {"head.weight": torch.randn(classes, width) * 0.1, "head.bias": torch.randn(classes)}
    head["head.weight"][1] = 0.0  # a row of zeros: scale 1
    masks = {"1.weight": torch.rand(width, 12) < 0.8}
    path = tmp_path / f"h{bits}-{width}.mask"
    maskpack.save(path, masks, net, extras=stored_extras(head, dtype, bits),
                  metadata=head_metadata(head["head.weight"], bits))
    return path, net, masks, head


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("width", [7, 8])
def test_quantised_head_round_trips_exactly(tmp_path, bits, width):
    path, net, masks, head = _task(tmp_path, bits, width)
    q, scale = quantize_head(head["head.weight"], bits, "bfloat16")
    want = dequantize_head(q, scale)
    qmax = 2 ** (bits - 1) - 1
    assert int(q.abs().max()) == qmax and torch.equal(scale[1], torch.tensor(1.0))
    assert (want - head["head.weight"]).abs().max() <= scale.max() / 2 * 1.01  # at most half a step
    stored = maskpack.read(path).read_extras(dequantize=False)
    assert stored["head.weight"].dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert stored["head.weight"].shape == (5, width if bits == 8 else (width + 1) // 2)
    assert stored["head.weight_scale"].dtype == torch.bfloat16
    assert torch.equal(stored["head.weight_scale"].float(), scale)
    mf = maskpack.read(path)
    assert mf.metadata == {"head.bits": str(bits), "head.in_features": str(width)}
    assert set(mf.extras) == {"head.weight", "head.bias"}
    assert torch.equal(mf.extras["head.weight"], want)
    # every loader builds the same head: load, rehydrate, a TaskHost switch
    x = torch.randn(4, 3, 2, 2)
    loaded = maskpack.load(path, net)
    assert torch.equal(loaded.head.weight, want)
    ref = rehydrate(net, masks, {"head.weight": want, "head.bias": head["head.bias"].bfloat16().float()})
    with torch.no_grad():
        assert torch.equal(loaded(x), ref(x))
        host = TaskHost(net)
        assert torch.equal(maskpack.io.load_task_into(host, path)(x), ref(x))
    # quantising the dequantised head again gives the same values and scales
    q2, scale2 = quantize_head(want, bits, "bfloat16")
    assert torch.equal(q2, q) and torch.equal(scale2, scale)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("bits", [8, 4])
def test_quantisation_is_exact_and_idempotent_over_magnitudes(dtype, bits):
    torch.manual_seed(1)
    w = torch.randn(300, 9) * torch.logspace(-6, 3, 300)[:, None]
    q, scale = quantize_head(w, bits, dtype)
    d = dequantize_head(q, scale)
    assert torch.equal(dequantize_head(q.double(), scale.double()).float(), d)  # q * scale is exact
    assert torch.equal(scale.to(getattr(torch, dtype)).float(), scale)  # scales are values of dtype
    qmax = 2 ** (bits - 1) - 1
    normal = w.abs().amax(dim=1) / qmax >= torch.finfo(getattr(torch, dtype)).tiny
    assert 0 < int(normal.sum()) < 300 if dtype == "float16" else bool(normal.all())
    assert (q.abs().amax(dim=1)[normal] == qmax).all()  # a row with a normal scale uses the whole range
    q2, scale2 = quantize_head(d, bits, dtype)
    assert torch.equal(q2, q) and torch.equal(scale2, scale)


def test_int4_packing_is_pinned():
    q = torch.tensor([[-7, 7, 0], [1, -1, 3]], dtype=torch.int8)
    packed = pack_int4(q)
    # low nibble: column 2j, high nibble: column 2j + 1, each q + 8; odd width pads with 8 (q = 0)
    assert packed.tolist() == [[0xF1, 0x88], [0x79, 0x8B]]
    assert torch.equal(unpack_int4(packed, 3), q)


def _rewrite(tmp_path, path, net, extras, metadata):
    out = tmp_path / "bad.mask"
    mf = maskpack.read(path)
    maskpack.save(out, mf.masks(net), net, extras=extras, metadata=metadata)
    return maskpack.read(out)


def _drop(key):
    def damage(extras, meta):
        (meta if key.startswith("meta:") else extras).pop(key.removeprefix("meta:"))
    return damage


def _set(key, value):
    def damage(extras, meta):
        if key.startswith("meta:"):
            meta[key.removeprefix("meta:")] = value
        else:
            extras[key] = value(extras[key]) if callable(value) else value
    return damage


def _poke(index, value):
    def damage(extras, meta):
        w = extras["head.weight"]
        w[index] = value(w[index]) if callable(value) else value
    return damage


def _damaged(tmp_path, bits, damage):
    """A task file whose stored head extras or metadata ``damage`` changed, read back."""
    path, net, _, _ = _task(tmp_path, bits, 7)
    extras = maskpack.read(path).read_extras(dequantize=False)
    meta = dict(maskpack.read(path).metadata)
    damage(extras, meta)
    return _rewrite(tmp_path, path, net, extras, meta), net


def _zero_scale(extras, meta):
    extras["head.weight_scale"][2] = 0


@pytest.mark.parametrize("damage, msg", [
    (_drop("head.weight_scale"), "'head.weight' is stored as torch.int8 \\(a 8-bit head\\) but "
                                 "'head.weight_scale' is missing"),
    (_set("head.weight_scale", lambda s: s[:4]), "'head.weight_scale' is torch.bfloat16 \\(4,\\), but a "
                                                 "\\(5, 7\\) torch.int8 'head.weight' needs one float scale "
                                                 "a class \\(5,\\)"),
    (_zero_scale, "'head.weight_scale' holds a zero, negative or non-finite scale"),
    (_drop("meta:head.bits"), "metadata 'head.bits' is None"),
    (_set("meta:head.in_features", "9"), "metadata 'head.in_features' '9' does not fit the 8-bit "
                                         "'head.weight' of shape \\(5, 7\\)"),
    # a digit to str.isdigit, not to int()
    (_set("meta:head.in_features", "\u00b2"), "metadata 'head.in_features' '\u00b2' does not fit"),
    # finite, but 127 x 1e37 is not
    (_set("head.weight_scale", torch.full((5,), 1e37)), "'head.weight_scale' overflows float32 times "
                                                        "'head.weight'"),
    (_poke((0, 0), -128), "'head.weight' holds values outside the symmetric 8-bit range"),
    (_set("head.weight", lambda w: w.to(torch.int16)), "'head.weight' has dtype torch.int16"),
    (_set("head.weight", lambda w: w.float()), "'head.weight_scale' or metadata 'head.bits' without an "
                                               "integer 'head.weight'"),
], ids=["no scale", "scale shape", "scale zero", "no bits", "width", "width text", "scale huge", "-128",
        "int16", "float with scale"])
def test_damaged_int8_heads_are_refused(tmp_path, damage, msg):
    mf, net = _damaged(tmp_path, 8, damage)
    with pytest.raises(FormatError, match=msg):
        _ = mf.extras
    with pytest.raises(FormatError, match=msg):
        maskpack.load(mf.path, net)


@pytest.mark.parametrize("damage, msg", [
    (_drop("head.weight_scale"), "'head.weight' is stored as torch.uint8 \\(a 4-bit head\\) but "
                                 "'head.weight_scale' is missing"),
    (_poke((1, 0), lambda b: b & 0xF0), "outside the symmetric 4-bit range or non-zero padding"),
    (_poke((0, -1), lambda b: (b & 0x0F) | 0x90), "outside the symmetric 4-bit range or non-zero padding"),
    (_set("meta:head.in_features", "5"), "metadata 'head.in_features' '5' does not fit the 4-bit "
                                         "'head.weight' of shape \\(5, 4\\)"),
    (_set("meta:head.bits", "8"), "'head.weight' is torch.uint8 \\(a 4-bit head\\) but metadata "
                                  "'head.bits' is '8'"),
], ids=["no scale", "nibble 0", "padding", "width", "bits 8"])
def test_damaged_int4_heads_are_refused(tmp_path, damage, msg):
    mf, _ = _damaged(tmp_path, 4, damage)
    with pytest.raises(FormatError, match=msg):
        _ = mf.extras


def test_stored_head_is_not_loaded_raw(tmp_path):
    path, net, masks, _ = _task(tmp_path, 8, 7)
    raw = maskpack.read(path).read_extras(dequantize=False)
    with pytest.raises(FormatError, match="'head.weight' \\(torch.int8\\) is a quantised head as stored"):
        rehydrate(net, masks, raw)
    with pytest.raises(FormatError, match="is a quantised head as stored"):
        TaskHost(net).switch_(masks, raw)


@pytest.mark.parametrize("value, msg", [
    (3, "head_bits 3: use 8 or 4"), (16, "head_bits 16: use 8 or 4"), ("4", "head_bits '4': use 8 or 4"),
    (True, "head_bits True: use 8 or 4"),
])
def test_head_bits_config_is_validated(value, msg):
    with pytest.raises(ConfigError, match=msg):
        resolve_config(TrainConfig(head_bits=value))


def test_head_bits_config_values():
    assert resolve_config(TrainConfig(**parse_set(("head_bits=4",)))).head_bits == 4
    assert resolve_config(TrainConfig(head_bits=8)).head_bits == 8
    assert resolve_config(TrainConfig(head_bits=0)).head_bits is None
    # the default recipe's supervised masks store an int8 head; other recipes, methods and
    # objectives none unless asked
    assert resolve_config(TrainConfig()).head_bits == 8
    assert resolve_config(TrainConfig(recipe="normalized")).head_bits is None
    assert resolve_config(TrainConfig(method="topk")).head_bits is None
    assert resolve_config(TrainConfig(method="fft")).head_bits is None
    assert resolve_config(TrainConfig(objective="swav")).head_bits is None
    assert resolve_config(TrainConfig(**parse_set(("head_bits=0",)))).head_bits is None
    with pytest.raises(ConfigError, match="head_bits 8 quantises the head of a supervised mask task .* "
                                          "not method 'fft' objective 'supervised'"):
        resolve_config(TrainConfig(head_bits=8, method="fft"))
    with pytest.raises(ConfigError, match="not method 'mask' objective 'swav'"):
        resolve_config(TrainConfig(head_bits=4, objective="swav"))


@pytest.mark.parametrize("bits", [8, 4])
def test_trained_task_stores_the_evaluated_head(tmp_path, bits):
    r = run(TrainConfig(dataset="digits", image_size=16, batch_size=32, epochs=1,
                        train_indices=list(range(96)), quiet=True, threads=1, eval_every=0,
                        eval_knn="never", bn_reestimate_batches=2, head_bits=bits, keep_checkpoint=True,
                        out=str(tmp_path / "run")))
    mf = maskpack.read(r.task_path)
    assert mf.metadata["head.bits"] == str(bits) and mf.metadata["head.in_features"] == "1280"
    stored = mf.read_extras(dequantize=False)
    assert stored["head.weight"].dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert stored["head.bias"].dtype == torch.bfloat16  # the bias follows extras_dtype
    bb = maskpack.load_backbone()
    loaded = maskpack.load(r.task_path, bb)
    assert torch.equal(loaded.head.weight, r.model.head.weight)
    assert torch.equal(r.extras["head.weight"], r.model.head.weight.detach())
    # the head the run evaluated takes only 2^bits - 1 values a class
    assert max(len(row.unique()) for row in r.model.head.weight.detach()) <= 2 ** bits - 1
    x = torch.randn(6, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), r.model.eval()(x))
        assert torch.equal(maskpack.io.load_task_into(TaskHost(bb), r.task_path)(x), r.model(x))
    # the finished checkpoint packs to the same file; repacking keeps the head quantised
    ckpt = tmp_path / "run" / "checkpoint.pt"
    res = CliRunner().invoke(main, ["pack", str(ckpt), "-o", str(tmp_path / "p.mask")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "p.mask").read_bytes() == r.task_path.read_bytes()
    res = CliRunner().invoke(main, ["pack", str(r.task_path), "-o", str(tmp_path / "r.mask"),
                                    "--codec", "zstd"])
    assert res.exit_code == 0, res.output
    assert maskpack.read(tmp_path / "r.mask").read_extras(dequantize=False)["head.weight"].dtype == \
        stored["head.weight"].dtype
