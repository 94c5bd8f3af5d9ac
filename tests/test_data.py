"""Datasets, transforms and seeded sampling (tiny data: digits, hand-built CIFAR and ImageFolder)."""

import hashlib
import pickle

import numpy as np
import pytest
import torch

from maskpack import data
from maskpack.errors import ConfigError, DataError

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _write_cifar10(root, n_train=10, n_test=6):
    """A tiny CIFAR-10 in the official python format; returns the md5 lists torchvision checks."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    files = {}

    def batch(name, n, offset):
        obj = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
               "labels": [(i + offset) % 10 for i in range(n)], "batch_label": name}
        (d / name).write_bytes(pickle.dumps(obj))
        files[name] = hashlib.md5((d / name).read_bytes()).hexdigest()

    for i in range(1, 6):
        batch(f"data_batch_{i}", n_train // 5, i)
    batch("test_batch", n_test, 0)
    meta = {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                            "ship", "truck"]}
    (d / "batches.meta").write_bytes(pickle.dumps(meta))
    files["batches.meta"] = hashlib.md5((d / "batches.meta").read_bytes()).hexdigest()
    return files


@pytest.fixture
def tiny_cifar10(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10

    md5 = _write_cifar10(tmp_path)
    # torchvision checks the official archives' md5; point it at our tiny files' checksums.
    train_list = [[f"data_batch_{i}", md5[f"data_batch_{i}"]] for i in range(1, 6)]
    monkeypatch.setattr(CIFAR10, "train_list", train_list)
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5["test_batch"]]])
    monkeypatch.setattr(CIFAR10, "meta", {"filename": "batches.meta", "key": "label_names",
                                          "md5": md5["batches.meta"]})
    return tmp_path


def make_imagefolder(root, classes=("a", "b", "c"), per_class=4, size=12):
    from PIL import Image

    rng = np.random.default_rng(1)
    for split in ("train", "test"):
        for ci, c in enumerate(classes):
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                arr[..., ci % 3] = 255  # a class-dependent colour
                Image.fromarray(arr).save(root / split / c / f"{i}.png")
    return root


def test_digits_fixed_split_and_size():
    a = data.load_dataset("digits", image_size=16)
    b = data.load_dataset("digits", image_size=16)
    assert (len(a.train), len(a.test), a.num_classes) == (1400, 397, 10)
    img, label = a.train[0]
    assert img.shape == (3, 16, 16) and img.dtype == torch.uint8 and 0 <= label < 10
    assert torch.equal(a.train.images, b.train.images)
    assert not a.flip  # flipping digits changes their meaning


def test_cifar10_tiny_archive(tiny_cifar10):
    d = data.load_dataset("cifar10", data_dir=str(tiny_cifar10))
    assert (len(d.train), len(d.test), d.num_classes, d.native_size) == (10, 6, 10, 32)
    assert d.classes[0] == "airplane"
    tf = data.supervised_transform(32, MEAN, STD)
    x, y = data.Augmented(d.train, tf)[(3, 7)]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert list(d.train_labels()[:3]) == [1, 2, 2]


def test_cifar_missing_files_is_one_clear_error(tmp_path):
    with pytest.raises(DataError, match="cifar-10-batches-py.*--download"):
        data.load_dataset("cifar10", data_dir=str(tmp_path))
    with pytest.raises(DataError, match="cifar-100-python"):
        data.load_dataset("cifar100", data_dir=str(tmp_path))


def test_imagefolder(tmp_path):
    root = make_imagefolder(tmp_path / "if")
    d = data.load_dataset(f"imagefolder:{root}")
    assert (len(d.train), len(d.test), d.num_classes, d.native_size) == (12, 12, 3, 12)
    (tmp_path / "bad" / "train" / "x").mkdir(parents=True)
    with pytest.raises(DataError, match="no 'test/' folder"):
        data.load_dataset(f"imagefolder:{tmp_path / 'bad'}")


def test_unknown_dataset():
    with pytest.raises(DataError, match="unknown dataset 'mnist'"):
        data.load_dataset("mnist")


def test_label_subset_stratified_and_seeded():
    labels = np.repeat(np.arange(5), 20)
    a = data.label_subset(labels, 0.1, seed=3)
    assert len(a) == 10 and np.bincount(labels[a]).tolist() == [2] * 5
    assert np.array_equal(a, data.label_subset(labels, 0.1, seed=3))
    assert not np.array_equal(a, data.label_subset(labels, 0.1, seed=4))
    assert len(data.label_subset(labels, 0.001)) == 5  # at least one per class
    assert len(data.label_subset(labels, 1.0)) == 100


@pytest.mark.parametrize("text", ["0", "1.5", "-0.1", "a,b", ""])
def test_parse_fractions_rejects(text):
    with pytest.raises(DataError):
        data.parse_fractions(text)


def test_parse_fractions():
    assert data.parse_fractions("0.01,0.1,1.0") == [0.01, 0.1, 1.0]


def test_sampler_is_a_function_of_seed_and_epoch():
    s = data.EpochSampler(50, seed=1)
    s.set_epoch(2)
    a = list(s)
    s.set_epoch(3)
    b = list(s)
    s.set_epoch(2)
    assert list(s) == a and a != b
    assert sorted(i for i, _ in a) == list(range(50))
    shards = [list(data.EpochSampler(50, seed=1, rank=r, world_size=2)) for r in (0, 1)]
    assert sorted(i for sh in shards for i, _ in sh) == list(range(50))


def test_augmentation_depends_only_on_key():
    d = data.load_dataset("digits", image_size=16)
    ds = data.Augmented(d.train, data.MultiCrop(16, MEAN, STD, n_global=2, n_local=2))
    a = ds[(5, 123)]
    torch.manual_seed(999)  # the global RNG must not matter
    torch.rand(10)
    b = ds[(5, 123)]
    c = ds[(5, 124)]
    assert all(torch.equal(x, y) for x, y in zip(a[0], b[0], strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a[0], c[0], strict=True))
    assert [t.shape[-1] for t in a[0]] == [16, 16, 8, 8]


def test_loader_batches_multicrop(tmp_path):
    root = make_imagefolder(tmp_path / "if", size=20)
    d = data.load_dataset(f"imagefolder:{root}")
    ds = data.Augmented(d.train, data.MultiCrop(16, MEAN, STD, n_global=2, n_local=3, local_size=8))
    s = data.EpochSampler(len(ds), seed=0)
    crops, labels = next(iter(data.make_loader(ds, batch_size=4, sampler=s)))
    assert [tuple(c.shape) for c in crops] == [(4, 3, 16, 16)] * 2 + [(4, 3, 8, 8)] * 3
    assert labels.shape == (4,)


def test_multicrop_strength_knobs():
    from torchvision.transforms import v2

    def kinds(mc):
        out = set()
        for t in mc.pipes[0].transforms:
            inner = t.transforms if isinstance(t, v2.RandomApply) else [t]
            out |= {type(x).__name__ for x in inner}
        return out

    strong = kinds(data.MultiCrop(16, MEAN, STD, n_local=0))
    assert {"ColorJitter", "RandomGrayscale", "GaussianBlur"} <= strong
    mild = kinds(data.MultiCrop(16, MEAN, STD, n_local=0, jitter=0.0, blur=False))
    assert not {"ColorJitter", "RandomGrayscale", "GaussianBlur"} & mild
    assert "RandomResizedCrop" in mild
    jit = [t for t in data.MultiCrop(16, MEAN, STD, n_local=0, jitter=0.4).pipes[0].transforms
           if isinstance(t, v2.RandomApply) and isinstance(t.transforms[0], v2.ColorJitter)]
    assert jit and jit[0].transforms[0].brightness == (0.6, 1.4)
    with pytest.raises(ConfigError, match="jitter"):
        data.MultiCrop(16, MEAN, STD, jitter=1.5)
