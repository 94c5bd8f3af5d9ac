"""``maskpack train`` and ``maskpack eval``: thin shells over :mod:`maskpack.train` and
:mod:`maskpack.evaluate`."""

from __future__ import annotations

import json
import re

import click
from click.core import ParameterSource

from . import backbone_from, backbone_weights_option, handle_errors, main, parse_set, recipe_help

# CLI option name -> TrainConfig field, for options whose names differ.
_FIELD = {"workers": "num_workers", "knn": "eval_knn", "init_from": None, "set_values": None,
          "json_out": None, "launcher": None, "max_steps": "max_steps_per_epoch", "topk": "topk_k",
          "compile_": "compile"}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text.split("/")[-1] or text).strip("-") or "run"


@main.command("train")
@click.option("--backbone", default="efficientnet_lite0", show_default=True,
              help="Backbone registry name (efficientnet_lite0, torchvision:resnet18, timm:resnet50 ...; "
                   "docs/backbones.md).")
@backbone_weights_option
@click.option("--dataset", default="digits", show_default=True,
              help="digits, cifar10, cifar100 or imagefolder:PATH (PATH/train, PATH/test).")
@click.option("--data-dir", default=None, help="Where the CIFAR archives live (~/.cache/maskpack/data).")
@click.option("--download/--no-download", default=None,
              help="Fetch a missing CIFAR archive into --data-dir (md5-checked). Default: yes, unless "
                   "MASKPACK_OFFLINE=1; --no-download never uses the network.")
@click.option("--objective", type=click.Choice(["supervised", "swav"]), default="supervised",
              show_default=True)
@click.option("--method", type=click.Choice(["mask", "topk", "fft"]), default="mask", show_default=True,
              help="mask: scores > 0 (the paper); topk: keep the top fraction; fft: full fine-tuning.")
@click.option("--recipe", default="default", show_default=True,
              help="Named defaults for lr, head lr, warm-up, BN, masked layers and SwAV views: default "
                   "(per-tensor normalised score updates on the last layers, docs/training.md), "
                   "normalized (the same on every layer), paper (the paper's raw score lr 50, 40/150 "
                   "warm-up, SwAV's own views), lr50 (raw lr 50, 1-epoch warm-up).")
@click.option("--epochs", type=int, default=10, show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--lr", type=float, default=None,
              help=recipe_help("lr", "Score lr for masks (on per-tensor normalised gradients in the default "
                               "recipe; the paper's raw lr is 50), weight lr for fft."))
@click.option("--head-lr", type=float, default=None,
              help=recipe_help("head_lr", "Head / SwAV projection lr."))
@click.option("--weight-decay", type=float, default=None,
              help=recipe_help("weight_decay", "Weight decay of fft weights; never applied to scores."))
@click.option("--warmup", default=None, help="Linear warm-up: epochs (fractional ok) or 'a/b' of them.")
@click.option("--image-size", type=int, default=None,
              help="Input side in px (default: the dataset's, at most the backbone's).")
@click.option("--labels", type=float, default=1.0, show_default=True, help="Fraction of labels used.")
@click.option("--mask-layers", default=None,
              help="Weights to mask: all, pointwise, no-depthwise, no-stem, last (the conv before the "
                   "pooled features), last:N (the last N), joined by '+', or re:REGEX. "
                   + recipe_help("mask_layers", ""))
@click.option("--topk", type=float, default=0.9, show_default=True, help="Fraction kept by --method topk.")
@click.option("--detach-alpha", is_flag=True, help="Stop the gradient through alpha = sqrt(mean(M)).")
@click.option("--bn-mode", type=click.Choice(["train", "frozen", "head", "masked"]), default=None,
              help="train: BN statistics update during training; frozen: BN stays in eval mode; "
                   "head: only the last BN layer (before the pooled features) updates; masked: only "
                   "the BN right after each masked layer. Updated ones are re-estimated before "
                   "evaluation. " + recipe_help("bn_mode", ""))
@click.option("--bn-reestimate/--no-bn-reestimate", default=None,
              help="Re-estimate BN statistics on clean training images before evaluating and saving.")
@click.option("--sync-bn", is_flag=True,
              help="Under torchrun on GPUs: SyncBatchNorm (batch statistics over the global batch).")
