"""A LoRA baseline for ``maskpack bench --lora R``: low-rank adapters on the layers the mask recipe masks.

The LoRA run takes the mask run's data, budget and seed: the same :class:`TrainConfig` (resolved
with the mask recipe), the same loaders (:func:`maskpack.train.build.build_loaders`: augmentation,
data order, steps per epoch), the same epochs, batch size, warm-up and cosine schedule.

* **Layers.** PEFT's LoRA goes on the modules whose weights the mask recipe masks (the supervised
  default: ``last:25``), except the ones LoRA cannot adapt here: grouped (depthwise) convolutions
  (PEFT needs the rank to be a multiple of the groups and cannot merge them) and convolutions of
  a subclass with its own padding rule and a kernel or stride above 1 (Lite0's TF "same" padding:
  PEFT's LoRA branch would pad differently). On Lite0 that is the 17 pointwise convolutions and the
  conv head of blocks 8-15; the 8 depthwise convolutions keep the backbone's weights.
* **Optimiser.** AdamW, lr :data:`LORA_LR` for the adapters and the new linear head, no weight
  decay; ``lora_alpha = 2 * rank``; no dropout.
* **BatchNorm.** Weight and bias stay frozen (a pure LoRA); the running statistics follow the mask
  recipe's BN mode (default ``masked``: the BN layer after each masked layer adapts and is
  re-estimated on clean training images before the test; the others keep the backbone's).
* **Stored.** ``OUT/lora/adapter.safetensors``: the adapter matrices, the head and the adapted BN
  statistics (the task needs all three), with the backbone's name and hash, the rank, alpha and
  targets in the metadata. :func:`load_lora` rebuilds the task model from it.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from ..errors import BackboneMismatchError, ConfigError, FormatError
from .methods import GENERAL
from .pair import PairConfig, _check_reuse, read_metrics
from .result import Row

LORA_LR = 5e-3  # AdamW, adapters and head: the better of 1e-3 and 5e-3 on the default (docs/benchmarks.md)
META_KEY = "maskpack"
ADAPTER_FILE = "adapter.safetensors"
# The lossless methods tried on the adapter file (no XOR: an adapter has no backbone tensor to XOR with).
LORA_METHODS = ("raw", *(n for n, _, _ in GENERAL), "bytegroup+zstd-19")


def require_peft() -> ModuleType:
    """The ``peft`` module, or a ConfigError that says how to install it.

    Raises:
        ConfigError: peft is not installed.
    """
    try:
        import peft
    except ImportError:
        raise ConfigError("--lora needs PEFT: pip install 'maskpack[lora]' (or pip install peft)") from None
    return peft


def safetensors_error() -> type[Exception]:
    """The exception safetensors raises on a malformed file."""
    from safetensors import SafetensorError

    return SafetensorError


def lora_alpha(rank: int) -> int:
    """The LoRA scaling numerator used for ``rank`` (the update is ``alpha / rank * B @ A``)."""
    return 2 * rank


def _lora_ok(module: nn.Module) -> bool:
    """Whether PEFT's LoRA adapts ``module`` exactly (see the module docstring)."""
    if isinstance(module, nn.Linear):
        return True
    if not isinstance(module, nn.Conv2d) or module.groups != 1:
        return False
    own_forward = type(module).forward is not nn.Conv2d.forward
    return not own_forward or (max(module.kernel_size) == 1 and max(module.stride) == 1)


def lora_targets(net: nn.Module, mask_layers: str) -> tuple[list[str], list[str]]:
    """The modules a LoRA adapts for the mask layer filter ``mask_layers``, and those it skips.

    Args:
        net: the backbone's feature extractor (a copy: nothing is changed).
        mask_layers: a :func:`maskpack.masking.layer_filter` spec (``last:25``, ``all`` ...).

    Returns:
        ``(targets, skipped)``: module names in module order.

    Raises:
        ConfigError: no selected module can take a LoRA.
    """
    from ..masking import layer_filter, select_parameters

    selected = select_parameters(net, layer_filter(mask_layers, net))
    owners = list(dict.fromkeys(full.rpartition(".")[0] for full, _, _ in selected))
    targets = [n for n in owners if _lora_ok(net.get_submodule(n))]
    skipped = [n for n in owners if n not in targets]
    if not targets:
        raise ConfigError(f"no layer of {mask_layers!r} can take a LoRA (only nn.Linear and ungrouped "
                          "nn.Conv2d can): choose other --mask-layers")
    return targets, skipped


