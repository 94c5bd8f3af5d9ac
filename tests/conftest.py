import copy

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
def lite0_readonly():
    """The embedded Lite0, loaded once for the whole test run. Shared: tests must not change it
    (use ``lite0`` for a private copy). Its weights are re-hashed at the end of the run, so a test
    that changed them in place is reported."""
    from maskpack import backbone_hash, load_backbone

    bb = load_backbone("efficientnet_lite0")
    before = backbone_hash(bb.model)
    yield bb
    assert backbone_hash(bb.model) == before, "a test changed the shared lite0_readonly backbone in place"


@pytest.fixture
def lite0(lite0_readonly):
    """A private deep copy of the embedded Lite0 for one test: it may train, mask or damage it."""
    return copy.deepcopy(lite0_readonly)


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


TIMINGS = ("images_per_s", "epoch_seconds")  # the only run outputs allowed to differ
RUN_SPECIFIC = ("out", "resume", "stop_after")  # config fields that name the run, not its training


def _without_timings(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMINGS} for row in rows]


def assert_same_run(a, b) -> None:
    """Two run directories hold the same training: every tensor of the final checkpoint (scores,
    extras, objective state, momentum, RNG state) bit for bit, the same step, metadata, config
    (but its out/resume/stop_after), per-epoch metrics except timings, and the same task file."""
    import json
    from pathlib import Path

    from maskpack.train import load_checkpoint

    a, b = Path(a), Path(b)
    ca, cb = load_checkpoint(a / "checkpoint.pt"), load_checkpoint(b / "checkpoint.pt")
    assert set(ca) == set(cb)
    for key in ("scores", "extras", "objective", "momentum"):
        assert list(ca[key]) == list(cb[key]), key
        for name, t in ca[key].items():
            assert t.dtype == cb[key][name].dtype and torch.equal(t, cb[key][name]), (key, name)
    assert torch.equal(ca["rng_torch"], cb["rng_torch"])
    for key in set(ca) - {"scores", "extras", "objective", "momentum", "rng_torch", "config", "history"}:
        assert ca[key] == cb[key], key
    conf_a, conf_b = json.loads(ca["config"]), json.loads(cb["config"])
    assert {k: v for k, v in conf_a.items() if k not in RUN_SPECIFIC} == \
        {k: v for k, v in conf_b.items() if k not in RUN_SPECIFIC}
    assert _without_timings(json.loads(ca["history"])) == _without_timings(json.loads(cb["history"]))
    rows = [[json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (a, b)]
    assert _without_timings(rows[0]) == _without_timings(rows[1])
    assert (a / "task.mask").exists() == (b / "task.mask").exists()
    if (a / "task.mask").exists():
        assert (a / "task.mask").read_bytes() == (b / "task.mask").read_bytes()
    assert (a / "model.safetensors").exists() == (b / "model.safetensors").exists()
    if (a / "model.safetensors").exists():
        # not bytes: safetensors writes its metadata in hash-map order, which varies by process
        from safetensors import safe_open

        with safe_open(a / "model.safetensors", "pt") as fa, safe_open(b / "model.safetensors", "pt") as fb:
            assert fa.metadata() == fb.metadata() and list(fa.keys()) == list(fb.keys())
            assert all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys())


@pytest.fixture
def same_run():
    """:func:`assert_same_run`, for tests that resume a run and claim it is identical."""
    return assert_same_run


@pytest.fixture
def good(tmp_path) -> bytes:
    """A small valid raw-codec ``.mask`` file's bytes (tests/mask_files.py builds hostile variants)."""
    from mask_files import save_good

    return save_good(tmp_path)


@pytest.fixture
def good_zstd(tmp_path) -> bytes:
    """The same file with the zstd codec."""
    from mask_files import save_good

    return save_good(tmp_path, "zstd", name="good_zstd.mask")
