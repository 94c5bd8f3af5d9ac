"""``maskpack cascade``: a thin shell over :func:`maskpack.cascade.train_cascade`."""

from __future__ import annotations

import json

import click

from ..cascade.combine import DEFAULT_KIND, KINDS
from ..cascade.experts import DEFAULT_EXPERT_LAYERS, EXPERT_BN
from ..cascade.fit import MANTISSA_BITS
from ..train.config import recipe_default
from . import handle_errors, main, parse_set


@main.command("cascade")
@click.option("--dispatcher", default=None, type=click.Path(exists=True),
              help="Use this dispatcher (run directory, checkpoint.pt or .mask) instead of training one.")
@click.option("--dataset", default="digits", show_default=True,
              help="Dispatcher training data: digits, cifar10, cifar100 or imagefolder:PATH.")
@click.option("--data-dir", default=None, help="Where the CIFAR archives live (~/.cache/maskpack/data).")
@click.option("--download/--no-download", default=None,
              help="Fetch a missing CIFAR archive into --data-dir (md5-checked). Default: yes, unless "
                   "MASKPACK_OFFLINE=1; --no-download never uses the network.")
@click.option("--image-size", type=int, default=32, show_default=True)
@click.option("--epochs", type=int, default=4, show_default=True, help="Dispatcher epochs.")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--lr", type=float, default=None,
              help="Score lr of the dispatcher (default: the recipe's, "
                   f"{recipe_default('lr', 'swav', 'mask')}).")
@click.option("--max-steps", type=int, default=None, help="Cap the dispatcher's steps per epoch.")
@click.option("--set", "set_values", multiple=True, metavar="KEY=VALUE",
              help="Any other dispatcher TrainConfig knob, e.g. --set swav_crops=[2,2] (repeatable).")
@click.option("--experts", type=int, default=5, show_default=True, help="Clusters / expert masks.")
@click.option("--router-dim", type=int, default=20, show_default=True, help="PCA dimensions of the router.")
@click.option("--expert-steps", type=int, default=None,
              help="Steps per expert (default: the dispatcher's total steps).")
@click.option("--modes", default="unconditional", show_default=True,
              help="Combinations to fit, evaluate and store (comma-separated): unconditional (every "
                   "expert's features) and/or conditional (only the routed expert's).")
@click.option("--combine", "combine_kind", type=click.Choice(list(KINDS)), default=DEFAULT_KIND,
              show_default=True,
              help="How the K+1 feature blocks become one embedding: subspace (each block on the router's "
                   "PCA basis, then a small ZCA whitening), l2 (each block L2-normalised, concatenated; "
                   "nothing stored), standardize (per-dimension mean and scale), pca (a dense whitened "
                   "PCA of all blocks: large).")
@click.option("--combine-width", type=int, default=None,
              help="Principal components kept by the pca / subspace combination (default: the "
                   "dispatcher's width for pca, all (K+1) x router-dim for subspace).")
@click.option("--combine-dtype", type=click.Choice(["float16", "float32"]), default="float16",
              show_default=True, help="Storage dtype of the combination's tensors.")
@click.option("--router-dtype", type=click.Choice(["float16", "float32", "float64"]), default="float16",
              show_default=True, help="Storage dtype of the router (routes use the stored values).")
@click.option("--mantissa-bits", type=int, default=MANTISSA_BITS, show_default=True,
              help="Mantissa bits kept in the router's PCA basis and the combination's matrix (float16 "
                   "has 10; fewer compress better; the cascade is fitted and evaluated with the rounded "
                   "values).")
@click.option("--expert-layers", default=DEFAULT_EXPERT_LAYERS, show_default=True,
              help="Which of the dispatcher's masked tensors the experts train: all or last:N "
                   "(the others keep the dispatcher's mask and cost ~nothing).")
@click.option("--expert-bn", type=click.Choice(list(EXPERT_BN)), default="frozen", show_default=True,
              help="adapt: the BN layers after the experts' trained tensors adapt to the cluster "
                   "(stored per expert); frozen: experts use the dispatcher's BN statistics.")