def apply_lora_(net: nn.Module, targets: list[str], rank: int, alpha: int | None = None) -> nn.Module:
    """Inject a LoRA of ``rank`` into the ``targets`` of ``net`` (in place); only the adapters train.

    Args:
        net: the feature extractor (a copy of the backbone's).
        targets: full module names (from :func:`lora_targets`).
        rank: the LoRA rank (>= 1).
        alpha: ``lora_alpha``; default :func:`lora_alpha` of the rank.

    Returns:
        ``net``, with ``lora_A`` / ``lora_B`` under each target.
    """
    if rank < 1:
        raise ConfigError(f"LoRA rank must be at least 1, got {rank}")
    peft = require_peft()
    pattern = "^(?:" + "|".join(re.escape(t) for t in targets) + ")$"
    config = peft.LoraConfig(r=rank, lora_alpha=lora_alpha(rank) if alpha is None else alpha,
                             lora_dropout=0.0, target_modules=pattern, bias="none")
    net = peft.inject_adapter_in_model(config, net)
    for name, p in net.named_parameters():
        p.requires_grad_("lora_" in name)
    return net


def adapter_state(model: nn.Module, bn_names: list[str]) -> dict[str, torch.Tensor]:
    """What a LoRA task stores: adapters, head and the adapted BN statistics (TaskModel names).

    Args:
        model: the :class:`TaskModel` with a LoRA-injected backbone.
        bn_names: backbone BN layers whose running statistics differ from the backbone's.
    """
    out = {f"backbone.{n}": p for n, p in model.backbone.named_parameters() if "lora_" in n}
    out.update({f"head.{n}": p for n, p in model.head.named_parameters()})
    for bn in bn_names:
        mod = model.backbone.get_submodule(bn)
        out[f"backbone.{bn}.running_mean"] = mod.running_mean
        out[f"backbone.{bn}.running_var"] = mod.running_var
    return {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in out.items()}


