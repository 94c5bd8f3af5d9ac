"""The paper's two theorems on the CPU (SGD with momentum, identical data order): Theorem 2 holds
bit for bit (scaling by 2 is exact in floating point); Theorem 1 up to rounding (S0 + 0.5 and
the updates round differently), so its masks agree on at least 99.9% of the weights."""

import pytest
import torch
from torch import nn

from maskpack import masking


def _run(init: float, threshold: float, lr: float, steps: int = 6, weight_decay: float = 0.0):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 5))
    for p in net.parameters():
        p.requires_grad_(False)
    masking.apply_masks_(net, init=init, threshold=threshold)
    opt = torch.optim.SGD(masking.score_parameters(net), lr=lr, momentum=0.9, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(123)
    for _ in range(steps):
        x, y = torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 5, (16,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return masking.extract_masks(net)


def _agreement(a, b):
    same = sum(int((a[k] == b[k]).sum()) for k in a)
    return same / sum(a[k].numel() for k in a)


def test_theorem2_scaling_init_equals_scaling_lr_exactly():
    a = _run(init=1.0, threshold=0.0, lr=50.0)
    b = _run(init=2.0, threshold=0.0, lr=100.0)
    assert sum(int((~m).sum()) for m in a.values()) >= 5  # the masks really moved
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_theorem1_shifting_init_and_threshold_together_changes_nothing():
    a = _run(init=1.0, threshold=0.0, lr=50.0)
    b = _run(init=1.5, threshold=0.5, lr=50.0)
    assert sum(int((~m).sum()) for m in a.values()) >= 5
    assert _agreement(a, b) >= 0.999


def test_weight_decay_on_scores_breaks_theorem2():
    # Documented: weight decay pulls scores towards 0, which depends on their scale.
    a = _run(init=1.0, threshold=0.0, lr=50.0, weight_decay=0.05)
    b = _run(init=2.0, threshold=0.0, lr=100.0, weight_decay=0.05)
    assert not all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("init", [1.0, 2.0])
def test_runs_are_deterministic(init):
    a, b = _run(init, 0.0, 50.0), _run(init, 0.0, 50.0)
    assert all(torch.equal(a[k], b[k]) for k in a)
