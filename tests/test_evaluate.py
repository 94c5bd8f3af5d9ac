"""Evaluation: k-NN against a brute-force reference, linear probe, BN re-estimation, protocol."""

import numpy as np
import pytest
import torch
from torch import nn

from maskpack import bn, runtime
from maskpack import evaluate as ev
from maskpack.errors import ConfigError


def _reference_knn(bank, bank_y, queries, k, t, c):
    bank = bank / bank.norm(dim=1, keepdim=True)
    queries = queries / queries.norm(dim=1, keepdim=True)
    preds = []
    for q in queries:
        sims = [(float(q @ b), int(y)) for b, y in zip(bank, bank_y, strict=True)]
        sims.sort(key=lambda s: -s[0])
        votes = [0.0] * c
        for s, y in sims[:k]:
            votes[y] += float(np.exp(s / t))
        preds.append(int(np.argmax(votes)))
    return preds


def test_knn_matches_brute_force():
    torch.manual_seed(0)
    bank, bank_y = torch.randn(60, 5), torch.randint(0, 3, (60,))
    q, q_y = torch.randn(20, 5), torch.randint(0, 3, (20,))
    ref = _reference_knn(bank, bank_y, q, 7, 0.1, 3)
    expected = float(np.mean(np.array(ref) == q_y.numpy()))
    assert ev.knn_accuracy(bank, bank_y, q, q_y, k=7, temperature=0.1, chunk=6) == pytest.approx(expected)


def test_knn_separable_and_k_clamped():
    bank = torch.tensor([[1.0, 0], [0.9, 0.1], [0, 1.0], [0.1, 0.9]])
    y = torch.tensor([0, 0, 1, 1])
    assert ev.knn_accuracy(bank, y, bank * 2, y, k=200) == 1.0
    with pytest.raises(ConfigError):
        ev.knn_accuracy(bank[:0], y[:0], bank, y)


def test_linear_probe_learns_separable_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 4))
    y = (x[:, 0] > 0).astype(int)
    assert ev.linear_probe(x[:150], y[:150], x[150:], y[150:]) > 0.9
    with pytest.raises(ConfigError, match="two classes"):
        ev.linear_probe(x[:5], np.zeros(5), x, y)


def test_evaluate_features_label_fractions():
    torch.manual_seed(0)
    f = torch.randn(100, 3)
    y = (f[:, 0] > 0).long()
    out = ev.evaluate_features(f, y, f, y, fractions=(0.1, 1.0), probe=True)
    assert set(out) == {"knn@0.1", "probe@0.1", "knn@1", "probe@1"}
    assert out["probe@1"] > 0.9


def test_reestimate_bn_is_cumulative_average():
    net = nn.Sequential(nn.BatchNorm1d(2, momentum=0.01)).eval()
    data = [(torch.randn(8, 2) * 3 + 5, torch.zeros(8)) for _ in range(4)]
    n = bn.reestimate_bn_(net, data, max_batches=10)
    allx = torch.cat([x for x, _ in data])
    assert n == 4 and not net.training and net[0].momentum == 0.01
    torch.testing.assert_close(net[0].running_mean, allx.mean(0))
    saved = bn.bn_state(net)
    net[0].running_mean.zero_()
    bn.load_bn_state_(net, saved)
    torch.testing.assert_close(net[0].running_mean, allx.mean(0))


def test_resolve_device():
    assert runtime.resolve_device("cpu").type == "cpu"
    with pytest.raises(ConfigError):
        runtime.resolve_device("tpu")
    if not torch.cuda.is_available():
        assert runtime.resolve_device("auto").type == "cpu"
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            runtime.resolve_device("cuda")


def test_evaluate_backbone_and_task(tmp_path):
    from maskpack.train import TrainConfig, run

    r = run(TrainConfig(dataset="digits", image_size=16, batch_size=32, epochs=1,
                        train_indices=list(range(64)), quiet=True, threads=1, eval_every=0,
                        eval_knn="never", bn_reestimate_batches=2, out=str(tmp_path / "r")))
    res = ev.evaluate(tmp_path / "r", fractions=(0.05, 1.0), probe=False)
    assert set(res) == {"backbone", "task"}
    assert set(res["task"]) == {"accuracy", "knn@0.05", "knn@1"}
    assert "accuracy" not in res["backbone"]
    assert res["backbone"]["knn@1"] > 0.3  # frozen Lite0 features separate digits well above chance
    assert res["task"]["accuracy"] == pytest.approx(r.metrics["accuracy"], abs=1e-6)
