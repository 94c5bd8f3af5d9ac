"""Fuzz the ``.mask`` reader: mutated real files of every codec and hand-made lies from the spec.

Each case is a file handed to the calls a user makes: ``read``, ``verify()`` without a backbone
(it decodes the masks of every codec but ``ans``), ``masks(backbone)``, ``extras``. A case ends
"accepted" or with the first exception. The tally counts outcomes by exception type; anything
that is not a ``MaskpackError`` is a finding, and so is a case over the time or memory limit.

Each case runs in a forked child of one prepared process (so imports and the seed files are
paid once): the child resets its peak-RSS counter (``/proc/self/clear_refs``), runs the calls
and reports its CPU seconds, wall seconds and peak RSS above its own starting RSS. The child's
address space is capped a few GiB above its start so that a reader without limits fails with
MemoryError instead of exhausting the machine.

Families: ``truncate`` (at every header boundary and at random), ``flip`` (random bits
anywhere), ``payload`` (bits flipped inside a payload or the extras, checksum fixed so decoders
see the damage), ``header`` (structured edits of the header JSON: wrong types, huge or negative
numbers, swapped codecs, overlapping offsets, ...), ``text`` (byte edits of the header text,
checksum fixed) and ``lie`` (huge shapes with valid payloads, decompression bombs, header bombs,
millions of keys, deep nesting, duplicated keys, extras bombs, ...).

    .venv/bin/python bench/fuzz.py --cases 2000 --seed 0
    .venv/bin/python bench/fuzz.py --cases 200 --json fuzz.json --no-lies
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import resource
import sys
import tempfile
import time
import traceback
import zlib
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import maskpack  # noqa: E402
from maskpack.errors import MaskpackError  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fuzz_lies import HEAVY, LIES, pack, split  # noqa: E402

CODECS = ("raw", "gzip", "bz2", "lzma", "lz4", "snappy", "zstd", "ans")
FAMILIES = ("truncate", "flip", "payload", "header", "text", "lie")
WEIGHTS = (2, 2, 3, 4, 2, 2)
AS_HEADROOM = 2 << 30  # child address-space cap above its starting size


class SeedNet(nn.Module):
    """The backbone of the seed files: convs, BN, a depthwise conv and a linear layer (~27k weights)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.dw = nn.Conv2d(32, 32, 3, groups=32, bias=False)
        self.conv2 = nn.Conv2d(32, 64, 3, bias=False)
        self.fc = nn.Linear(64, 100)


def seed_backbone() -> nn.Module:
    torch.manual_seed(0)
    return SeedNet().eval()


def seed_files(bb: nn.Module) -> dict[str, bytes]:
    """A real file of every codec over ``bb``: masks of varied density, extras and metadata."""
    g = torch.Generator().manual_seed(0)
    weights = {n: p for n, p in bb.named_parameters() if p.dim() > 1}
    density = (0.9, 0.5, 0.97, 0.2)
    masks = {n: torch.rand(p.shape, generator=g) < d
             for (n, p), d in zip(weights.items(), density, strict=True)}
    extras = {"head.weight": torch.randn(10, 64, generator=g), "head.bias": torch.zeros(10),
              "backbone.bn1.running_mean": torch.randn(32, generator=g)}
    meta = {"dataset": "digits", "classes": json.dumps([f"c{i}" for i in range(10)]), "mask.scale": "true"}
    out = {}
    with tempfile.TemporaryDirectory() as d:
        for codec in CODECS:
            p = os.path.join(d, f"{codec}.mask")
            maskpack.save(p, masks, bb, extras=extras, metadata=meta, codec=codec)
            out[codec] = Path(p).read_bytes()
    out["raw-v1"] = as_version_1(out["raw"])
    return out


def as_version_1(data: bytes) -> bytes:
    """The same file in format version 1 (extras in 4 byte planes, no ``planes`` key): the old
    reading path gets fuzzed too."""
    from maskpack.storage import container

    h, hlen, body = split(data)
    e = h["extras"]
    entry = container.ExtrasEntry(0, 0, 0, e["size"], e.pop("planes"))
    blob = container.decode_extras(body[e["offset"]:e["offset"] + e["length"]], entry, "seed", 1 << 30)
    stored = container.encode_extras(blob, 4)
    e.update(length=len(stored), crc32=zlib.crc32(stored))
    text = json.dumps(h, separators=(",", ":")).encode()
    return pack(text, body[:e["offset"]] + stored, version=1)


# ----------------------------------------------------------------------------------- families


