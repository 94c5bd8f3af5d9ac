"""What a task file's head costs: the parts of ``.mask`` files, and a wider head in each precision.

For each task file given, prints its parts as stored: masks (the coded payloads), extras (the
compressed extras blob), the head (``head.*`` tensors compressed alone, as an extras blob of their own)
and the rest of the extras (BN statistics) compressed alone, and the header. With ``--classes N`` it also
writes the first file's task again with an untrained ``N``-class head of the same input width,
initialised as the trainer's supervised objective initialises its head (``nn.Linear``'s default
init, after ``torch.manual_seed(seed)``: the same distribution as a run's initial head, not the
same values), stored in the file's extras dtype (bfloat16), as int8 (``head_bits`` 8) and as
int4 (``head_bits`` 4), and prints the same parts. One JSON line per file.

    PYTHONPATH=. python bench/head_size.py runs/off/task.mask runs/bits8/task.mask --classes 100
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from torch import nn

from maskpack import io, load_backbone
from maskpack.extras import head_bits_of, head_metadata, stored_extras


def _extras_bytes(masks, backbone, extras, metadata, codec: str, tmp: Path) -> int:
    path = tmp / "part.mask"
    io.save(path, masks, backbone, extras=extras, metadata=metadata, codec=codec)
    return io.read(path).extras_bytes


def parts(path: Path, backbone, tmp: Path) -> dict:
    """The stored parts of a task file, in bytes."""
    mf = io.read(path)
    stored = mf.read_extras(dequantize=False)
    masks = mf.masks(backbone)
    head = {k: v for k, v in stored.items() if k.startswith("head.")}
    rest = {k: v for k, v in stored.items() if not k.startswith("head.")}
    head_bytes = _extras_bytes(masks, backbone, head, dict(mf.metadata), mf.codec, tmp)
    rest_bytes = _extras_bytes(masks, backbone, rest, dict(mf.metadata), mf.codec, tmp)
    mask_bytes = sum(t.length for t in mf.tensors)
    w = stored.get("head.weight")
    return {"file": str(path), "head_bits": head_bits_of(mf.metadata, str(path)),
            "head_shape": list(w.shape) if w is not None else None,
            "head_raw_bytes": sum(v.numel() * v.element_size() for v in head.values()),
            "total": mf.file_size, "masks": mask_bytes, "extras": mf.extras_bytes, "head": head_bytes,
            "rest_alone": rest_bytes,
            "header": mf.file_size - mask_bytes - mf.extras_bytes}


def wide_head_files(path: Path, backbone, classes: int, seed: int, out: Path) -> list[Path]:
    """The task in ``path`` with an untrained ``classes``-wide head, as bf16 / int8 / int4 files."""
    mf = io.read(path)
    extras = {k: v for k, v in mf.extras.items() if not k.startswith("head.")}
    dtype = mf.metadata.get("extras.dtype", "bfloat16")
    torch.manual_seed(seed)
    head = nn.Linear(int(mf.extras["head.weight"].shape[1]), classes)
    extras.update({"head.weight": head.weight.detach().clone(), "head.bias": head.bias.detach().clone()})
    meta = {k: v for k, v in mf.metadata.items() if not k.startswith("head.")}
    meta.update({"num_classes": str(classes), "classes": json.dumps([str(i) for i in range(classes)])})
    files = []
    for bits in (None, 8, 4):
        target = out / f"head{classes}-{'bf16' if bits is None else f'int{bits}'}.mask"
        io.save(target, mf.masks(backbone), backbone, extras=stored_extras(extras, dtype, bits),
                metadata={**meta, **head_metadata(extras["head.weight"], bits)}, codec=mf.codec)
        files.append(target)
    return files


def main() -> None:
    """Print one JSON line of parts per task file."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--classes", type=int, default=None,
                    help="also write the first task with this wide a head")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None,
                    help="where the wide-head files go (default: a temp dir)")
    args = ap.parse_args()
    backbone = load_backbone(io.read(args.files[0]).backbone_name)
    with tempfile.TemporaryDirectory() as tmp:
        files = list(args.files)
        if args.classes:
            out = args.out or Path(tmp)
            out.mkdir(parents=True, exist_ok=True)
            files += wide_head_files(args.files[0], backbone, args.classes, args.seed, out)
        for f in files:
            print(json.dumps(parts(f, backbone, Path(tmp))))


if __name__ == "__main__":
    main()
