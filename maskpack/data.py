"""Datasets and transforms for training and evaluation.

Datasets (by name):
    * ``digits``: scikit-learn's bundled 8x8 digits, upsampled to RGB at the chosen size, with a
      fixed 1,400 / 397 train/test split. Needs no download: the embedded default.
    * ``cifar10`` / ``cifar100``: torchvision's classes over the official python archives in
      ``data_dir`` (default ``~/.cache/maskpack/data``), fetched there on first use (md5-checked,
      see :mod:`maskpack.download`) unless ``download=False`` or ``MASKPACK_OFFLINE`` is set.
    * ``imagefolder:PATH``: ``PATH/train/<class>/*`` and ``PATH/test/<class>/*`` as torchvision's
      ``ImageFolder`` reads them.

Determinism: the augmentation of every sample is drawn from a generator seeded by
``(seed, epoch, index)`` (see :class:`EpochSampler` and :class:`Augmented`), so the data a run
sees depends only on its seed and epoch, not on worker count, process order or what else used
the global RNG. That is what makes ``--resume`` reproduce an uninterrupted run exactly.

Example:
    >>> data = load_dataset("digits", image_size=32)
    >>> len(data.train), len(data.test), data.num_classes
    (1400, 397, 10)
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .errors import ConfigError, DataError

DIGITS_TRAIN = 1400  # fixed split of the 1,797 digits: first 1,400 of a seed-0 permutation


@dataclass
class DataBundle:
    """A dataset's raw train and test splits.

    Attributes:
        name: the dataset name as given.
        train, test: datasets returning ``(image, label)``; images are PIL images or uint8
            tensors (3, H, W), not yet transformed.
        num_classes: number of classes.
        classes: class names.
        native_size: the images' own side length (used as the default image size).
        flip: whether horizontal flips preserve the label (not for digits).
    """

    name: str
    train: Dataset
    test: Dataset
    num_classes: int
    classes: list[str]
    native_size: int
    flip: bool = True

    def train_labels(self) -> np.ndarray:
        return dataset_labels(self.train)


class TensorImages(Dataset):
    """uint8 images (N, 3, H, W) and integer labels in memory."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels
        self.targets = labels.tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i])


def dataset_labels(ds: Dataset) -> np.ndarray:
    """Integer labels of a dataset without decoding its images."""
    targets = getattr(ds, "targets", None)
    if targets is None:
        raise DataError(f"dataset {type(ds).__name__} does not expose its labels (.targets)")
    return np.asarray(targets, dtype=np.int64)


# ----------------------------------------------------------------------------- datasets


def _digits(image_size: int) -> DataBundle:
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]  # (N, 1, 8, 8) in 0..1
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    y = torch.from_numpy(d.target.astype(np.int64))
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:DIGITS_TRAIN], perm[DIGITS_TRAIN:]
    classes = [str(i) for i in range(10)]
    return DataBundle("digits", TensorImages(x[tr], y[tr]), TensorImages(x[te], y[te]), 10, classes,
                      image_size, flip=False)


_CIFAR_DIRS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


def _cifar(name: str, data_dir: str | None, download: bool | None, quiet: bool) -> DataBundle:
    from torchvision import datasets

    from .download import CIFAR, data_root, ensure_cifar

    root = str(data_root(data_dir))
    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100

    def open_splits():
        try:  # torchvision checks every extracted file's md5 and reads the pickled batches
            return cls(root, train=True), cls(root, train=False)
        except RuntimeError:  # "Dataset not found or corrupted"
            return None

    splits = open_splits()
    if splits is None:
        ensure_cifar(name, root, download=download, quiet=quiet, present=lambda: open_splits() is not None)
        splits = open_splits()
    if splits is None:
        a = CIFAR[name]
        raise DataError(f"{name}: {root}/{a.folder} fails torchvision's checksums even after extracting "
                        f"{a.filename}: delete that folder and the archive, then run again")
    train, test = splits
    return DataBundle(name, train, test, len(train.classes), list(train.classes), 32)


def _imagefolder(path: str) -> DataBundle:
    from torchvision import datasets

    root = os.path.expanduser(path)
    for split in ("train", "test"):
        if not os.path.isdir(os.path.join(root, split)):
            raise DataError(f"imagefolder {root!r} has no '{split}/' folder: expected "
                            f"{root}/train/<class>/<image> and {root}/test/<class>/<image>")
    try:
        train = datasets.ImageFolder(os.path.join(root, "train"))
        test = datasets.ImageFolder(os.path.join(root, "test"))
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(f"imagefolder {root!r}: {exc}") from exc
    if train.classes != test.classes:
        raise DataError(f"imagefolder {root!r}: train/ and test/ have different class folders "
                        f"({len(train.classes)} vs {len(test.classes)})")
    first, _ = train[0]
    native = min(first.size)
    return DataBundle(f"imagefolder:{path}", train, test, len(train.classes), list(train.classes), native)