def _boundaries(data: bytes) -> list[int]:
    header, hlen, _ = split(data)
    base = 18 + hlen
    cuts = [0, 1, 7, 8, 9, 10, 13, 14, 17, 18, 19, base - 1, base, len(data) - 1]
    for t in header["tensors"]:
        cuts += [base + t["offset"], base + t["offset"] + t["length"] - 1]
    if header["extras"]:
        cuts += [base + header["extras"]["offset"], base + header["extras"]["offset"] + 7]
    return [c for c in cuts if 0 <= c < len(data)]


def truncate(rng: random.Random, data: bytes) -> bytes:
    cut = rng.choice(_boundaries(data)) if rng.random() < 0.7 else rng.randrange(len(data))
    return data[:cut]


def flip(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    return bytes(b)


def payload(rng: random.Random, data: bytes) -> bytes:
    """Damage one payload (or the extras) and fix its crc32 so the decoder sees the damage."""
    header, hlen, body = split(data)
    entries = header["tensors"] + ([header["extras"]] if header["extras"] else [])
    e = rng.choice(entries)
    blob = bytearray(body[e["offset"]:e["offset"] + e["length"]])
    if not blob:
        return data
    op = rng.random()
    if op < 0.6:
        for _ in range(rng.randint(1, 8)):
            blob[rng.randrange(len(blob))] ^= 1 << rng.randrange(8)
    elif op < 0.8:
        i = rng.randrange(len(blob))
        blob[i:i + rng.randint(1, 16)] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    else:
        blob = blob[:rng.randrange(len(blob))]
    delta = len(blob) - e["length"]
    for other in entries:
        if other["offset"] > e["offset"]:
            other["offset"] += delta
    e["length"], e["crc32"] = len(blob), zlib.crc32(blob)
    body = body[:e["offset"]] + bytes(blob) + body[e["offset"] + e["length"] - delta:]
    return pack(json.dumps(header).encode(), body)


def _hostile_value(rng: random.Random):
    return rng.choice([-1, 0, 1, 2**31, 2**32, 2**32 + 1, 2**62, 2**63, 2**64, 10**30, 1.5, float("nan"),
                       "", "x" * 300, "\ud800", None, True, [], [1] * 9, {}, {"a": 1}, [[]] * 3,
                       [2**16, 2**16], [2**20, 2**20, 2**20], "raw", "ans", "zstd", "lzma", "bz2"])


def header(rng: random.Random, data: bytes) -> bytes:
    """1-3 structured edits of the header JSON, then a valid header checksum."""
    h, _, body = split(data)
    for _ in range(rng.randint(1, 3)):
        target = rng.choice(["top", "backbone", "tensor", "tensor", "tensor", "extras", "metadata"])
        tensors = h.get("tensors") if isinstance(h.get("tensors"), list) else []
        obj = {"top": h, "backbone": h.get("backbone"), "extras": h.get("extras"),
               "metadata": h.get("metadata"), "tensor": rng.choice(tensors) if tensors else None}[target]
        if not isinstance(obj, dict):
            continue
        keys = list(obj) or ["x"]
        op = rng.random()
        if op < 0.55:
            obj[rng.choice(keys)] = _hostile_value(rng)
        elif op < 0.65:
            obj.pop(rng.choice(keys), None)
        elif op < 0.72:
            obj[rng.choice(["extra", "Name", "shape ", "\u00e9"])] = _hostile_value(rng)
        elif op < 0.80 and len(tensors) > 1:
            i, j = rng.sample(range(len(tensors)), 2)
            tensors[i], tensors[j] = tensors[j], tensors[i]
        elif op < 0.88:
            h["codec"] = rng.choice(CODECS)  # payloads decoded by the wrong codec
        elif op < 0.94 and target == "tensor":
            obj["shape"] = [rng.choice([1, 2, 3, 7, 1000, 2**20, 2**31]) for _ in range(rng.randint(0, 4))]
            obj["active"] = rng.choice([0, 1, obj.get("active", 0)])
        else:
            for t in tensors:
                if isinstance(t, dict):
                    t["offset"] = 0  # every entry overlaps the first
    try:
        text = json.dumps(h, allow_nan=True).encode("utf-8", "surrogatepass")
    except (TypeError, ValueError):
        return data
    return pack(text, body)


def text(rng: random.Random, data: bytes) -> bytes:
    """Byte edits of the inflated header text (keys doubled, digits grown, bytes swapped ...)."""
    _, hlen, body = split(data)
    t = bytearray(zlib.decompress(data[18:18 + hlen], -15))
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(t))
        op = rng.random()
        if op < 0.3:
            t[i] = rng.choice(b'{}[]",:0123456789-.eE \\\xff\x00')
        elif op < 0.5:
            del t[i:i + rng.randint(1, 8)]
        elif op < 0.7:
            t[i:i] = rng.choice([b"9" * 30, b'"codec":"raw",', b"[" * 50, b"\\ud800", b"\xc3", b","])
        else:
            j = rng.randrange(len(t))
            t[i:i], t[j:j] = t[j:j + 20], b""  # move a chunk
    return pack(bytes(t), body)


