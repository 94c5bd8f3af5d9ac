"""``maskpack bench``: masks against fine-tuned weights, compressed every way (a shell over
:mod:`maskpack.compare`)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import click

from . import backbone_from, backbone_weights_option, handle_errors, main


def _size(n: int) -> str:
    return f"{n / 1e6:.3f} MB" if n >= 100_000 else f"{n:,} B"


def _speed(v: float | None) -> str:
    return "-" if v is None else f"{v:,.1f}"


def _acc(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def render(result, console) -> None:
    """Print the paper-style table, the headline ratios and the accuracies."""
    from rich.table import Table

    table = Table(title=f"{result.backbone}: {result.tensors} masked tensors, {result.numel:,} weights "
                        f"({result.active:.2%} kept by the mask, {result.changed:.2%} changed by the "
                        "fine-tune)")
    for col in ("stored", "method", "raw size", "compressed", "reduction", "encode MB/s", "decode MB/s"):
        table.add_column(col, justify="left" if col in ("stored", "method") else "right")
    best = {side: result.best(side).method for side in ("mask", "fp32")}
    sides = (("mask", result.mask_rows, "mask bits"), ("fp32", result.fp32_rows, "fp32 weights"))
    for side, rows, label in sides:
        for i, r in enumerate(rows):
            method = f"[bold]{r.method}[/bold]" if r.method == best[side] else r.method
            table.add_row(label if i == 0 else "", method, _size(r.raw_bytes), _size(r.compressed_bytes),
                          f"{r.reduction:.2f}%", _speed(r.encode_mbps), _speed(r.decode_mbps),
                          end_section=i == len(rows) - 1)
    console.print(table)
    ra, w = result.ratios, result.whole
    mb, fb = result.best("mask"), result.best("fp32")
    console.print(f"[bold]masks are {ra['honest']:.1f}x smaller than the fine-tuned weights, best codec on "
                  f"each side[/bold]: {mb.method} {_size(mb.compressed_bytes)} vs {fb.method} "
                  f"{_size(fb.compressed_bytes)} (same tensors on both sides, the paper's definition)")
    console.print(f"paper-style, lzma -9 on both sides: {ra['paper']:.1f}x; uncompressed: {ra['raw']:.1f}x")
    console.print(f"[bold]whole task, head and BN included: {ra['whole']:.1f}x[/bold] (masks only: "
                  f"{ra['honest']:.1f}x): .mask file {_size(w['mask_file_bytes'])} vs {w['fft_best_method']} "
                  f"{_size(w['fft_best_bytes'])} (raw {_size(w['fft_raw_bytes'])}); lzma on both: "
                  f"{ra['whole_paper']:.1f}x")
    p = w.get("mask_file_parts")
    if p:
        console.print(f".mask file by part: masks {p['masks']:,} B, head {p['head']:,} B, BN {p['bn']:,} B "
                      f"(extras {p['extras']:,} B), header {p['header']:,} B = {p['total']:,} B")
    if "fft_bf16_best_bytes" in w:
        console.print(f"LOSSY comparison, the fine-tune rounded to bfloat16 (no longer the evaluated model): "
                      f"{w['fft_bf16_best_method']} {_size(w['fft_bf16_best_bytes'])} (raw "
                      f"{_size(w['fft_bf16_raw_bytes'])}), {ra['whole_bf16_lossy']:.1f}x the .mask file")
    acc = result.accuracy
    console.print(f"test accuracy: mask {_acc(acc.get('mask'))}, fine-tune {_acc(acc.get('fft'))}")
    if result.lora is not None:
        render_lora(result, console)


def render_lora(result, console) -> None:
    """The mask, the LoRA and the fine-tune side by side: stored bytes, accuracy, training time."""
    from rich.table import Table

    lo, w, t = result.lora, result.whole, result.info.get("train_s", {})
    mask_file = result.info.get("mask_path")
    raw_mask = os.path.getsize(mask_file) if mask_file and os.path.isfile(mask_file) else w["mask_file_bytes"]
    table = Table(title=f"whole task, stored: mask vs LoRA rank {lo['rank']} ({lo['params']:,} adapter "
                        f"weights on {len(lo['targets'])} layers) vs fine-tune")
    for col in ("task", "stored as", "bytes", "best lossless", "best method", "accuracy", "train s"):
        table.add_column(col, justify="left" if col in ("task", "stored as", "best method") else "right")
    table.add_row("mask", ".mask file (head, BN stats)", _size(raw_mask), _size(w["mask_file_bytes"]), "ans",
                  _acc(result.accuracy.get("mask")), _speed(t.get("mask")))
    table.add_row(f"LoRA r={lo['rank']}", "safetensors (adapters, head, BN stats)", _size(lo["raw_bytes"]),
                  _size(lo["best_bytes"]), lo["best_method"], _acc(lo.get("accuracy")), _speed(t.get("lora")))
    table.add_row("fine-tune", "fp32 tensors (all)", _size(w["fft_raw_bytes"]), _size(w["fft_best_bytes"]),
                  w["fft_best_method"], _acc(result.accuracy.get("fft")), _speed(t.get("fft")))
    console.print(table)
    if t.get("lora") == 0.0:
        console.print("(a train time of 0.0: the finished run in --out was reused)")


@main.command("bench")
@click.option("--mask", "mask_path", type=click.Path(dir_okay=False), default=None,
              help="An existing task.mask (with --finetuned): skip training.")
@click.option("--finetuned", type=click.Path(dir_okay=False), default=None,
              help="An existing fft model.safetensors (with --mask).")
@click.option("--dataset", default="digits", show_default=True,
              help="digits (embedded), cifar10, cifar100 or imagefolder:PATH.")
@click.option("--backbone", default="efficientnet_lite0", show_default=True, help="Backbone registry name.")
@backbone_weights_option
@click.option("--data-dir", default=None, help="Where the CIFAR archives live (~/.cache/maskpack/data).")
@click.option("--download/--no-download", default=None,
              help="Fetch a missing CIFAR archive into --data-dir (md5-checked). Default: yes, unless "
                   "MASKPACK_OFFLINE=1; --no-download never uses the network.")
@click.option("--epochs", type=int, default=6, show_default=True, help="Epochs for each of the two runs.")
@click.option("--image-size", type=int, default=32, show_default=True, help="Input side in px.")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--lora", "lora_rank", type=click.IntRange(min=1), default=None, metavar="RANK",
              help="Also train a LoRA of this rank on the layers the mask recipe masks (same data, budget "
                   "and seed; OUT/lora) and compare its stored size; needs peft (extra 'lora').")
@click.option("--max-steps", type=int, default=None, hidden=True, help="Cap steps per epoch (tests).")
@click.option("--out", default="runs/bench", show_default=True,
              help="Directory of the training runs (OUT/mask, OUT/fft, OUT/lora); finished runs are reused.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the results as JSON to this file.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Write a bar chart (PNG) of the compressed sizes; needs matplotlib (extra 'plot').")
@click.option("--jobs", "-j", type=int, default=None,
              help="Codec runs at once (default: one per CPU); 1 measures uncontended speeds.")
@click.option("--quiet", "-q", is_flag=True, help="No progress; print only the table and headline.")
@handle_errors
def bench_cmd(mask_path, finetuned, dataset, backbone, backbone_weights, data_dir, download, epochs,
              image_size, batch_size, device, seed, lora_rank, max_steps, out, json_path, plot_path, jobs,
              quiet) -> None:
    """Compare storing a task as a mask with storing it as a full fine-tune.

    Trains a mask and a full fine-tune with the same budget (or takes existing ones), then
    compresses the masks (bit-packed: gzip, bz2, lzma, lz4, snappy, zstd, and maskpack's ans
    coder) and the fine-tuned fp32 weights of the same tensors (the same codecs, plus byte
    grouping and the XOR-with-backbone delta). Prints the paper-style table, both headline
    ratios (lzma on both sides; best codec on each side), accuracies and codec speeds.

    \b
    Example:
        maskpack bench                                   # embedded Lite0 + digits, a few minutes
        maskpack bench --dataset cifar100 --epochs 30 --image-size 64 --out runs/c100 --plot c100.png
        maskpack bench --mask runs/m/task.mask --finetuned runs/f/model.safetensors --json res.json
        maskpack bench --lora 8 --json res.json            # and a rank-8 LoRA (pip install 'maskpack[lora]')
    """
    from rich.console import Console

    from .. import compare as bench
    from ..errors import ConfigError

    if (mask_path is None) != (finetuned is None):
        raise ConfigError("give both --mask and --finetuned, or neither (then both are trained)")
    if lora_rank is not None:
        if mask_path is not None:
            raise ConfigError("--lora trains beside the mask and the fine-tune it trains: leave out --mask "
                              "and --finetuned (finished runs in --out are reused)")
        from ..compare.lora import require_peft

        require_peft()  # fail before minutes of training, not after
    if plot_path:  # fail before minutes of training, not after
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ConfigError("--plot needs matplotlib: pip install 'maskpack[plot]' (or pip install "
                              "matplotlib)") from None
    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(width=120)  # piped to a file: do not wrap the table at 80 columns
    t0 = time.perf_counter()
    info: dict = {}
    pair: dict = {}
    if mask_path is None:
        cfg = bench.PairConfig(dataset=dataset, backbone=backbone, backbone_weights=backbone_weights,
                               epochs=epochs, image_size=image_size,
                               batch_size=batch_size, data_dir=data_dir, download=download, out=out,
                               device=device, seed=seed, max_steps_per_epoch=max_steps, quiet=quiet,
                               lora_rank=lora_rank)
        if not quiet:
            extra = f", and a LoRA of rank {lora_rank} into {out}/lora" if lora_rank else ""
            console.print(f"training a mask and a fine-tune on {dataset} ({epochs} epochs, {image_size} px) "
                          f"into {out}/mask and {out}/fft{extra}")
        pair = bench.train_pair(cfg)
        mask_path, finetuned = pair["mask_path"], pair["fft_path"]
        info = {"dataset": dataset, "epochs": epochs, "image_size": image_size, "train_s": pair["train_s"]}
    from ..io import read

    # the backbone the mask names, built from the local weights file when one is given
    bb = backbone_from(None, backbone_weights, read(mask_path).backbone_name) if backbone_weights else None
    result = _compare(bench, mask_path, finetuned, info, quiet, console, jobs, bb)
    if "lora" in pair:
        from ..compare.lora import lora_summary

        result.lora = lora_summary(pair["lora"], workers=jobs or bench.default_workers())
        result.accuracy["lora"] = pair["lora"]["accuracy"]
    result.info["total_s"] = time.perf_counter() - t0
    render(result, console)
    if json_path:
        Path(json_path).write_text(result.to_json() + "\n")
        if not quiet:
            console.print(f"wrote {json_path}")
    if plot_path:
        bench.plot(result, plot_path)
        if not quiet:
            console.print(f"wrote {plot_path}")


def _compare(bench, mask_path, finetuned, info, quiet, console, jobs, backbone=None):
    if quiet:
        return bench.compare_files(mask_path, finetuned, backbone=backbone, info=info, workers=jobs)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    steps = 2 + len(bench.GENERAL) + 2 * len(bench.FP32_DEFAULT) + len(bench.BF16_METHODS) + 2
    with Progress(TextColumn("compressing ({task.description} done)"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=True) as prog:
        task = prog.add_task("", total=steps)

        def step(label: str) -> None:  # called as each method finishes
            prog.update(task, description=label, advance=1)

        result = bench.compare_files(mask_path, finetuned, backbone=backbone, info=info, progress=step,
                                     workers=jobs)
        prog.update(task, completed=steps)
    return result

