"""SwAV objective: Sinkhorn, queue, prototype freezing, and a tiny self-supervised mask run."""

import pytest
import torch

from maskpack.objectives import SwAVObjective, sinkhorn
from maskpack.train import TrainConfig, load_checkpoint, run


def test_sinkhorn_rows_are_distributions_and_prototypes_balanced():
    torch.manual_seed(0)
    scores = torch.nn.functional.normalize(torch.randn(64, 128), dim=1) @ \
        torch.nn.functional.normalize(torch.randn(16, 128), dim=1).t()
    q = sinkhorn(scores, epsilon=0.05, iters=3)
    assert q.shape == (64, 16)
    torch.testing.assert_close(q.sum(1), torch.ones(64))
    # after 3 iterations the prototype marginals are close to uniform (B/K each)
    assert (q.sum(0) - 4.0).abs().max() < 1.0


def test_sinkhorn_all_reduce_hook_is_used_on_sums_only():
    calls = []

    def reduce_sum(t):
        calls.append(tuple(t.shape))
        return t

    sinkhorn(torch.randn(8, 5) * 0.1, iters=3, reduce_sum=reduce_sum)
    assert calls == [(), (5, 1), (5, 1), (5, 1)]


def _sinkhorn_on_two_ranks(shards: list[torch.Tensor]) -> list[torch.Tensor]:
    """``sinkhorn(reduce_sum=...)`` on two simulated ranks (threads) whose reduce_sum is an
    all-reduce: both get the sum of both partial tensors, added in rank order."""
    import threading

    barrier = threading.Barrier(2, timeout=60)
    slots: list[torch.Tensor | None] = [None, None]
    out: list[torch.Tensor | None] = [None, None]
    errors: list[BaseException] = []

    def work(rank: int) -> None:
        def all_reduce(t: torch.Tensor) -> torch.Tensor:
            slots[rank] = t.clone()
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()  # both have read before either writes its next partial sum
            return total

        try:
            out[rank] = sinkhorn(shards[rank], reduce_sum=all_reduce, world_size=2)
        except BaseException as exc:  # reported by the test thread below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=work, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return out


def test_sinkhorn_two_shards_match_one_global_batch():
    # The real sinkhorn() on each half of the batch with an all-reduce between them gives the
    # one-process result over the whole batch (up to the order of float sums).
    torch.manual_seed(1)
    scores = torch.randn(16, 6) * 0.2
    qa, qb = _sinkhorn_on_two_ranks([scores[:8], scores[8:]])
    torch.testing.assert_close(torch.cat([qa, qb]), sinkhorn(scores), rtol=1e-5, atol=1e-7)
    # without the all-reduce each half would be balanced on its own: a different answer
    assert not torch.allclose(torch.cat([sinkhorn(scores[:8]), sinkhorn(scores[8:])]), sinkhorn(scores),
                              rtol=1e-3, atol=1e-4)


def test_swav_loss_queue_and_frozen_prototypes():
    torch.manual_seed(0)
    obj = SwAVObjective(32, dim=8, prototypes=10, queue_length=8, freeze_prototypes_iters=2, n_global=2)
    crops = [torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8), torch.randn(4, 3, 4, 4)]
    backbone2 = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(),
                                    torch.nn.Linear(12, 32))
    loss, _ = obj.loss(backbone2, (crops, None), step=0)
    assert loss.item() > 0 and torch.isfinite(loss)
    loss.backward()
    assert obj.prototypes.weight.grad is not None
    obj.after_backward(step=0)
    assert obj.prototypes.weight.grad is None  # frozen during the first iterations
    assert int(obj.queue_filled) == 4 and obj.queue[0, -4:].abs().sum() > 0
    obj.use_queue = True
    obj.loss(backbone2, (crops, None), step=3)  # queue full now: its scores join Sinkhorn
    assert int(obj.queue_filled) == 8
    torch.testing.assert_close(obj.prototypes.weight.norm(dim=1), torch.ones(10))


def test_swav_mask_run_stores_no_head(tmp_path):
    import maskpack

    c = TrainConfig(dataset="digits", image_size=16, batch_size=16, epochs=2, objective="swav",
                    train_indices=list(range(48)), quiet=True, threads=1, eval_every=0, eval_knn="end",
                    swav_crops=(2, 2), swav_queue_length=32, swav_prototypes=20,
                    bn_reestimate_batches=2, out=str(tmp_path / "swav"), keep_checkpoint=True)
    r = run(c)
    assert "knn" in r.metrics and 0.0 <= r.metrics["knn"] <= 1.0
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in r.history)
    assert not any(k.startswith("head.") for k in r.extras)
    ck = load_checkpoint(tmp_path / "swav" / "checkpoint.pt")
    assert "prototypes.weight" in ck["objective"] and "queue" in ck["objective"]
    model = maskpack.load(r.task_path, maskpack.load_backbone())
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 1280)  # the feature extractor


@pytest.mark.slow
def test_swav_resume_identical(tmp_path, same_run):
    kw = dict(dataset="digits", image_size=16, batch_size=16, epochs=2, objective="swav",
              train_indices=list(range(48)), quiet=True, threads=1, eval_every=0, eval_knn="never",
              swav_crops=(2, 2), swav_queue_length=16, swav_prototypes=20, swav_queue_start=0.5,
              save_task=False)
    full = run(TrainConfig(out=str(tmp_path / "a"), **kw))
    run(TrainConfig(out=str(tmp_path / "b"), stop_after=1, **kw))
    res = run(TrainConfig(out=str(tmp_path / "b"), resume=True, **kw))
    assert all(torch.equal(full.scores[n], res.scores[n]) for n in full.scores)
    # and everything else the run saves: queue, prototypes, projection, momentum, metrics
    same_run(tmp_path / "a", tmp_path / "b")
