"""Hostile .mask files cost what their size (or the caller's backbone) allows, refused with our
errors before anything big is inflated, parsed or decoded; the backbone hash is never stale; the
one atomic writer gives umask modes and cleans up after killed writes."""

import importlib.util
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch
import zstandard
from click.testing import CliRunner
from torch import nn

import maskpack
from maskpack.backbones import Backbone
from maskpack.errors import BackboneMismatchError, FormatError
from maskpack.rehydrate import TaskHost
from maskpack.storage import atomic, codecs, container, header

ROOT = Path(__file__).resolve().parents[1]
HASH = "ab" * 32


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 4, bias=False), nn.Conv2d(4, 2, 3, bias=False))


def _pack(chunks, body: bytes = b"") -> bytes:
    """A file from header text (bytes, or an iterable of chunks for big ones) with a valid crc."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15, 9)
    hdr = b"".join(c.compress(ch) for ch in ([chunks] if isinstance(chunks, bytes) else chunks)) + c.flush()
    return struct.pack("<8sHII", container.MAGIC, container.VERSION, len(hdr), zlib.crc32(hdr)) + hdr + body



def _read_refused(path, match: str) -> None:
    """maskpack.read(path) raises FormatError matching ``match``, and the message names the file."""
    with pytest.raises(FormatError, match=match) as info:
        maskpack.read(path)
    assert str(info.value).startswith(f"{path}: "), str(info.value)

def _file(path: Path, tensors, codec: str = "zstd", metadata=None, bb_hash: str = HASH) -> Path:
    """Write a file whose entries tile its data: tensors are (name, shape, active, payload)."""
    entries, body = [], b""
    for name, shape, active, payload in tensors:
        entries.append({"name": name, "shape": shape, "active": active, "offset": len(body),
                        "length": len(payload), "crc32": zlib.crc32(payload)})
        body += payload
    h = {"backbone": {"name": "x", "sha256": bb_hash}, "codec": codec, "tensors": entries, "extras": None,
         "metadata": metadata or {}}
    path.write_bytes(_pack(json.dumps(h).encode(), body))
    return path


def _zstd_zeros(nbytes: int) -> bytes:
    c = zstandard.ZstdCompressor(level=1, write_content_size=True).compressobj(size=nbytes)
    step = b"\0" * (1 << 20)
    return b"".join(c.compress(step) for _ in range(nbytes >> 20)) + c.flush()


@pytest.fixture
def no_decoding(monkeypatch):
    """Any payload decode fails the test: limits must be checked before decompressing."""
    def boom(*a, **k):
        raise RuntimeError("a payload was decoded")

    monkeypatch.setattr(codecs.Codec, "decode", boom)


# ------------------------------------------------------------- 1: decoded size without a backbone


def test_huge_shape_without_backbone_is_refused_before_decompressing(tmp_path, no_decoding):
    # 2^28 zero bits: a valid 8 kB zstd payload that would decode to 300 MB
    p = _file(tmp_path / "z.mask", [("w", [1 << 28], 0, _zstd_zeros(1 << 25))])
    mf = maskpack.read(p)
    with pytest.raises(FormatError, match="268,435,456 elements in total, more than the limit 134,217,728"):
        mf.masks()
    with pytest.raises(FormatError, match="pass max_elements=268435456"):
        mf.verify()


def test_max_elements_is_the_callers_to_raise(tmp_path):
    g = torch.Generator().manual_seed(0)
    m = torch.rand(1000, generator=g) < 0.3
    p = _file(tmp_path / "z.mask", [("w", [1000], int(m.sum()), codecs.get_codec("zstd").encode(m.numpy()))])
    with pytest.raises(FormatError, match="declare 1,000 elements in total, more than the limit 999"):
        maskpack.read(p).masks(max_elements=999)
    assert torch.equal(maskpack.read(p).masks(max_elements=1000)["w"], m)


def test_payload_too_small_for_its_shape_is_refused_by_read(tmp_path):
    p = _file(tmp_path / "z.mask", [("w", [1 << 32], 0, _zstd_zeros(1 << 20)[:40])])
    _read_refused(p, "4294967296 elements, but a 40-byte zstd payload holds at most")


@pytest.mark.parametrize("codec", ["raw", "gzip", "lz4", "snappy", "zstd"])
def test_codec_expansion_bounds_hold_for_the_most_compressible_mask(codec):
    cod = codecs.get_codec(codec)
    zeros = torch.zeros(1 << 23, dtype=torch.bool).numpy()
    level = cod.levels[1] if cod.levels else None
    payload = cod.encode(zeros, level=level)
    assert zeros.size <= cod.max_elements(len(payload)) < 40 * zeros.size


def test_masks_must_fit_the_backbone_before_any_is_decoded(tmp_path, no_decoding):
    net = _net()
    ok = codecs.get_codec("zstd").encode(torch.ones(4, 8, dtype=torch.bool).numpy().ravel())
    p = _file(tmp_path / "f.mask", [("0.weight", [4, 8], 32, ok), ("expert1/1.weight", [2, 4, 3, 4], 0, ok)],
              bb_hash=maskpack.backbone_hash(net))
    with pytest.raises(FormatError, match=r"mask 'expert1/1.weight' \[2, 4, 3, 4\] does not fit the"):
        maskpack.read(p).masks(net)
    g = _file(tmp_path / "g.mask", [("0.weight", [4, 8], 32, ok)], bb_hash=maskpack.backbone_hash(net))
    with pytest.raises(FormatError, match="declare 32 elements in total, more than the limit 31"):
        maskpack.read(g).masks(net, max_elements=31)


def test_cascade_loader_has_the_same_budget(tmp_path, no_decoding):
    from maskpack.cascade import FORMAT, FORMAT_VERSION, load_cascade

    net = nn.Sequential(nn.Linear(2048, 2048, bias=False))  # 4M weights: the limit is 2^27 = 32 copies
    empty = b"\x00\x00"  # ans: one bucket, no ones
    k = 40
    tensors = [("0.weight", [2048, 2048], 0, empty)] + [(f"expert{i}/0.weight", [2048, 2048], 0, empty)
                                                       for i in range(1, k + 1)]
    meta = {"cascade.format": FORMAT, "cascade.version": FORMAT_VERSION, "cascade.experts": str(k),
            "cascade.modes": "unconditional"}
    p = _file(tmp_path / "c.mask", tensors, codec="ans", metadata=meta, bb_hash=maskpack.backbone_hash(net))
    with pytest.raises(FormatError, match="171,966,464 elements in total, more than the limit 134,217,728"):
        load_cascade(p, net)


# ------------------------------------------------------------------- 2: header limits while parsing


def test_header_bomb_is_refused_before_parsing(tmp_path, monkeypatch):
    # 60 MB of "[]," in about 58 kB: refused after inflating at most 64 x its size + 1.25 MiB
    def no_parse(*a, **k):
        raise RuntimeError("the header was parsed")

    monkeypatch.setattr(json, "loads", no_parse)
    step = b"[]," * (1 << 20)
    p = tmp_path / "h.mask"
    p.write_bytes(_pack([b'{"tensors":['] + [step] * 19 + [b"[]]}"]))
    assert len(p.read_bytes()) < 100_000
    _read_refused(p, "header is oversized: it inflates past 4,194,304 bytes")


def test_inflate_limit_grows_with_the_compressed_size():
    assert header.inflate_limit(1000) == 64 * 1000 + header.HEADER_SLACK
    assert header.inflate_limit(10 << 20) == header.MAX_HEADER_JSON == 4 << 20


def test_many_metadata_keys_are_refused_while_parsing(tmp_path):
    p = _file(tmp_path / "k.mask", [], metadata={f"k{i}": "" for i in range(5000)})
    _read_refused(p, "header has an object with 5000 keys, more than the limit 1024")


def test_duplicate_keys_are_refused(tmp_path):
    text = json.dumps({"backbone": {"name": "x", "sha256": HASH}, "codec": "raw", "tensors": [],
                       "extras": None, "metadata": {}})
    p = tmp_path / "d.mask"
    p.write_bytes(_pack(('{"codec":"zstd",' + text[1:]).encode()))
    _read_refused(p, "header repeats the key 'codec'")


@pytest.mark.parametrize("value,match", [("1" + "0" * 30, "31-digit number, more than the limit 20"),
                                         ("1e5", "number '1e5': header numbers are integers"),
                                         ("NaN", "number 'NaN': header numbers are integers")])
def test_header_numbers_are_small_integers(tmp_path, value, match):
    text = ('{"backbone":{"name":"x","sha256":"' + HASH + '"},"codec":"raw","tensors":[{"name":"a","shape":['
            + value + '],"active":0,"offset":0,"length":0,"crc32":0}],"extras":null,"metadata":{}}')
    p = tmp_path / "n.mask"
    p.write_bytes(_pack(text.encode()))
    _read_refused(p, match)


def test_tensor_count_is_limited(tmp_path):
    p = _file(tmp_path / "t.mask", [(f"t{i}", [0], 0, b"") for i in range(16385)], codec="raw")
    _read_refused(p, "header lists 16385 tensors, more than the limit 16384")


def test_metadata_size_and_text_limits(tmp_path):
    m = tmp_path / "m.mask"
    _read_refused(_file(m, [], metadata={"k": "v" * (1 << 20)}), "metadata holds 1048577 bytes of text")
    _read_refused(_file(m, [], metadata={"k": "\ud800"}), "not valid Unicode text")
    _read_refused(_file(m, [], metadata={"x" * 257: ""}), "header has a key of 257 characters, more than")


def test_metadata_at_its_limits_is_written_and_read(tmp_path):
    net = _net()
    meta = {f"{i:0256d}": "v" * ((1 << 20) // 1024 - 256) for i in range(1024)}  # compresses ~1000x
    maskpack.save(tmp_path / "ok.mask", {"0.weight": torch.ones(4, 8, dtype=torch.bool)}, net, metadata=meta)
    assert maskpack.read(tmp_path / "ok.mask").metadata == meta
    with pytest.raises(FormatError, match="metadata holds 1048577 bytes"):
        maskpack.save(tmp_path / "no.mask", {}, net, metadata={**meta, "0" * 256: "v" * 769})


# -------------------------------------------------------------------------- 3: a hash never stale


def test_backbone_hash_sees_weights_changed_in_place(tmp_path):
    net = _net()
    bb = Backbone("tiny", net, 2, 8, (0.5,) * 3, (0.5,) * 3)
    h0, before = bb.hash(), net[0].weight.detach().clone()
    maskpack.save(tmp_path / "t.mask", {"0.weight": torch.ones(4, 8, dtype=torch.bool)}, bb)
    with torch.no_grad():
        net[0].weight.add_(1)
    with pytest.raises(BackboneMismatchError, match=f"sha256 {h0}.*has sha256 {bb.hash()}"):
        maskpack.load(tmp_path / "t.mask", bb)
    with torch.no_grad():
        net[0].weight.copy_(before)
    assert bb.hash() == h0
    net[1].weight.data.mul_(2)  # .data bypasses the autograd version counter
    assert bb.hash() != h0
    with pytest.raises(BackboneMismatchError, match="load it with the backbone it was trained on"):
        maskpack.read(tmp_path / "t.mask").masks(bb)


def test_task_host_refuses_a_backbone_changed_in_place(tmp_path):
    net = _net()
    maskpack.save(tmp_path / "t.mask", {"0.weight": torch.ones(4, 8, dtype=torch.bool)}, net)
    host = TaskHost(net)
    maskpack.io.load_task_into(host, tmp_path / "t.mask")
    with torch.no_grad():
        host.model.backbone[1].weight.add_(1)  # a tensor no task touched
    with pytest.raises(BackboneMismatchError, match="TaskHost backbone"):
        maskpack.io.load_task_into(host, tmp_path / "t.mask")


# ------------------------------------------------------------------------------ 4: the one writer


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002, 0o077])
def test_written_files_get_the_umask_mode(tmp_path, umask):
    old = os.umask(umask)
    try:
        maskpack.save(tmp_path / "t.mask", {"0.weight": torch.ones(4, 8, dtype=torch.bool)}, _net())
        atomic.write_atomic(tmp_path / "b.bin", b"x")
        atomic.atomic_write(tmp_path / "c.txt", lambda tmp: Path(tmp).write_text("y"))
    finally:
        os.umask(old)
    for name in ("t.mask", "b.bin", "c.txt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    assert sorted(os.listdir(tmp_path)) == ["b.bin", "c.txt", "t.mask"]


def test_temp_file_is_named_for_its_destination(tmp_path):
    seen = []

    def write(tmp: str) -> None:
        seen.append(tmp)
        Path(tmp).write_bytes(b"data")

    atomic.atomic_write(tmp_path / "task.mask", write)
    assert os.path.dirname(seen[0]) == str(tmp_path)
    name = os.path.basename(seen[0])
    assert re.fullmatch(rf"\.task\.mask\.maskpack-{os.getpid()}-[0-9a-f]{{8}}\.tmp", name)
    assert (tmp_path / "task.mask").read_bytes() == b"data" and not os.path.exists(seen[0])


def _killed_write(folder: Path) -> Path:
    code = ("import importlib.util, os, signal, sys\n"  # the writer alone: no torch import, quick
            "spec = importlib.util.spec_from_file_location('atomic', sys.argv[2])\n"
            "atomic = sys.modules['atomic'] = importlib.util.module_from_spec(spec)\n"
            "spec.loader.exec_module(atomic)\n"
            "def w(tmp):\n    open(tmp, 'wb').write(b'x' * 100)\n    os.kill(os.getpid(), signal.SIGKILL)\n"
            "atomic.atomic_write(sys.argv[1], w)\n")
    r = subprocess.run([sys.executable, "-c", code, str(folder / "t.mask"), atomic.__file__], timeout=120)
    assert r.returncode == -signal.SIGKILL
    (left,) = [folder / n for n in os.listdir(folder)]
    return left


def test_a_killed_write_leaves_a_temp_file_that_the_next_write_removes(tmp_path):
    left = _killed_write(tmp_path)
    assert re.fullmatch(r"\.t\.mask\.maskpack-\d+-[0-9a-f]{8}\.tmp", left.name)
    (lo,) = atomic.leftover_temp_files(tmp_path)
    assert lo.path == str(left) and lo.size == 100 and not lo.owner_alive and not lo.stale
    mine = tmp_path / f".x.maskpack-{os.getpid()}-0000abcd.tmp"  # a live writer's: kept
    mine.write_bytes(b"")
    old = time.time() - 2 * atomic.STALE_DEAD_PID_S
    os.utime(left, (old, old))
    os.utime(mine, (old, old))
    atomic.write_atomic(tmp_path / "other.bin", b"y")
    assert sorted(os.listdir(tmp_path)) == sorted([mine.name, "other.bin"])
    older = time.time() - 2 * atomic.STALE_ANY_S
    os.utime(mine, (older, older))
    assert atomic.clean_stale_temp_files(tmp_path) == [str(mine)]


def test_verify_reports_leftover_temp_files(tmp_path, lite0):
    from maskpack.cli import main

    masks = {"_conv_stem.weight": torch.ones(32, 3, 3, 3, dtype=torch.bool)}
    maskpack.save(tmp_path / "t.mask", masks, lite0, codec="zstd")
    (tmp_path / ".t.mask.maskpack-999999999-0123abcd.tmp").write_bytes(b"x" * 10)
    r = CliRunner().invoke(main, ["verify", str(tmp_path / "t.mask")])
    assert r.exit_code == 0, r.output
    assert re.search(r"warning: leftover temp file of an interrupted write: .*\.t\.mask\.maskpack-999999999-"
                     r"0123abcd\.tmp \(10 bytes, .*its writer is gone: safe to delete", r.output)
    assert "OK:" in r.output


# ---------------------------------------------------------------------------------- fuzz subset


def test_fuzz_subset_raises_only_documented_errors():
    spec = importlib.util.spec_from_file_location("fuzz", ROOT / "bench" / "fuzz.py")
    fuzz = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fuzz)
    tally = fuzz.run(80, seed=0, fork=False, heavy=False)
    assert tally["cases"] == 80 and not tally["other"], fuzz.summary(tally)
    assert sum(tally["refused"].values()) > 60 and set(tally["by_family"]) == set(fuzz.FAMILIES)
