"""What a run keeps and restores: the task's extras and metadata, the checkpoint, the task file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .. import distributed, masking
from ..bn import BatchNorm, bn_buffer_names
from ..checkpoint import build_checkpoint, save_checkpoint
from ..errors import FormatError
from ..extras import dequantize_head, fold_bn_, head_metadata, quantize_head, round_tensors_, stored_extras
from ..io import save, save_finetuned
from ..objectives import SwAVObjective, queue_from_global, queue_to_global
from .build import named_trainables

if TYPE_CHECKING:
    from .loop import RunState


def _bn_param_names(model: torch.nn.Module) -> set[str]:
    return {f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, BatchNorm)
            for p, _ in m.named_parameters(recurse=False)}


def task_extras(s: RunState) -> dict[str, torch.Tensor]:
    """Trained non-mask tensors in TaskModel naming: head, trained weights, and the BN tensors that
    differ from the backbone's (with ``--bn-mode head / masked / frozen`` most keep the backbone's
    statistics; folded BN layers change weight/bias; a loader takes what a task omits from the
    backbone)."""
    trained = {n for n, p in s.model.named_parameters() if p.requires_grad}
    bn_tensors = bn_buffer_names(s.model) | _bn_param_names(s.model)
    pristine = s.backbone.model.state_dict()
    out = {}
    for name, t in s.model.state_dict().items():
        if ".parametrizations." in name:
            continue
        if name in bn_tensors and name not in trained:
            orig = pristine.get(name.removeprefix("backbone."))
            if orig is not None and torch.equal(orig, t.detach().cpu()):
                continue
        if name.startswith("head.") or name in bn_tensors or name in trained:
            out[name] = t.detach().cpu().contiguous().clone()
    return out


def _fold_layers(s: RunState) -> list[torch.nn.Module]:
    """The BN layers whose statistics the task stores: the adapting ones (all under ``train``)."""
    mode = s.config.bn_mode
    if mode in ("head", "masked"):
        return s.adapting_bns()
    if mode == "train":
        return [m for m in s.model.backbone.modules() if isinstance(m, BatchNorm)]
    return []


@torch.no_grad()
def finalize_task_(s: RunState) -> None:
    """Turn the trained model into the task as stored (masks only; once, at the end of the run, after
    BN re-estimation and before the final evaluation): fold the adapted BN layers (``bn_fold``) and
    round the extras to ``extras_dtype`` (the head weight to its ``head_bits`` values when set) in
    place, so the evaluated model is the stored one."""
    c = s.config
    if not s.masked or s.finalized:
        return
    if c.bn_fold:
        for bn in _fold_layers(s):
            fold_bn_(bn)
    state = s.model.state_dict()
    quantized = {"head.weight"} if c.head_bits else set()
    round_tensors_(((n, state[n]) for n in task_extras(s) if n not in quantized), c.extras_dtype)
    if c.head_bits:  # the head as a loader rebuilds it from its int8 / int4 values and scales
        w = state["head.weight"]
        w.copy_(dequantize_head(*quantize_head(w, c.head_bits, c.extras_dtype)).to(w))
    s.finalized = True


def task_metadata(s: RunState) -> dict[str, str]:
    """The string notes a task file carries (how it was trained, how to feed it)."""
    c = s.config
    return {
        "mask.scale": "true" if c.scale else "false",
        "mask.mode": "topk" if c.method == "topk" else "threshold",
        "backbone": c.backbone, "backbone.hash": s.backbone.hash(),
        "method": c.method, "objective": c.objective, "dataset": c.dataset,
        "image_size": str(c.image_size), "num_classes": str(s.data.num_classes),
        "classes": json.dumps(s.data.classes), "epochs": str(s.epoch), "recipe": c.recipe,
        "mean": json.dumps(list(s.backbone.mean)), "std": json.dumps(list(s.backbone.std)),
        # set once finalize_task_ has rounded (and folded) the extras
        **({"extras.dtype": c.extras_dtype, "bn.folded": "true" if c.bn_fold else "false",
            **(head_metadata(s.model.head.weight, c.head_bits) if c.head_bits else {})}
           if s.finalized else {}),
    }


def _objective_state(s: RunState) -> dict[str, torch.Tensor]:
    state = {k: v.detach().cpu().clone() for k, v in s.objective.state_dict().items()}
    if s.dist.enabled and isinstance(s.objective, SwAVObjective) and s.objective.queue.shape[1]:
        # collective: the per-rank queues are stored as the one-process queue (any world size resumes)
        state["queue"] = queue_to_global(distributed.all_gather_stack(s.objective.queue), s.per_device_batch)
        state["queue_filled"] = state["queue_filled"] * s.dist.world_size
    return state


def checkpoint_of(s: RunState) -> dict[str, Any]:
    """The run's checkpoint dict (collective under DDP: every rank must call it)."""
    c = s.config
    momentum = {}
    for g in s.optim.optimizer.param_groups:
        for p in g["params"]:
            buf = s.optim.optimizer.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                momentum[s.optim.param_names[id(p)]] = buf.detach().cpu().clone()
    return build_checkpoint(
        backbone=c.backbone, backbone_hash=s.backbone.hash(),
        scores=masking.extract_scores(s.model.backbone) if s.masked else {},
        mask_mode="topk" if c.method == "topk" else "threshold",
        threshold=float(c.threshold), k=float(c.topk_k), scale=bool(c.scale),
        extras=task_extras(s), metadata=task_metadata(s), objective=_objective_state(s),
        momentum=momentum, epoch=s.epoch, step=s.step, rng_torch=torch.get_rng_state(),
        config=json.dumps(c.to_dict()), history=json.dumps(s.history))


