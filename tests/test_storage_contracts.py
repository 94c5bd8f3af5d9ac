"""Narrow promises of the storage layer, each checked on its own: the general codecs on raw bytes
(as `maskpack bench` uses them), the temp-file owner check, and the entropy helpers' inputs."""

import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from maskpack.errors import CodecError
from maskpack.storage import atomic, available_codecs, get_codec
from maskpack.storage.entropy import conditional_entropy_bits

GENERAL = [c for c in available_codecs() if c != "ans"]


@pytest.mark.parametrize("name", GENERAL)
def test_general_codecs_round_trip_bytes_at_each_level(name):
    codec = get_codec(name)
    data = bytes(range(256)) * 40 + b"tail"
    for level in (None, codec.check_level(None)):
        stored = codec.compress(data, level)
        assert codec.decompress(stored, len(data)) == data
        if name != "raw":
            assert len(stored) < len(data)  # it did compress: the codec's encoder ran on the data
    assert codec.decompress(codec.compress(b""), 0) == b""


def test_compress_uses_the_level_it_is_given():
    zstd = get_codec("zstd")
    data = np.random.default_rng(0).integers(0, 4, 200_000, dtype=np.uint8).tobytes()
    fast, best = zstd.compress(data, 1), zstd.compress(data, 19)
    assert len(best) < len(fast)
    with pytest.raises(CodecError, match=r"^codec 'zstd' takes levels 1\.\.22, got 99$"):
        zstd.compress(data, 99)


def test_raw_compress_is_the_identity():
    raw = get_codec("raw")
    assert raw.compress(b"\x01\x02\x03") == b"\x01\x02\x03"
    assert raw.decompress(memoryview(b"\x01\x02"), 2) == b"\x01\x02"


def test_decompress_caps_its_output_at_the_declared_size():
    zstd = get_codec("zstd")
    stored = zstd.compress(b"\x00" * 1000)
    with pytest.raises(CodecError, match="^zstd payload declares 1000 bytes, expected 10$"):
        zstd.decompress(stored, 10)


def test_ans_codes_masks_only_with_an_exact_message():
    ans = get_codec("ans")
    with pytest.raises(CodecError) as info:
        ans.compress(b"abc")
    assert str(info.value) == "codec 'ans' codes masks only; compress bytes with a general codec"
    with pytest.raises(CodecError) as info:
        ans.decompress(b"abc", 3)
    assert str(info.value) == "codec 'ans' codes masks only; decompress bytes with a general codec"


def test_pid_alive_tells_live_dead_and_impossible_pids_apart():
    # default signal actions (a parent run under nohup would make the child ignore SIGHUP)
    code = "import signal, time; [signal.signal(s, signal.SIG_DFL) for s in (1, 2, 15)]; time.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        assert atomic._pid_alive(child.pid)
        with pytest.raises(subprocess.TimeoutExpired):  # asking did not signal it: it still runs
            child.wait(timeout=0.5)
    finally:
        child.kill()
        child.wait()
    assert not atomic._pid_alive(child.pid)  # reaped: the pid is free
    assert atomic._pid_alive(os.getpid()) and atomic._pid_alive(1)
    assert not atomic._pid_alive(0) and not atomic._pid_alive(-5)
    assert not atomic._pid_alive(1 << 40)  # beyond pid_t


def test_conditional_entropy_reads_any_truthy_array_as_a_mask():
    rng = np.random.default_rng(0)
    absw = rng.random(4096).astype(np.float32)
    mask = absw > 0.3
    as_ints = mask.astype(np.int64) * 3  # 0 / 3: truthy, not 0 / 1
    assert conditional_entropy_bits(as_ints, absw, 4) == conditional_entropy_bits(mask, absw, 4)
    assert conditional_entropy_bits(mask.reshape(64, 64), absw, 4) == conditional_entropy_bits(mask, absw, 4)


def _bucket_cases():
    rng = np.random.default_rng(7)
    absw = rng.random(20000).astype(np.float32)
    cases = {"ramp": (absw > rng.random(20000) ** 0.3, absw),
             "independent": (rng.random(20000) > 0.05, absw),
             "weak": (rng.random(20000) > 0.05 + 0.04 * absw, absw),
             "step": (absw > 0.02, absw),
             "small": (rng.random(50) > 0.5, absw[:50]),
             "ones": (np.ones(5000, bool), absw[:5000]),
             "ties": (rng.random(4096) > 0.3, np.repeat(np.float32([0.1, 0.2, 0.3, 0.4]), 1024))}
    for n, s in ((2000, 0.4), (4000, 0.2)):
        g = np.random.default_rng(3)
        a = g.random(n).astype(np.float32)
        cases[f"linear-{n}"] = (g.random(n) > s * a, a)
    return cases