MUTATORS = {"truncate": truncate, "flip": flip, "payload": payload, "header": header, "text": text}


def make_case(i: int, seed: int, seeds: dict[str, bytes], lies: list[str]) -> tuple[str, str, bytes]:
    """Case ``i`` of run ``seed``: (family, detail, file bytes); the same inputs give the same case.

    ``lies``: the names of :data:`fuzz_lies.LIES` to draw from (empty: no lies).
    """
    rng = random.Random(seed * 1_000_003 + i)
    fams = FAMILIES if lies else FAMILIES[:-1]
    fam = rng.choices(fams, WEIGHTS[:len(fams)])[0]
    if fam == "lie":
        name = rng.choice(lies)
        return fam, name, LIES[name](rng, seeds)
    kind = rng.choice(sorted(seeds))  # a codec, or raw-v1 (format version 1)
    return fam, kind, MUTATORS[fam](rng, seeds[kind])


# ---------------------------------------------------------------------------------- running


def exercise(path: str, bb: nn.Module) -> None:
    """The calls a user makes on a file they were sent."""
    mf = maskpack.read(path)
    mf.verify()  # no backbone: decodes the masks unless the codec is ans
    mf.masks(bb)
    mf.extras  # noqa: B018


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def run_here(path: str, bb: nn.Module) -> dict:
    """Exercise one file in this process; the outcome and its cost."""
    c0, w0 = time.process_time(), time.perf_counter()
    try:
        exercise(path, bb)
        out = {"outcome": "accepted", "error": None, "message": ""}
    except MaskpackError as exc:
        out = {"outcome": "refused", "error": type(exc).__name__, "message": str(exc)[:300]}
    except BaseException as exc:  # the findings: anything that is not our documented error
        tb = traceback.format_exc().strip().splitlines()
        out = {"outcome": "other", "error": type(exc).__name__, "message": f"{str(exc)[:200]} | {tb[-3:]}"}
    out.update(cpu_s=time.process_time() - c0, wall_s=time.perf_counter() - w0)
    return out


