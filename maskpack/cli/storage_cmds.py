"""``maskpack pack | unpack | inspect | verify``: .mask files from the command line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from ..errors import FormatError
from ..io import DEFAULT_CODEC, available_codecs
from . import backbone_from, backbone_weights_option, handle_errors, main


def _recorded_weights(ckpt: dict) -> str | None:
    """The backbone weights file a training run recorded in its checkpoint's config, if any."""
    try:
        value = json.loads(ckpt.get("config") or "{}").get("backbone_weights")
    except (TypeError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def _pack_checkpoint(src: Path, out: str, codec: str, level: int | None, weights: str | None) -> None:
    import maskpack
    from maskpack.checkpoint import load_checkpoint, masks_from_checkpoint

    ckpt = load_checkpoint(src)
    backbone = maskpack.load_backbone(ckpt["backbone"], weights=weights or _recorded_weights(ckpt))
    metadata = {str(k): str(v) for k, v in ckpt["metadata"].items()}
    metadata.setdefault("mask.scale", "true" if ckpt["scale"] else "false")
    extras = ckpt["extras"]
    if "extras.dtype" in metadata:  # a finished run's extras, rounded to the precision it stores
        from maskpack.extras import head_bits_of, stored_extras

        extras = stored_extras(extras, metadata["extras.dtype"], head_bits_of(metadata, str(src)))
    maskpack.save(out, masks_from_checkpoint(ckpt), backbone, extras=extras, metadata=metadata,
                  codec=codec, level=level)


def _repack(src: Path, out: str, codec: str, level: int | None, backbone_name: str | None,
            weights: str | None) -> None:
    import maskpack

    mf = maskpack.read(src)
    backbone = maskpack.load_backbone(backbone_name or mf.backbone_name, weights=weights)
    # the extras as stored (a quantised head stays quantised)
    maskpack.save(out, mf.masks(backbone), backbone, extras=mf.read_extras(dequantize=False),
                  metadata=mf.metadata, codec=codec, level=level)


@main.command()
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="The .mask file to write.")
@click.option("--codec", type=click.Choice(available_codecs()), default=DEFAULT_CODEC, show_default=True)
@click.option("--level", type=int, default=None,
              help="Compression level (gzip/bz2/lzma 0-9, zstd 1-22, lz4 1-12).")
@click.option("--backbone", default=None,
              help="Backbone to re-encode a .mask with (default: the stored name).")
@backbone_weights_option
@handle_errors
def pack(source: Path, output: str, codec: str, level: int | None, backbone: str | None,
         backbone_weights: str | None) -> None:
    """Write a .mask file from a training run, a checkpoint, or another .mask (re-encode).

    SOURCE is a run directory (its checkpoint.pt, or its task.mask once a finished run has deleted
    the checkpoint: train with --keep-checkpoint to keep it), a checkpoint file, or a .mask file. A run
    trained on a local weights file packs with that file (recorded in its config) unless
    --backbone-weights names another.

    \b
    Example:
        maskpack pack runs/digits -o digits.mask --codec ans
        maskpack pack digits.mask -o digits.zstd.mask --codec zstd --level 19
    """
    if source.is_dir():
        run_dir = source
        source = run_dir / "checkpoint.pt"
        if not source.exists() and (run_dir / "task.mask").exists():
            source = run_dir / "task.mask"  # a finished run deletes its checkpoint unless --keep-checkpoint
        elif not source.exists():
            raise FormatError(f"{run_dir} has no checkpoint.pt and no task.mask: is it a maskpack training "
                              "run? (a finished run keeps only its task.mask unless trained with "
                              "--keep-checkpoint; an unfinished one keeps its checkpoint.pt)")
    from maskpack.io import is_mask_file

    if is_mask_file(source):
        _repack(source, output, codec, level, backbone, backbone_weights)
    else:
        _pack_checkpoint(source, output, codec, level, backbone_weights)
    click.echo(f"wrote {output} ({os.path.getsize(output):,} bytes, codec {codec})")