@click.option("--probe/--no-probe", default=True, show_default=True, help="Also fit linear probes.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=int, default=None, help="CPU threads for torch.")
@click.option("--device", default="auto", show_default=True, help="Training device: auto, cpu or cuda.")
@click.option("--out", default=None, help="Run directory (default runs/cascade-<dataset>).")
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
@click.option("--json", "json_out", is_flag=True, help="Print the results as JSON.")
@handle_errors
def cascade_cmd(dispatcher, dataset, data_dir, download, image_size, epochs, batch_size, lr, max_steps,
                set_values, experts, router_dim, expert_steps, modes, combine_kind, combine_width,
                combine_dtype, router_dtype, mantissa_bits, expert_layers, expert_bn, probe, seed, threads,
                device, out, quiet, json_out) -> None:
    """Train a cascade: a SwAV dispatcher mask, a PCA + Gaussian-mixture router, one expert
    mask per cluster (initialised from the dispatcher), and a combination of their features.

    Writes OUT/cascade.mask (everything in one file; load with maskpack.load_cascade),
    OUT/cascade.json (metrics, storage) and the dispatcher / expert runs (a second call
    resumes or reuses them). Prints k-NN / probe of the cascade next to the dispatcher alone.

    \b
    Example:
        maskpack cascade --dataset digits --epochs 4 --out runs/cascade
        maskpack cascade --dispatcher runs/swav --experts 5 --out runs/cascade-swav
        maskpack eval runs/cascade/cascade.mask
    """
    from ..cascade import CascadeConfig, default_train_config, train_cascade
    from ..errors import ConfigError

    mode_list = tuple(m.strip() for m in modes.split(",") if m.strip())
    train = dict(dataset=dataset, data_dir=data_dir, download=download, image_size=image_size, epochs=epochs,
                 batch_size=batch_size, lr=lr, max_steps_per_epoch=max_steps, threads=threads, device=device,
                 seed=seed, quiet=quiet)
    train.update(parse_set(set_values))
    try:
        tc = default_train_config(**train)
    except TypeError as exc:
        raise ConfigError(f"bad training option: {exc}") from exc
    slug = dataset.rstrip("/").split("/")[-1].replace(":", "-") or "data"
    cfg = CascadeConfig(dispatcher=dispatcher, train=tc, experts=experts, router_dim=router_dim,
                        expert_steps=expert_steps, modes=mode_list, combine=combine_kind,
                        combine_width=combine_width,
                        combine_dtype=combine_dtype, router_dtype=router_dtype, mantissa_bits=mantissa_bits,
                        expert_layers=expert_layers,
                        expert_bn=expert_bn, probe=probe,
                        out=out or f"runs/cascade-{slug}", seed=seed, quiet=quiet)
    result = train_cascade(cfg)
    from .. import distributed

    if not distributed.is_main():  # under torchrun only rank 0 reports
        return
    if json_out:
        click.echo(json.dumps(result.info, indent=2))
        return
    rows = [(name, m) for name, m in result.metrics.items()]
    width = max(len(n) for n, _ in rows)
    click.echo(f"{'model':<{width}}  k-NN    probe")
    for name, m in rows:
        probe_txt = f"{m['probe']:.4f}" if "probe" in m else "-"
        click.echo(f"{name:<{width}}  {m['knn']:.4f}  {probe_txt}")
    s = result.storage
    click.echo(f"clusters {result.clusters}; masks {s['masks_multiple']:.2f}x one mask as XOR deltas "
               f"({s['masks_multiple_independent']:.2f}x stored independently); file {s['file_bytes']:,} B "
               f"= {s['file_multiple']:.2f}x the dispatcher's task file ({s['combine_bytes']:,} B "
               f"{s['combine']} combination, {s['router_bytes']:,} B router, {s['expert_extras_bytes']:,} B "
               "expert extras)")
    click.echo(f"wrote {result.path}")