# (log2 of the bucket count the encoder chose, payload bytes), recorded 2026-11-28 for payload
# layout 1: the encoder picks the count that minimises entropy + the counts' bits in the stream,
# so a change to that cost shows up here. (Layout 0, with LEB128 counts, gave 1185, 708, 905
# (1 bucket fewer for "weak"), 177, 14, 3, 455, 181 and 237 bytes.)
CHOSEN = {"ramp": (4, 1177), "independent": (0, 705), "weak": (2, 901), "step": (4, 149), "small": (0, 13),
          "ones": (0, 5), "ties": (0, 453), "linear-2000": (2, 177), "linear-4000": (2, 233)}


@pytest.mark.parametrize("name", list(CHOSEN))
def test_ans_chooses_the_bucket_count_with_the_smallest_cost(name):
    from maskpack.storage.entropy import TensorContexts, decode_mask, encode_mask

    mask, absw = _bucket_cases()[name]
    payload = encode_mask(mask, TensorContexts(absw))
    assert (payload[0], len(payload)) == (0x10 | CHOSEN[name][0], CHOSEN[name][1])
    assert np.array_equal(decode_mask(payload, mask.size, TensorContexts(absw)), mask)


def test_leftovers_are_listed_oldest_first_with_their_owner(tmp_path):
    now = time.time()
    files = {".a.mask.maskpack-1-aaaa.tmp": now - 30,         # pid 1: alive
             f".b.mask.maskpack-{os.getpid()}-bbbb.tmp": now,  # this process: alive, fresh
             ".c.mask.maskpack-cccc.tmp": now - 7200}          # no pid (mkstemp naming), old
    for name, mtime in files.items():
        (tmp_path / name).write_bytes(b"x" * 3)
        os.utime(tmp_path / name, (mtime, mtime))
    (tmp_path / "target").write_bytes(b"")
    (tmp_path / ".d.mask.maskpack-dddd.tmp").symlink_to(tmp_path / "target")  # not a file of its own
    (tmp_path / ".e.mask.maskpack-eeee.tmp").mkdir()
    got = atomic.leftover_temp_files(tmp_path)
    assert [os.path.basename(x.path) for x in got] == list(files)[::-1][:1] + list(files)[:2]  # c, a, b
    c, a, b = got
    assert (c.pid, c.owner_alive, c.stale) == (None, False, True)
    assert (a.pid, a.owner_alive, a.stale) == (1, True, False)
    assert (b.owner_alive, b.stale, b.size) == (True, False, 3) and b.age_s < 0.5


def test_temp_names_are_retried_not_reused(tmp_path, monkeypatch):
    tokens = iter(["0000", "0000", "1111"])
    monkeypatch.setattr(atomic.secrets, "token_hex", lambda n: next(tokens))
    first, fd = atomic._temp_path(str(tmp_path), "t.mask")
    os.write(fd, b"kept")
    os.close(fd)
    second, fd = atomic._temp_path(str(tmp_path), "t.mask")  # "0000" exists: the next token is tried
    os.close(fd)
    assert first != second and second.endswith("-1111.tmp")
    assert open(first, "rb").read() == b"kept"
    monkeypatch.setattr(atomic.secrets, "token_hex", lambda n: "0000")
    full = f"^could not create a temp file in {re.escape(str(tmp_path))}$"
    with pytest.raises(FileExistsError, match=full):
        atomic._temp_path(str(tmp_path), "t.mask")


def test_decode_extras_checks_the_callers_limit_itself():
    from maskpack.storage import container

    blob = bytes(range(200))
    stored = container.encode_extras(blob)
    entry = container.ExtrasEntry(0, len(stored), 0, size=len(blob))
    assert container.decode_extras(stored, entry, "f.mask", len(blob)) == blob
    with pytest.raises(Exception, match=r"^f\.mask: extras declare 200 bytes, more than the limit 199: "):
        container.decode_extras(stored, entry, "f.mask", len(blob) - 1)


def test_reading_a_header_leaves_the_garbage_collector_as_it_was(tmp_path):
    import gc

    import maskpack
    from maskpack.storage import container

    data = container.build(backbone_name="n", backbone_hash="0" * 64, codec="raw", tensors=[], extras=None,
                           metadata={"k": "v"})
    (tmp_path / "e.mask").write_bytes(data)
    assert gc.isenabled()
    assert maskpack.read(tmp_path / "e.mask").metadata == {"k": "v"}
    assert gc.isenabled()
    gc.disable()
    try:
        maskpack.read(tmp_path / "e.mask")
        assert not gc.isenabled()
    finally:
        gc.enable()