@main.command()
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="The .safetensors file to write.")
@click.option("--backbone", default=None, help="Backbone name (default: the one stored in the file).")
@backbone_weights_option
@handle_errors
def unpack(path: str, output: str, backbone: str | None, backbone_weights: str | None) -> None:
    """Write the full rehydrated model (TaskModel state dict) as safetensors.

    \b
    Example:
        maskpack unpack digits.mask -o digits.safetensors
        maskpack unpack vit.mask -o vit.safetensors --backbone-weights vit_small.safetensors
        python -c "from safetensors.torch import load_file; print(len(load_file('digits.safetensors')))"
    """
    import maskpack
    from maskpack.io import save_finetuned

    model = maskpack.load(path, backbone_from(backbone, backbone_weights, maskpack.read(path).backbone_name))
    state = model.state_dict()
    save_finetuned(output, state, dict(maskpack.read(path).metadata))
    click.echo(f"wrote {output} ({len(state)} tensors, {os.path.getsize(output):,} bytes)")


def _summary(mf) -> dict:
    return {"path": mf.path, "bytes": mf.file_size, "version": mf.version, "codec": mf.codec,
            "backbone": {"name": mf.backbone_name, "sha256": mf.backbone_hash},
            "masked_weights": mf.numel, "active_fraction": mf.active_fraction,
            "bits_per_weight": 8 * mf.file_size / mf.numel if mf.numel else None,
            "extras_bytes": mf.extras_bytes,
            "metadata": mf.metadata,
            "tensors": [{"name": t.name, "shape": list(t.shape), "active": t.active,
                         "active_fraction": t.active / t.numel if t.numel else 1.0, "bytes": t.length}
                        for t in mf.tensors]}


@main.command()
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@handle_errors
def inspect(path: str, as_json: bool) -> None:
    """Show a .mask file's header: backbone, codec, sizes, per-layer active fraction.

    Reads the header only (no backbone needed).

    \b
    Example:
        maskpack inspect digits.mask
        maskpack inspect digits.mask --json | jq .active_fraction
    """
    import maskpack

    s = _summary(maskpack.read(path))
    if as_json:
        click.echo(json.dumps(s, indent=2))
        return
    click.echo(f"{path}: {s['bytes']:,} bytes, format v{s['version']}, codec {s['codec']}")
    click.echo(f"backbone: {s['backbone']['name']} sha256 {s['backbone']['sha256']}")
    bpw = f"{s['bits_per_weight']:.3f}" if s["bits_per_weight"] is not None else "-"
    click.echo(f"masked weights: {s['masked_weights']:,}, active {s['active_fraction']:.4f}, "
               f"{bpw} bits/weight; extras {s['extras_bytes']:,} bytes")
    for k, v in s["metadata"].items():
        click.echo(f"  {k} = {v}")
    width = max((len(t["name"]) for t in s["tensors"]), default=4)
    click.echo(f"{'tensor':<{width}}  {'shape':<18} {'active':>7} {'bytes':>9}")
    for t in s["tensors"]:
        click.echo(f"{t['name']:<{width}}  {str(t['shape']):<18} {t['active_fraction']:>7.4f} "
                   f"{t['bytes']:>9,}")


@main.command()
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--backbone", default=None, help="Backbone to check against (default: the stored name).")
@backbone_weights_option
@handle_errors
def verify(path: str, backbone: str | None, backbone_weights: str | None) -> None:
    """Check a .mask file: backbone hash, every checksum, and that every mask decodes.

    Also warns about temp files that an interrupted write left beside the file.

    \b
    Example:
        maskpack verify digits.mask --backbone efficientnet_lite0
        maskpack verify resnet.mask --backbone-weights resnet50.safetensors   # offline
    """
    import maskpack
    from maskpack.io import leftover_temp_files

    try:
        mf = maskpack.read(path)
        bb = maskpack.load_backbone(backbone or mf.backbone_name, weights=backbone_weights)
        mf.check_backbone(bb)
        mf.verify(bb)
    finally:  # leftovers of an interrupted write matter most when the check fails
        for lo in leftover_temp_files(os.path.dirname(os.path.abspath(path))):
            fate = ("the next write to this folder removes it" if lo.stale else
                    f"its writer, pid {lo.pid}, is still running" if lo.owner_alive else
                    "its writer is gone: safe to delete" if lo.pid is not None else
                    "safe to delete once no write to this folder is running")
            click.echo(f"warning: leftover temp file of an interrupted write: {lo.path} ({lo.size:,} bytes, "
                       f"unchanged for {lo.age_s:.0f} s; {fate})", err=True)
    click.echo(f"OK: {path} ({len(mf.tensors)} masks, codec {mf.codec}, backbone {mf.backbone_name} "
               f"sha256 {mf.backbone_hash[:12]}...)")