def write_checkpoint(s: RunState) -> Path:
    """Write ``checkpoint.pt`` (rank 0 only; every rank must call it under DDP)."""
    path = s.out / "checkpoint.pt"
    ckpt = checkpoint_of(s)
    if s.dist.is_main:
        save_checkpoint(path, ckpt)
    return path


@torch.no_grad()
def restore_(s: RunState, ckpt: dict[str, Any]) -> None:
    """Continue from a checkpoint: scores, extras, objective, momentum, counters, RNG."""
    if ckpt["backbone_hash"] != s.backbone.hash():
        raise FormatError(f"checkpoint was trained on a different {ckpt['backbone']!r} backbone "
                          "(hash mismatch): resume with the backbone it was made with")
    if s.masked:
        masking.load_scores_(s.model.backbone, {k: v.to(s.device) for k, v in ckpt["scores"].items()})
    state = s.model.state_dict()
    for name, t in ckpt["extras"].items():
        if name not in state:
            raise FormatError(f"checkpoint tensor {name!r} does not exist in this model")
        state[name].copy_(t)
    obj = dict(ckpt["objective"])
    if s.dist.enabled and isinstance(s.objective, SwAVObjective) and obj["queue"].shape[1]:
        w = s.dist.world_size
        obj["queue"] = queue_from_global(obj["queue"], s.per_device_batch, s.dist.rank, w)
        obj["queue_filled"] = obj["queue_filled"] // w
    s.objective.load_state_dict(obj)
    by_name = dict(named_trainables(s.model, s.objective))
    for name, buf in ckpt["momentum"].items():
        if name not in by_name:
            raise FormatError(f"checkpoint optimizer state names unknown tensor {name!r}")
        p = by_name[name]
        s.optim.optimizer.state[p]["momentum_buffer"] = buf.to(p.device).clone()
    s.epoch, s.step = int(ckpt["epoch"]), int(ckpt["step"])
    s.history = json.loads(ckpt["history"])
    s.finalized = "extras.dtype" in ckpt["metadata"]
    torch.set_rng_state(ckpt["rng_torch"])


def save_task(s: RunState, masks: dict[str, torch.Tensor], extras: dict[str, torch.Tensor]) -> Path:
    """Write ``task.mask`` (masks) or ``model.safetensors`` (fft) into the run directory, atomically."""
    meta = task_metadata(s)
    if s.masked:
        path = s.out / "task.mask"
        # a quantised head: finalize_task_ left q * scale in the model, which quantises to the same q, scale
        stored = stored_extras(extras, s.config.extras_dtype, s.config.head_bits)
        save(path, masks, s.backbone, extras=stored, metadata=meta, codec=s.config.codec)
        return path
    path = s.out / "model.safetensors"
    save_finetuned(path, s.model.state_dict(), meta)
    return path