def dataset_names() -> list[str]:
    """The dataset names :func:`load_dataset` understands."""
    return ["digits", "cifar10", "cifar100", "imagefolder:PATH"]


def load_dataset(name: str, *, image_size: int | None = None, data_dir: str | None = None,
                 download: bool | None = None, quiet: bool = False) -> DataBundle:
    """Open a named dataset's train and test splits (raw images, no transforms).

    Args:
        name: ``digits``, ``cifar10``, ``cifar100`` or ``imagefolder:PATH``.
        image_size: digits are rendered at this size (default 32); others ignore it here.
        data_dir: where the CIFAR archives live (default ``~/.cache/maskpack/data``).
        download: a missing CIFAR archive is fetched when True, never when False, and when None
            unless the environment sets ``MASKPACK_OFFLINE`` (see :mod:`maskpack.download`).
        quiet: no download progress bar or messages (they go to stderr).

    Returns:
        The dataset's :class:`DataBundle`.

    Raises:
        DataError: unknown name, files missing while downloading is off (the message says which
            archive to put where), or a failed download.
    """
    if name == "digits":
        return _digits(image_size or 32)
    if name in _CIFAR_DIRS:
        return _cifar(name, data_dir, download, quiet)
    if name.startswith("imagefolder:"):
        path = name.removeprefix("imagefolder:")
        if not path:
            raise DataError("imagefolder needs a path: --dataset imagefolder:PATH")
        return _imagefolder(path)
    raise DataError(f"unknown dataset {name!r}: use one of {', '.join(dataset_names())}")


# ----------------------------------------------------------------------------- subsets


def parse_fractions(text: str) -> list[float]:
    """``"0.01,0.1,1.0"`` -> ``[0.01, 0.1, 1.0]``, each checked to lie in (0, 1]."""
    try:
        fracs = [float(t) for t in text.split(",") if t.strip()]
    except ValueError as exc:
        raise DataError(f"label fractions must be numbers like 0.01,0.1,1.0, got {text!r}") from exc
    if not fracs:
        raise DataError("no label fraction given")
    for f in fracs:
        check_fraction(f)
    return fracs


def check_fraction(fraction: float) -> float:
    if not 0.0 < fraction <= 1.0:
        raise DataError(f"label fraction must be in (0, 1], got {fraction}")
    return fraction


def label_subset(labels: Sequence[int] | np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """Indices of a class-stratified random ``fraction`` of the samples (at least one per class).

    The same ``(labels, fraction, seed)`` always give the same indices, sorted ascending.
    """
    check_fraction(fraction)
    labels = np.asarray(labels)
    if fraction >= 1.0:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    out = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n = max(1, int(round(fraction * len(idx))))
        out.append(rng.choice(idx, size=n, replace=False))
    return np.sort(np.concatenate(out))


# ----------------------------------------------------------------------------- transforms


def _base(image_size: int):
    from torchvision.transforms import v2

    return [v2.ToImage(), v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)]


def _finish(mean, std):
    from torchvision.transforms import v2

    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


def eval_transform(image_size: int, mean, std):
    """Resize (shorter side) + centre crop + normalise."""
    from torchvision.transforms import v2

    return v2.Compose(_base(image_size) + _finish(mean, std))


