"""Record what seeded CLI runs produce, to prove that a refactoring changed nothing.

Runs short, seeded jobs through the CLI on CPU (2-epoch digits runs of mask, topk, fft and SwAV,
a small cascade, pack / unpack, and the storage comparison) and writes one JSON of sha256 digests
and metrics. Run it before and after a change and diff the two files:

    python tools/golden_outputs.py --out /tmp/before.json
    ... change the code ...
    python tools/golden_outputs.py --out /tmp/after.json
    diff /tmp/before.json /tmp/after.json

Timing fields (seconds, images/s) are dropped; everything else must match.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

_TIMING = ("seconds", "_s", "images_per_s", "mbps", "time")
_PATHS = {"out", "file", "mask_path", "finetuned_path"}  # run folders differ between recordings
_COMMON = ["--dataset", "digits", "--image-size", "32", "--epochs", "2", "--max-steps", "4",
           "--batch-size", "16", "--seed", "0", "--threads", "1", "--quiet", "--device", "cpu"]


def _sha(path: Path) -> str:
    """sha256 of a file; for safetensors, of its tensors and sorted metadata (the library writes the
    metadata in hash-map order, which differs between processes)."""
    if path.suffix != ".safetensors":
        return hashlib.sha256(path.read_bytes()).hexdigest()
    from safetensors import safe_open

    h = hashlib.sha256()
    with safe_open(str(path), "pt") as f:
        h.update(json.dumps(sorted((f.metadata() or {}).items())).encode())
        for k in sorted(f.keys()):
            h.update(k.encode() + str(_tensor_digest(f.get_tensor(k))).encode())
    return h.hexdigest()


def _cli(*args: str) -> str:
    env = dict(os.environ, PYTHONHASHSEED="0", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "maskpack", *args], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise SystemExit(f"maskpack {' '.join(args)} failed:\n{res.stdout}\n{res.stderr}")
    return res.stdout


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in _PATHS and not any(t in k for t in _TIMING)}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    if isinstance(obj, float):
        return round(obj, 6)
    return obj


def _tensor_digest(obj) -> object:
    """Checkpoint contents: tensors by sha256 of their bytes, the rest as plain values."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        t = t.reshape(-1)
        data = t.view(torch.uint8) if t.dtype != torch.bool else t.to(torch.uint8)
        return f"{t.dtype} {list(t.shape)} {hashlib.sha256(data.numpy().tobytes()).hexdigest()[:16]}"
    if isinstance(obj, dict):
        return {str(k): _tensor_digest(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_tensor_digest(v) for v in obj]
    if isinstance(obj, str) and obj.startswith("{"):
        try:
            return _strip(json.loads(obj))
        except ValueError:
            return obj
    if isinstance(obj, str) and obj.startswith("["):
        try:
            return _strip(json.loads(obj))
        except ValueError:
            return obj
    return obj


def _run_dir(d: Path) -> dict:
    out: dict = {}
    for name in ("task.mask", "model.safetensors"):
        if (d / name).exists():
            out[name] = _sha(d / name)
    if (d / "metrics.jsonl").exists():
        out["metrics"] = [_strip(json.loads(ln)) for ln in (d / "metrics.jsonl").read_text().splitlines()]
    if (d / "checkpoint.pt").exists():
        ckpt = torch.load(d / "checkpoint.pt", map_location="cpu", weights_only=True)
        out["checkpoint"] = _tensor_digest(ckpt)
    return out


def record(work: Path) -> dict:
    res: dict = {}
    runs = {
        "mask": ["--method", "mask"],
        "topk": ["--method", "topk"],
        "fft": ["--method", "fft"],
        "swav": ["--objective", "swav", "--set", "swav_crops=[2,2]", "--set", "swav_queue_length=0"],
    }
    for name, extra in runs.items():
        d = work / name
        _cli("train", *_COMMON, *extra, "--out", str(d))
        res[name] = _run_dir(d)
    packed = work / "packed.mask"
    _cli("pack", str(work / "mask"), "-o", str(packed), "--codec", "zstd")
    res["pack_zstd"] = _sha(packed)
    _cli("unpack", str(work / "mask" / "task.mask"), "-o", str(work / "unpacked.safetensors"))
    res["unpack"] = _sha(work / "unpacked.safetensors")
    bench_json = work / "bench.json"
    _cli("bench", "--mask", str(work / "mask" / "task.mask"), "--finetuned",
         str(work / "fft" / "model.safetensors"), "--json", str(bench_json), "--jobs", "1", "--quiet")
    bench = json.loads(bench_json.read_text())
    res["bench"] = _strip({k: v for k, v in bench.items() if k != "info"})
    cas = work / "cascade"
    _cli("cascade", "--dataset", "digits", "--image-size", "32", "--epochs", "1", "--max-steps", "6",
         "--batch-size", "32", "--set", "swav_crops=[2,2]", "--set", "swav_queue_length=0",
         "--experts", "5", "--threads", "1", "--device", "cpu", "--quiet", "--out", str(cas))
    res["cascade"] = {"cascade.mask": _sha(cas / "cascade.mask"),
                      "cascade.json": _strip(json.loads((cas / "cascade.json").read_text()))}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="where to write the JSON of digests")
    ap.add_argument("--work", default=None, help="run directory (default: a temporary folder)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.work:
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
        res = record(work)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            res = record(Path(tmp))
    Path(args.out).write_text(json.dumps(res, indent=1, sort_keys=True) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
