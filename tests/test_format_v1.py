"""Files of format version 1 keep loading: pinned files written by the version-1 writer
(tests/data/format-v1), and the rules that tell the two versions apart."""

import hashlib
import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from mask_files import (
    deflate,
    fixed_masks,
    fixed_net,
    pack_file,
    read_file,
    refused,
    rewrite_header,
    save_good,
    split_file,
)
from test_storage_codecs import _golden_case

import maskpack
from maskpack.cli import main
from maskpack.storage import container
from maskpack.storage.codecs import get_codec

V1 = Path(__file__).parent / "data" / "format-v1"

# What tests/data/format-v1/ans-extras.mask holds (written by the version-1 writer, 2026-11-28).
V1_EXTRAS = {
    "head.weight": (torch.arange(6.0).reshape(2, 3) / 7).to(torch.bfloat16),
    "head.bias": torch.tensor([0.5, -1.25], dtype=torch.bfloat16),
    "backbone.bn.running_var": torch.linspace(0.1, 3, 5).to(torch.bfloat16),
    "backbone.bn.num_batches_tracked": torch.tensor(7),
}
# sha256 of the pinned files: the version-1 writer's bytes, never to be rewritten (the payloads'
# digests are the ones the version-1 tests pinned for the same masks)
V1_SHA256 = {
    "ans-extras.mask": "fbd4f00eb418d4d72d8389632a50fbe11f9ecfc35dc403960849989cb348c808",
    "raw.mask": "514403b5b66ec16d105323ecf36ae88d9f794bded168b60ac69de693f26fdb44",
    "ans-payload-100000-11-0.0-1.0-3.bin": "2878974ed21fe8f4a04f309eef9d59bb3dbe8596d2bdf75529347fdaca7e875d",
    "ans-payload-100000-8-0.001-0.01-1.bin":
        "78c24b1743cd481fb0d61101396797e199ab18138b03724bde4d338d50581a69",
    "ans-payload-20000-5-0.0-0.6-1.bin": "4459b7e7f965586e601c98728b21569a512455e27e7a9aa39f4bec358f477ef9",
    "ans-payload-20000-6-0.4-0.2-1.bin": "6f0e451acb406afa068401e2c886c2f5bd1136f08ceec73ebb375b361323a00f",
    "ans-payload-5000-3-0.02-0.3-1.bin": "92b2dd4da2e8dffa832d83c7b1209a6099ca98cca4d527abc490e998ad133662",
}


def test_pinned_files_are_the_version_1_bytes():
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in V1.iterdir()} == V1_SHA256


@pytest.mark.parametrize("name,codec", [("raw.mask", "raw"), ("ans-extras.mask", "ans")])
def test_version_1_files_load(name, codec):
    mf = maskpack.read(V1 / name)
    assert (mf.version, mf.codec, mf.metadata) == (1, codec, {"k": "v"})
    assert V1.joinpath(name).read_bytes()[8:10] == b"\x01\x00"
    masks = mf.masks(fixed_net())
    assert list(masks) == list(fixed_masks())
    for key, expected in fixed_masks().items():
        assert torch.equal(masks[key], expected)
    mf.verify(fixed_net())  # every checksum, the extras and the masks: raises on any problem


def test_version_1_extras_keep_their_values():
    mf = maskpack.read(V1 / "ans-extras.mask")
    assert mf._info.extras.planes == 4  # version 1: always 4 byte planes
    extras = mf.read_extras()
    assert set(extras) == set(V1_EXTRAS)
    for key, expected in V1_EXTRAS.items():
        assert extras[key].dtype == expected.dtype and torch.equal(extras[key], expected)