def supervised_transform(image_size: int, mean, std, *, flip: bool = True, native_size: int | None = None):
    """Training augmentation: random flip, and a reflect-padded random crop (1/8 of the side)
    for small images (<= 64 px native) or a random-resized crop for larger ones."""
    from torchvision.transforms import v2

    ts = [v2.ToImage()]
    if native_size is not None and native_size > 64:
        ts.append(v2.RandomResizedCrop(image_size, scale=(0.35, 1.0), antialias=True))
    else:
        ts += [v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size),
               v2.RandomCrop(image_size, padding=max(1, image_size // 8), padding_mode="reflect")]
    if flip:
        ts.append(v2.RandomHorizontalFlip())
    return v2.Compose(ts + _finish(mean, std))


def local_crop_size(image_size: int) -> int:
    """Side of SwAV's small crops: 96/224 of the global size (at least 8 px)."""
    return max(8, int(round(image_size * 96 / 224)))


class MultiCrop:
    """SwAV multi-crop: ``n_global`` crops at ``image_size`` and ``n_local`` small crops.

    Each crop: random-resized crop (scales (0.14, 1) global, (0.05, 0.14) local), flip, colour
    jitter (s, s, s, s/4) with p=0.8 and grayscale p=0.2 (``jitter`` s = 0.8, SwAV's; 0 turns
    both off), Gaussian blur p=0.5 (``blur``), normalise. Returns a list of tensors, global
    crops first.
    """

    def __init__(self, image_size: int, mean, std, *, n_global: int = 2, n_local: int = 6,
                 global_scale=(0.14, 1.0), local_scale=(0.05, 0.14), local_size: int | None = None,
                 flip: bool = True, jitter: float = 0.8, blur: bool = True):
        from torchvision.transforms import v2

        if not 0 <= jitter <= 1:
            raise ConfigError(f"colour jitter strength {jitter} must be in [0, 1]")

        def pipe(size: int, scale) -> v2.Compose:
            k = max(3, (size // 10) | 1)  # odd blur kernel about a tenth of the crop
            ts = [v2.ToImage(), v2.RandomResizedCrop(size, scale=tuple(scale), antialias=True)]
            if flip:
                ts.append(v2.RandomHorizontalFlip())
            if jitter:
                ts += [v2.RandomApply([v2.ColorJitter(jitter, jitter, jitter, jitter / 4)], p=0.8),
                       v2.RandomGrayscale(p=0.2)]
            if blur:
                ts.append(v2.RandomApply([v2.GaussianBlur(k, sigma=(0.1, 2.0))], p=0.5))
            return v2.Compose(ts + _finish(mean, std))

        self.sizes = [image_size] * n_global + [local_size or local_crop_size(image_size)] * n_local
        self.pipes = [pipe(image_size, global_scale)] * n_global
        self.pipes += [pipe(self.sizes[-1], local_scale)] * n_local

    def __call__(self, img) -> list[torch.Tensor]:
        return [p(img) for p in self.pipes]


# ----------------------------------------------------------------------------- seeded sampling


def _mix(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64-style), stable across processes."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h ^= (int(p) + 0x9E3779B97F4A7C15 + ((h << 6) & (2**64 - 1)) + (h >> 2)) & (2**64 - 1)
        h = (h * 0xBF58476D1CE4E5B9) & (2**64 - 1)
        h ^= h >> 31
    return h & (2**63 - 1)


class Augmented(Dataset):
    """Applies ``transform`` to ``base[index]`` under a generator seeded by the key's seed.

    Keys are ``(index, sample_seed)`` pairs from :class:`EpochSampler` (or plain indices, which
    use seed 0). The CPU generator's state is restored afterwards, so nothing outside sees the draw.
    """

    def __init__(self, base: Dataset, transform, indices: Sequence[int] | None = None):
        self.base, self.transform = base, transform
        self.indices = None if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices) if self.indices is not None else len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key):
        i, sample_seed = key if isinstance(key, tuple) else (key, 0)
        img, label = self.base[self.indices[i] if self.indices is not None else i]
        # Transforms draw from the CPU default generator. Seeding only that generator (not
        # torch.manual_seed, which also seeds every accelerator backend: ~0.5 ms a call) and
        # restoring its state afterwards costs microseconds, and nothing outside sees the draw.
        gen = torch.default_generator
        state = gen.get_state()
        gen.manual_seed(sample_seed)
        try:
            return self.transform(img), label
        finally:
            gen.set_state(state)


class EpochSampler(Sampler):
    """Yields ``(position, sample_seed)`` keys: a permutation drawn from ``(seed, epoch)``.

    Call :meth:`set_epoch` before each epoch. ``rank``/``world_size`` split each permutation
    into disjoint strided shards, as ``DistributedSampler`` does: under DDP (torchrun) rank ``r``
    takes positions ``r, r + W, ...``, so the ranks' batches of a step together are the global
    batch one process would take, and the seeds stay ``(seed, epoch, index)``.
    """

    def __init__(self, n: int, *, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world_size))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(_mix(self.seed, self.epoch, 1))
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        for i in order[self.rank::self.world_size]:
            yield i, _mix(self.seed, self.epoch, i, 2)


def make_loader(dataset: Augmented, *, batch_size: int, sampler: Sampler | None = None,
                num_workers: int = 0, pin_memory: bool = False, drop_last: bool = False):
    """A DataLoader over an :class:`Augmented` dataset; the sampler decides order and seeds.

    Without a sampler the order is fixed (evaluation) and every sample uses seed 0.
    """
    from torch.utils.data import DataLoader

    if sampler is None:
        sampler = EpochSampler(len(dataset), shuffle=False)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=pin_memory, drop_last=drop_last,
                      persistent_workers=False, prefetch_factor=4 if num_workers else None)