def adapter_bytes(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The safetensors bytes of :func:`adapter_state` with ``metadata``, deterministic: safetensors
    writes a metadata map in no fixed order, so the notes go in one key, ``maskpack``, as sorted JSON."""
    from safetensors.torch import save as st_save

    return st_save(dict(sorted(state.items())), metadata={META_KEY: json.dumps(metadata, sort_keys=True)})


def adapter_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The notes :func:`adapter_bytes` stored in an adapter file (``{}`` when there are none).

    Raises:
        FormatError: not a safetensors file.
    """
    from safetensors import safe_open

    try:
        with safe_open(os.fspath(path), "pt") as f:
            meta = dict(f.metadata() or {})
        return json.loads(meta[META_KEY]) if META_KEY in meta else {}
    except (OSError, ValueError, safetensors_error()) as exc:
        raise FormatError(f"{os.fspath(path)} is not a readable safetensors file ({exc}): pass the "
                          "adapter.safetensors of a `maskpack bench --lora` run") from exc


def load_lora(path: str | os.PathLike, backbone=None) -> nn.Module:
    """Rebuild a LoRA task model (backbone + adapters + head + BN statistics) from its file.

    Args:
        path: an ``adapter.safetensors`` written by ``maskpack bench --lora``.
        backbone: a :class:`maskpack.Backbone` (default: the one the file names); its hash is checked.

    Returns:
        A :class:`maskpack.model.TaskModel` in eval mode.

    Raises:
        FormatError: not such a file. BackboneMismatchError: another backbone's adapter.
    """
    from safetensors.torch import load_file

    from ..backbones import load_backbone
    from ..model import TaskModel

    path = os.fspath(path)
    meta = adapter_metadata(path)
    try:
        state = load_file(path)
        rank, alpha = int(meta["lora.rank"]), int(meta["lora.alpha"])
        targets = json.loads(meta["lora.targets"])
    except (KeyError, ValueError, OSError, safetensors_error()) as exc:
        raise FormatError(f"{path} is not a maskpack LoRA adapter ({exc}): pass the adapter.safetensors "
                          "of a `maskpack bench --lora` run") from exc
    bb = backbone if backbone is not None else load_backbone(meta.get("backbone", ""))
    if meta.get("backbone.hash") and meta["backbone.hash"] != bb.hash():
        raise BackboneMismatchError(f"{path} adapts backbone {meta.get('backbone')!r} (sha256 "
                                    f"{meta['backbone.hash'][:12]}...), not the one given: pass that "
                                    "backbone",
                                    expected=meta["backbone.hash"], actual=bb.hash(),
                                    backbone_name=meta.get("backbone", ""))
    net = apply_lora_(bb.copy_model(), targets, rank, alpha)
    w = state["head.weight"]
    model = TaskModel(net, nn.Linear(w.shape[1], w.shape[0]))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any("lora_" in k or k.startswith("head.") for k in missing):
        raise FormatError(f"{path} does not fit its backbone's LoRA layout (unexpected {unexpected[:3]}, "
                          f"missing {[k for k in missing if 'lora_' in k][:3]})")
    return model.eval()


# ----------------------------------------------------------------------------- training


def _mask_config(config: PairConfig):
    """The mask run's resolved TrainConfig: the LoRA run takes its data, schedule and BN policy."""
    from ..train import TrainConfig, resolve_config

    return resolve_config(TrainConfig(
        backbone=config.backbone, backbone_weights=config.backbone_weights, dataset=config.dataset,
        data_dir=config.data_dir, download=config.download, method="mask", epochs=config.epochs,
        batch_size=config.batch_size, image_size=config.image_size, seed=config.seed, device=config.device,
        max_steps_per_epoch=config.max_steps_per_epoch, quiet=config.quiet, eval_knn="never", eval_every=0))


class _Run:
    """The parts of one LoRA run: config, backbone, data, model, loaders, optimiser."""

    def __init__(self, config: PairConfig, rank: int):
        from .. import masking
        from ..backbones import load_backbone
        from ..bn import BatchNorm, adapting_bn_names
        from ..data import load_dataset
        from ..distributed import DistInfo
        from ..model import TaskModel
        from ..objectives import SupervisedObjective
        from ..runtime import resolve_device
        from ..train.build import build_loaders

        c = _mask_config(config)
        self.device = resolve_device(c.device)
        self.backbone = load_backbone(c.backbone, weights=c.backbone_weights)
        self.data = load_dataset(c.dataset, image_size=c.image_size, data_dir=c.data_dir, download=c.download,
                                 quiet=c.quiet)
        if c.image_size is None:
            c.image_size = min(self.data.native_size, self.backbone.input_size)
        self.config, self.rank = c, rank
        torch.manual_seed(c.seed)
        net = self.backbone.copy_model()
        owners = {n.rpartition(".")[0] for n, _, _ in
                  masking.select_parameters(net, masking.layer_filter(c.mask_layers, net))}
        self.bn_names = adapting_bn_names(net, c.bn_mode, owners, backbone=c.backbone)
        if c.bn_mode == "train":  # every BN layer adapts: all their statistics are stored
            self.bn_names = [n for n, m in net.named_modules() if isinstance(m, BatchNorm)]
        self.targets, self.skipped = lora_targets(net, c.mask_layers)
        apply_lora_(net, self.targets, rank)
        self.objective = SupervisedObjective(self.backbone.feature_dim, self.data.num_classes)
        self.model = TaskModel(net, self.objective.task_head()).to(self.device)
        self.loaders = build_loaders(c, self.backbone, self.data, DistInfo(), self.device.type == "cuda",
                                     c.batch_size)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=LORA_LR, weight_decay=0.0)
        for g in self.optimizer.param_groups:
            g["base_lr"] = g["lr"]

    def adapting(self) -> list[nn.Module]:
        """The BN modules whose statistics adapt (train mode while training, re-estimated before the test)."""
        return [self.model.backbone.get_submodule(n) for n in self.bn_names]

    def train(self) -> float:
        """Every epoch of the schedule; returns the last epoch's mean loss."""
        from ..bn import set_train_mode_
        from ..runtime import autocast, to_device
        from ..train import lr_factor

        c, ld, step, loss_sum, n = self.config, self.loaders, 0, 0.0, 0
        for epoch in range(c.epochs):
            ld.sampler.set_epoch(epoch)
            set_train_mode_(self.model, c.bn_mode, self.adapting())
            loss_sum, n = 0.0, 0
            for i, batch in enumerate(ld.train):
                if i >= ld.steps_per_epoch:
                    break
                factor = lr_factor(step, ld.total_steps, ld.warmup_steps, c.schedule)
                for g in self.optimizer.param_groups:
                    g["lr"] = g["base_lr"] * factor
                batch = to_device(batch, self.device, False)
                with autocast(self.device, c.amp):
                    loss, _ = self.objective.loss(self.model.backbone, batch, step)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                step += 1
                loss_sum, n = loss_sum + float(loss.detach()), n + 1
        return loss_sum / max(n, 1)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Test accuracy of the head, after re-estimating the adapted BN statistics (as the mask run)."""
        from ..bn import reestimate_bn_
        from ..evaluate import extract_features, head_accuracy

        c = self.config
        if c.bn_reestimate and self.bn_names:
            reestimate_bn_(self.model, self.loaders.bn, device=self.device,
                           max_batches=c.bn_reestimate_batches, amp=c.amp, only=self.adapting())
        _, y, logits = extract_features(self.model, self.loaders.eval_test, device=self.device, amp=c.amp,
                                        with_logits=True)
        return head_accuracy(logits, y)

    def metadata(self) -> dict[str, str]:
        c = self.config
        return {"backbone": c.backbone, "backbone.hash": self.backbone.hash(), "method": "lora",
                "dataset": c.dataset, "image_size": str(c.image_size), "epochs": str(c.epochs),
                "num_classes": str(self.data.num_classes), "lora.rank": str(self.rank),
                "lora.alpha": str(lora_alpha(self.rank)), "lora.targets": json.dumps(self.targets),
                "mean": json.dumps(list(self.backbone.mean)), "std": json.dumps(list(self.backbone.std))}


def train_lora(config: PairConfig, rank: int) -> dict[str, Any]:
    """Train a LoRA of ``rank`` into ``config.out/lora`` with the mask run's data, budget and seed.

    A finished run there (its ``adapter.safetensors``) is reused when its settings match.

    Args:
        config: the bench's pair config (dataset, backbone, epochs, image size, batch, seed, out).
        rank: the LoRA rank.

    Returns:
        ``{"path", "accuracy", "train_s", "rank", "alpha", "targets", "skipped", "params", "reused", ...}``
        (``train_s`` of a reused run is the time it took when it was trained).

    Raises:
        ConfigError: peft is missing, or ``out/lora`` holds a run with other settings.
    """
    from ..io import write_atomic, write_text

    require_peft()
    run_dir = Path(config.out) / "lora"
    path = run_dir / ADAPTER_FILE
    if path.exists():
        _check_reuse(run_dir, config, "lora")
        saved = read_metrics(path)
        if saved.get("rank") not in (None, rank):
            raise ConfigError(f"{run_dir} holds a LoRA of rank {saved['rank']}, not {rank}: choose another "
                              "--out, or remove that directory to retrain")
        if saved.get("lr") not in (None, LORA_LR):
            raise ConfigError(f"{run_dir} holds a LoRA trained at lr {saved['lr']}, not {LORA_LR}: choose "
                              "another --out, or remove that directory to retrain")
        return {**saved, "path": str(path), "reused": True}
    t0 = time.perf_counter()
    run = _Run(config, rank)
    loss = run.train()
    accuracy = run.evaluate()
    train_s = time.perf_counter() - t0
    run.model.eval()
    state = adapter_state(run.model, run.bn_names)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(path, adapter_bytes(state, run.metadata()))
    params = sum(v.numel() for k, v in state.items() if "lora_" in k)
    out = {"accuracy": accuracy, "train_s": train_s, "loss": loss, "rank": rank, "alpha": lora_alpha(rank),
           "lr": LORA_LR, "targets": run.targets, "skipped": run.skipped, "params": params,
           "epochs": config.epochs}
    record = {"backbone": config.backbone, "dataset": config.dataset, "epochs": config.epochs,
              "image_size": run.config.image_size, "batch_size": config.batch_size, "seed": config.seed,
              "method": "lora", "rank": rank}
    write_text(run_dir / "config.json", json.dumps(record, indent=2) + "\n")
    write_text(run_dir / "metrics.jsonl", json.dumps(out) + "\n")
    return {**out, "path": str(path), "reused": False}


def lora_rows(path: str | os.PathLike, *, workers: int = 1) -> list[Row]:
    """The adapter file compressed with every lossless method of :data:`LORA_METHODS` (side ``lora``).

    The whole file is compressed (header included): it is what a task store keeps.
    """
    from .core import fp32_rows

    data = Path(path).read_bytes()
    data += bytes(-len(data) % 4)  # whole 4-byte words for byte grouping (safetensors pads to 8 anyway)
    return fp32_rows(data, bytes(len(data)), methods=list(LORA_METHODS), side="lora", workers=workers)


def lora_summary(info: dict[str, Any], *, workers: int = 1) -> dict[str, Any]:
    """The bench's ``lora`` entry: :func:`train_lora`'s record plus the stored sizes of the adapter."""
    rows = lora_rows(info["path"], workers=workers)
    best = min(rows, key=lambda r: r.compressed_bytes)
    return {**info, "raw_bytes": Path(info["path"]).stat().st_size, "best_bytes": best.compressed_bytes,
            "best_method": best.method, "rows": [r.to_dict() for r in rows]}