def test_version_1_file_rewritten_as_version_2_keeps_everything(tmp_path):
    old = maskpack.read(V1 / "ans-extras.mask")
    maskpack.save(tmp_path / "new.mask", old.masks(fixed_net()), fixed_net(), codec="ans",
                  extras=old.read_extras(), metadata=old.metadata)
    new = maskpack.read(tmp_path / "new.mask")
    assert new.version == container.VERSION == 2
    assert new._info.extras.planes in container.PLANE_WIDTHS
    for key, mask in old.masks(fixed_net()).items():
        assert torch.equal(new.masks(fixed_net())[key], mask)
    for key, value in old.read_extras().items():
        assert torch.equal(new.read_extras()[key], value)
    assert all(get_codec("ans").encode(m.numpy().ravel(), None)[0] >> 4 == 1
               for m in new.masks(fixed_net()).values())


def test_cli_reads_version_1():
    res = CliRunner().invoke(main, ["inspect", str(V1 / "ans-extras.mask")])
    assert res.exit_code == 0, res.output
    assert "format v1, codec ans" in res.output


@pytest.mark.parametrize("path", sorted(V1.glob("ans-payload-*.bin")), ids=lambda p: p.stem)
def test_ans_layout_0_payloads_decode(path):
    """Payloads of the version-1 writer (LEB128 counts before the ANS words) decode to their masks."""
    n, seed, base, slope, power = path.stem.removeprefix("ans-payload-").split("-")
    mask, absw = _golden_case(int(n), int(seed), float(base), float(slope), int(power))
    payload = path.read_bytes()
    assert payload[0] >> 4 == 0  # layout 0
    np.testing.assert_array_equal(get_codec("ans").decode(payload, mask.size, absw), mask)
    # and the current writer's layout-1 payload of the same mask is no larger
    assert len(get_codec("ans").encode(mask, absw)) <= len(payload)


def test_version_2_extras_need_their_planes(tmp_path):
    good = save_good(tmp_path)
    assert split_file(good)[0]["extras"]["planes"] in container.PLANE_WIDTHS
    with refused(tmp_path, r"extras must be an object with keys \['crc32', 'length', 'offset', "
                           r"'planes', 'size'\]"):
        read_file(tmp_path, rewrite_header(good, lambda h: h["extras"].pop("planes")))
    for bad in (3, 8, 0, "2", None, True):  # (a float is refused by the header parser itself)
        with refused(tmp_path, f"extras planes must be one of \\[1, 2, 4\\], got {bad!r}"):
            read_file(tmp_path, rewrite_header(good, lambda h, b=bad: h["extras"].update(planes=b)))


def test_version_1_extras_have_no_planes(tmp_path):
    data = (V1 / "ans-extras.mask").read_bytes()
    header, section = split_file(data)
    header["extras"]["planes"] = 4
    bad = pack_file(deflate(json.dumps(header).encode()), section, version=1)
    with refused(tmp_path, r"extras must be an object with keys \['crc32', 'length', 'offset', 'size'\]"):
        read_file(tmp_path, bad)


@pytest.mark.parametrize("planes", container.PLANE_WIDTHS)
def test_extras_round_trip_in_every_plane_width(planes):
    blob = bytes(range(256)) * 3 + b"\x07" * 5  # not a multiple of any width
    stored = container.encode_extras(blob, planes)
    entry = container.ExtrasEntry(0, len(stored), zlib.crc32(stored), len(blob), planes)
    assert container.decode_extras(stored, entry, "x.mask", 1 << 20) == blob


def test_writer_keeps_the_smallest_plane_width():
    # bfloat16 values: 2 planes beat 4 and 1; float32 values: 4 planes win
    rng = np.random.default_rng(0)
    bf16 = torch.from_numpy(rng.standard_normal(4096).astype(np.float32)).to(torch.bfloat16)
    f32 = torch.from_numpy(rng.standard_normal(4096).astype(np.float32))
    for tensor, width in ((bf16, 2), (f32, 4)):
        blob = tensor.contiguous().view(torch.uint8).numpy().tobytes()
        stored, chosen = container.pack_extras(blob)
        sizes = {w: len(container.encode_extras(blob, w)) for w in container.PLANE_WIDTHS}
        assert chosen == width and len(stored) == min(sizes.values()) == sizes[width]