@click.option("--knn", type=click.Choice(["never", "end", "epoch"]), default="end", show_default=True,
              help="When to compute k-NN accuracy (k=200, T=0.1).")
@click.option("--probe", is_flag=True, help="Also fit a logistic-regression probe at the end.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--launcher", type=click.Choice(["auto", "torchrun"]), default="auto", show_default=True,
              help="auto: DDP when started by torchrun; torchrun: fail unless started by torchrun.")
@click.option("--workers", type=int, default=None,
              help="Data-loading processes (default 0 on CPU, 8 on CUDA).")
@click.option("--threads", type=int, default=None, help="CPU threads for torch.")
@click.option("--compile", "compile_", is_flag=True,
              help="Masks: compute every masked weight in one fused pass per step (fewer kernel launches, "
                   "no host synchronisation; for GPUs, see docs/benchmarks.md).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--init-from", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Start the scores from another run's checkpoint.pt (e.g. a dispatcher).")
@click.option("--set", "set_values", multiple=True, metavar="KEY=VALUE",
              help="Any other TrainConfig knob, e.g. --set swav_queue_length=0 (repeatable).")
@click.option("--stop-after", type=int, default=None,
              help="Stop after this many epochs (continue with --resume).")
@click.option("--max-steps", type=int, default=None, hidden=True, help="Cap steps per epoch (benchmarks).")
@click.option("--out", default=None, help="Run directory (default runs/<dataset>-<objective>-<method>).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--keep-checkpoint", is_flag=True,
              help="Keep checkpoint.pt after the run finishes (default: deleted once the task file is "
                   "written; keep it to extend the run later with --resume --epochs N, or to pack it again).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or per-epoch lines.")
@click.option("--json", "json_out", is_flag=True, help="Print the final metrics as JSON.")
@click.pass_context
@handle_errors
def train_cmd(ctx: click.Context, **opts) -> None:
    """Train a task mask (or fine-tune) on a dataset; write a run directory.

    The run directory holds config.json, metrics.jsonl, checkpoint.pt (each epoch) and at the
    end task.mask (mask/topk) or model.safetensors (fft). Once the task file is written the
    checkpoint is deleted, unless --keep-checkpoint.

    \b
    Example:
        maskpack train --dataset digits --image-size 32 --epochs 10 --out runs/digits
        maskpack train --dataset digits --method fft --out runs/digits-fft
        maskpack train --dataset imagefolder:data/cifar10-5k --objective swav --out runs/swav
        maskpack train --out runs/digits --resume          # after an interruption
        torchrun --nproc-per-node 4 -m maskpack train --dataset cifar100 --out runs/c100  # 4 GPUs
    """
    from .. import distributed
    from ..errors import ConfigError
    from ..train import TrainConfig, resume_config, run

    if opts.pop("launcher") == "torchrun" and not distributed.launched():
        raise ConfigError("--launcher torchrun but RANK/WORLD_SIZE/LOCAL_RANK are not set: start it as "
                          "`torchrun --nproc-per-node N -m maskpack train ...` (docs/distributed.md)")
    init_from = opts.pop("init_from")
    json_out = opts.pop("json_out")
    extra = parse_set(opts.pop("set_values"))
    if opts["out"] is None:
        opts["out"] = f"runs/{_slug(opts['dataset'])}-{opts['objective']}-{opts['method']}"
    fields = {(_FIELD.get(k) or k): v for k, v in opts.items() if _FIELD.get(k, k) is not None}
    if opts["resume"]:
        given = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
        explicit = {(_FIELD.get(k) or k): v for k, v in opts.items()
                    if _FIELD.get(k, k) is not None and ctx.get_parameter_source(k) in given}
        explicit.update(extra)
        explicit.pop("resume", None)
        out = explicit.pop("out", opts["out"])
        config = resume_config(out, **explicit)
    else:
        fields.update(extra)
        config = TrainConfig(**fields)
    result = run(config, init_scores=init_from)
    if not distributed.is_main():  # under torchrun only rank 0 reports
        return
    m = result.metrics
    if json_out:
        click.echo(json.dumps({"metrics": m, "task": str(result.task_path) if result.task_path else None,
                               "out": str(result.out_dir)}, indent=2))
        return
    parts = [f"{k} {m[k]:.4f}" for k in ("accuracy", "knn", "probe", "active") if k in m]
    click.echo(f"{config.method} ({config.objective}) after {m.get('epoch', 0)} epochs: " + ", ".join(parts))
    if result.task_path:
        click.echo(f"wrote {result.task_path}")
    else:
        click.echo(f"checkpoint {result.checkpoint_path} (continue with --resume)")


def _stored_backbone(task: str) -> str | None:
    """The backbone name a task (a .mask file, or a run directory / file next to config.json) records."""
    from pathlib import Path

    from ..io import read

    p = Path(task)
    for f in ([p] if p.suffix == ".mask" else []) + [p / "task.mask", p / "cascade.mask"]:
        if f.is_file():
            return read(f).backbone_name
    cfg = (p if p.is_dir() else p.parent) / "config.json"
    try:
        return json.loads(cfg.read_text()).get("backbone")
    except (OSError, ValueError, AttributeError):
        return None


@main.command("eval")
@click.argument("task", required=False, type=click.Path(exists=True))
@click.option("--backbone", default=None, help="Backbone (default: the task's, else efficientnet_lite0).")
@backbone_weights_option
@click.option("--dataset", default=None, help="Dataset (default: the task's, else digits).")
@click.option("--data-dir", default=None, help="Where the CIFAR archives live (~/.cache/maskpack/data).")
@click.option("--download/--no-download", default=None,
              help="Fetch a missing CIFAR archive into --data-dir (md5-checked). Default: yes, unless "
                   "MASKPACK_OFFLINE=1; --no-download never uses the network.")
@click.option("--image-size", type=int, default=None, help="Input side (default: the task's).")
@click.option("--labels", default="1.0", show_default=True,
              help="Label fractions for k-NN and the probe, comma-separated (e.g. 0.01,0.1,1.0).")
@click.option("--knn/--no-knn", default=True, show_default=True)
@click.option("--probe/--no-probe", default=True, show_default=True)
@click.option("--baseline/--no-baseline", default=True, show_default=True,
              help="Also evaluate the plain backbone.")
@click.option("--device", default="auto", show_default=True)
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the label subsets.")
@click.option("--json", "json_out", is_flag=True, help="Print results as JSON.")
@handle_errors
def eval_cmd(task, backbone, backbone_weights, dataset, data_dir, download, image_size, labels, knn, probe,
             baseline, device, batch_size, seed, json_out) -> None:
    """Evaluate a task (.mask, model.safetensors or run directory) and the plain backbone:
    head accuracy, k-NN (k=200, T=0.1) and a logistic-regression probe per label fraction.

    \b
    Example:
        maskpack eval runs/digits/task.mask --labels 0.01,0.1,1.0
        maskpack eval --dataset digits --image-size 32        # the plain backbone only
        maskpack eval runs/vit/task.mask --backbone-weights vit_small.safetensors
    """
    from ..data import parse_fractions
    from ..evaluate import evaluate

    fracs = parse_fractions(labels)
    backbone = backbone_from(backbone, backbone_weights, _stored_backbone(task) if task else None)
    from ..cascade import evaluate_cascade, is_cascade

    if task is not None and is_cascade(task):
        res = evaluate_cascade(task, backbone=backbone, dataset=dataset, image_size=image_size,
                               fractions=fracs, knn=knn, probe=probe, baseline=baseline, data_dir=data_dir,
                               download=download, batch_size=batch_size, seed=seed)
    else:
        res = evaluate(task, backbone=backbone, dataset=dataset, image_size=image_size, fractions=fracs,
                       knn=knn, probe=probe, baseline=baseline, data_dir=data_dir, download=download,
                       device=device, batch_size=batch_size, seed=seed)
    if json_out:
        click.echo(json.dumps(res, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    keys = sorted({k for r in res.values() for k in r}, key=lambda k: (k != "accuracy", k))
    table = Table("model", *keys)
    for name, r in res.items():
        table.add_row(name, *[f"{r[k]:.4f}" if k in r else "-" for k in keys])
    Console().print(table)