def run_forked(path: str, bb: nn.Module, kill_after: float) -> dict:
    """Exercise one file in a forked child (peak RSS above its start; killed after ``kill_after`` s)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak-RSS counter to the current RSS
            soft = _status_kb("VmSize") * 1024 + AS_HEADROOM
            resource.setrlimit(resource.RLIMIT_AS, (soft, resource.RLIM_INFINITY))
            rss0 = _status_kb("VmRSS")
            res = run_here(path, bb)
            res["peak_mb"] = (_status_kb("VmHWM") - rss0) / 1024
            os.write(w, json.dumps(res).encode())
        finally:
            os._exit(0)
    os.close(w)
    deadline, chunks = time.monotonic() + kill_after, []
    os.set_blocking(r, False)
    while True:
        done, _ = os.waitpid(pid, os.WNOHANG)
        try:
            while chunk := os.read(r, 65536):
                chunks.append(chunk)
        except BlockingIOError:
            pass
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            os.close(r)
            return {"outcome": "other", "error": "Killed", "message": f"over {kill_after} s",
                    "cpu_s": kill_after, "wall_s": kill_after, "peak_mb": float("nan")}
        time.sleep(0.002)
    os.close(r)
    if not chunks:
        return {"outcome": "other", "error": "ChildDied", "message": "no result (crash?)", "cpu_s": 0.0,
                "wall_s": 0.0, "peak_mb": float("nan")}
    return json.loads(b"".join(chunks))


def run(cases: int, seed: int = 0, *, fork: bool = True, lies: bool = True, heavy: bool = True,
        time_limit: float = 1.0, mem_limit_mb: float = 300.0, kill_after: float = 30.0,
        progress: bool = False) -> dict:
    """Run ``cases`` seeded cases and return the tally (see the module doc).

    ``heavy=False`` leaves out the lies whose construction takes long (for the unit tests);
    ``fork=False`` runs in this process (no memory figures).
    """
    torch.set_num_threads(1)
    bb = seed_backbone()
    seeds = seed_files(bb)
    names = sorted(n for n in LIES if heavy or n not in HEAVY) if lies else []
    tally: dict = {"cases": 0, "accepted": 0, "refused": collections.Counter(),
                   "other": collections.Counter(), "over_time": [], "over_memory": [], "findings": [],
                   "by_family": collections.Counter(), "accepted_by": collections.Counter(),
                   "over_time_wall": 0, "max_cpu_s": 0.0, "max_wall_s": 0.0, "max_peak_mb": 0.0}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "case.mask")
        for i in range(cases):
            fam, detail, data = make_case(i, seed, seeds, names)
            Path(path).write_bytes(data)
            res = run_forked(path, bb, kill_after) if fork else run_here(path, bb)
            _count(tally, i, fam, detail, len(data), res, time_limit, mem_limit_mb)
            if progress and (i + 1) % 100 == 0:
                print(f"{i + 1}/{cases} cases, other {sum(tally['other'].values())}", file=sys.stderr)
    return tally


def _count(tally: dict, i: int, fam: str, detail: str, size: int, res: dict, time_limit: float,
           mem_limit_mb: float) -> None:
    tally["cases"] += 1
    tally["by_family"][fam] += 1
    case = {"case": i, "family": fam, "detail": detail, "bytes": size, **res}
    if res["outcome"] == "accepted":
        tally["accepted"] += 1
        tally["accepted_by"][f"{fam}/{detail}"] += 1
    elif res["outcome"] == "refused":
        tally["refused"][res["error"]] += 1
    else:
        tally["other"][res["error"]] += 1
        tally["findings"].append(case)
    tally["max_cpu_s"] = max(tally["max_cpu_s"], res["cpu_s"])
    tally["max_wall_s"] = max(tally["max_wall_s"], res["wall_s"])
    peak = res.get("peak_mb", 0.0)
    if peak == peak:  # not NaN
        tally["max_peak_mb"] = max(tally["max_peak_mb"], peak)
    if res["cpu_s"] > time_limit:
        tally["over_time"].append(case)
    if res["wall_s"] > time_limit:  # includes waiting for a busy machine's CPUs
        tally["over_time_wall"] += 1
    if peak == peak and peak > mem_limit_mb:
        tally["over_memory"].append(case)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-lies", action="store_true", help="only mutations of real files")
    ap.add_argument("--no-fork", action="store_true", help="run in this process (no memory figures)")
    ap.add_argument("--time-limit", type=float, default=1.0, help="CPU seconds a case may take")
    ap.add_argument("--mem-limit-mb", type=float, default=300.0, help="peak RSS a case may add")
    ap.add_argument("--json", type=Path, help="write the tally and every finding here")
    ap.add_argument("--lie", nargs="+", choices=sorted(LIES), help="run only these lies, once each, and "
                    "print each one's outcome and cost")
    a = ap.parse_args()
    if a.lie:
        return run_lies(a.lie)
    t0 = time.perf_counter()
    tally = run(a.cases, a.seed, fork=not a.no_fork, lies=not a.no_lies, time_limit=a.time_limit,
                mem_limit_mb=a.mem_limit_mb, progress=True)
    tally["elapsed_s"] = time.perf_counter() - t0
    print(summary(tally))
    if a.json:
        a.json.write_text(json.dumps(tally, indent=1, default=str))


def run_lies(names: list[str]) -> None:
    """Run the named lies once each (rng seed 0) in forked children and print their costs."""
    torch.set_num_threads(1)
    bb = seed_backbone()
    seeds = seed_files(bb)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "lie.mask")
        for name in names:
            data = LIES[name](random.Random(0), seeds)
            Path(path).write_bytes(data)
            r = run_forked(path, bb, 60.0)
            print(f"{name}: {len(data):,} B, {r['outcome']} {r['error'] or ''}, CPU {r['cpu_s']:.3f} s, "
                  f"wall {r['wall_s']:.3f} s, peak {r['peak_mb']:.1f} MB | {r['message'][:200]}")


def summary(t: dict) -> str:
    refused = sum(t["refused"].values())
    lines = [f"cases {t['cases']} ({dict(t['by_family'])})",
             f"accepted {t['accepted']}: {dict(t['accepted_by'].most_common(12))}",
             f"refused with a MaskpackError {refused}: {dict(t['refused'])}",
             f"other exceptions {sum(t['other'].values())}: {dict(t['other'])}",
             f"over the time limit {len(t['over_time'])} (CPU; {t['over_time_wall']} by wall clock); "
             f"over the memory limit {len(t['over_memory'])}",
             f"max CPU {t['max_cpu_s']:.3f} s, max wall {t['max_wall_s']:.3f} s, "
             f"max peak RSS above start {t['max_peak_mb']:.1f} MB"]
    for c in (t["findings"] + t["over_time"] + t["over_memory"])[:20]:
        lines.append(f"  case {c['case']} {c['family']}/{c['detail']} ({c['bytes']} B): {c['outcome']} "
                     f"{c['error']} cpu {c['cpu_s']:.2f} s peak {c.get('peak_mb', 0):.0f} MB "
                     f"{c['message'][:160]}")
    if "elapsed_s" in t:
        lines.append(f"elapsed {t['elapsed_s']:.0f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
