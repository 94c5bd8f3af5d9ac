import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True)
def _no_dataset_downloads(monkeypatch):
    """No test fetches a dataset from the internet: downloading is off, and a test that turns it
    on must also point MASKPACK_CIFAR_URL at its own server (tests/test_download.py)."""
    monkeypatch.setenv("MASKPACK_OFFLINE", "1")
    monkeypatch.setenv("MASKPACK_CIFAR_URL", "http://127.0.0.1:9/no-downloads-in-tests")


@pytest.fixture(scope="session")
def lite0():
    from maskpack import load_backbone

    return load_backbone("efficientnet_lite0")


class TinyNet(nn.Module):
    """A small conv net with BN, a depthwise conv and a linear layer: a cheap test backbone."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.dw = nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, 16)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.dw(x)))
        return self.fc(x.mean((2, 3)))


@pytest.fixture
def tiny_net():
    torch.manual_seed(0)
    return TinyNet()
