"""Evaluation during training: head accuracy, k-NN and probe on the run's test split."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .. import distributed
from ..bn import bn_state, load_bn_state_, reestimate_bn_
from ..evaluate import evaluate_features, extract_features, head_accuracy
from .state import finalize_task_

if TYPE_CHECKING:
    from .loop import RunState


def _features(s: RunState, loader, with_logits: bool = False):
    """``extract_features`` of this rank's shard, gathered into dataset order under DDP."""
    res = extract_features(s.model, loader, device=s.device, amp=s.config.amp, with_logits=with_logits)
    if not s.dist.enabled:
        return res
    n = len(loader.dataset)
    return tuple(distributed.gather_strided(t, n) for t in res)


@torch.no_grad()
def evaluate_run(s: RunState, *, final: bool) -> dict[str, Any]:
    """Test metrics of the run now. BN statistics are re-estimated first when configured; unless
    ``final`` the training statistics are put back afterwards, so evaluation never changes training.
    With ``final`` the model becomes the stored task first (:func:`.state.finalize_task_`).

    Returns:
        ``accuracy`` (supervised), ``knn`` and ``probe`` when asked for.
    """
    c = s.config
    saved = None
    if c.bn_reestimate:
        if not final:
            saved = bn_state(s.model)
        reestimate_bn_(s.model, s.loaders.bn, device=s.device, max_batches=c.bn_reestimate_batches, amp=c.amp,
                       only=s.adapting_bns() if c.bn_mode in ("head", "masked") else None)
    if final:  # evaluate the task as stored: extras rounded to extras_dtype, BN folded
        finalize_task_(s)
    out: dict[str, Any] = {}
    want_knn = c.eval_knn == "epoch" or (final and c.eval_knn == "end")
    want_probe = final and c.probe
    if c.objective == "supervised":
        _, y, logits = _features(s, s.loaders.eval_test, with_logits=True)
        out["accuracy"] = head_accuracy(logits, y)
    if want_knn or want_probe:
        f_tr, y_tr = _features(s, s.loaders.eval_train)
        f_te, y_te = _features(s, s.loaders.eval_test)
        res = {}
        if s.dist.is_main:  # DDP: rank 0 fits k-NN / probe on the gathered features
            res = evaluate_features(f_tr, y_tr, f_te, y_te, knn=want_knn, probe=want_probe, k=c.knn_k,
                                    temperature=c.knn_temperature, seed=c.seed,
                                    num_classes=s.data.num_classes)
        if s.dist.enabled:
            keys = [f"{m}@{1.0:g}" for m, on in (("knn", want_knn), ("probe", want_probe)) if on]
            res = distributed.broadcast_floats(res, keys)
        out.update({k.split("@")[0]: v for k, v in res.items()})
    if saved is not None:
        load_bn_state_(s.model, saved)
    return out
