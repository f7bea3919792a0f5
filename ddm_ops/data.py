"""Datasets as tensors with a fixed train/test split; positions in that split are the stable train_index/test_index.

Built in: `digits` (ships with scikit-learn; split here with a fixed seed), `fashion-mnist` (gzip IDX files),
`mnist`, `cifar10`, `cifar100` (torchvision's file layouts, downloaded only when `data.download` allows it) and
`tinyimagenet` (its ImageFolder layout); those five keep their own train/test split. A user's own dataset is a
dotted path `module:function`, called with `data.root`, returning (x_train, y_train, x_test, y_test) as tensors
or arrays, or (train, test) as torch datasets of (image, label).
"""

from __future__ import annotations

import gzip
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from ddm_ops.cluster import cluster_within_classes
from ddm_ops.config import BUILTIN_DATASETS, DataParams, LabelNoiseParams, ParamsError, import_dotted

SPLIT_SEED = 0  # the split is part of the dataset's definition, never of a run's seed
NOISE_GROUPS_PER_CLASS = 5  # label_noise.mode clustered: pixel-space k-means groups per class
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


class DataError(FileNotFoundError):
    """A dataset's files are missing or unreadable; the message names the path and how to obtain the data."""


@dataclass(frozen=True)
class Dataset:
    """Normalised images (N, C, H, W) float32, integer labels, and their positions in the fixed split.

    y_train holds the labels as the model sees them: with `data.label_noise`, `noisy` marks the flipped ones and
    `true_train_labels` keeps the originals.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    train_index: np.ndarray
    test_index: np.ndarray
    num_classes: int
    mean: torch.Tensor
    std: torch.Tensor
    noisy: np.ndarray
    true_train_labels: np.ndarray

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]

    def denormalise(self, x: torch.Tensor) -> torch.Tensor:
        """Back to the [0, 1] pixel range (for figures and privacy checks); x is (..., C, H, W)."""
        return (x * self.std[:, None, None] + self.mean[:, None, None]).clamp(0.0, 1.0)


@dataclass(frozen=True)
class Split:
    """One split as loaded from disk: labels, and images (n, C, H, W) in [0, 1] read for given positions only."""

    labels: np.ndarray
    images: Callable[[np.ndarray], np.ndarray]

    @classmethod
    def of(cls, images: np.ndarray, labels: np.ndarray) -> Split:
        """From an array of images (N, C, H, W) or (N, H, W), uint8 (0-255) or float (0-1)."""
        if images.ndim == 3:
            images = images[:, None]
        scale = 255.0 if images.dtype == np.uint8 else 1.0
        return cls(np.asarray(labels, dtype=np.int64), lambda pos: (images[pos] / scale).astype(np.float32))

    def take(self, positions: np.ndarray) -> Split:
        """The split restricted to `positions` (in that order)."""
        return Split(self.labels[positions], lambda pos: self.images(positions[pos]))


# --- file formats -------------------------------------------------------------------------------------------


def read_idx(path: Path) -> np.ndarray:
    """An IDX file of unsigned bytes (MNIST's format), gzip-compressed when its name ends in .gz."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as err:
        raise DataError(f"{path}: unreadable ({err})") from None
    if len(data) < 4 or data[0] or data[1] or data[2] != 0x08:
        raise DataError(f"{path}: not an IDX file of unsigned bytes")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = data[4 + 4 * ndim :]
    if len(body) != int(np.prod(dims)):
        raise DataError(f"{path}: truncated or corrupt: {len(body)} bytes of data, its header says {dims}")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only (CIFAR's batches), never arbitrary objects."""

    ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def read_cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR python batch: images (n, 3, 32, 32) uint8 and labels."""
    try:
        with path.open("rb") as fh:
            batch = _ArrayUnpickler(fh, encoding="latin1").load()
        data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except (OSError, EOFError, pickle.UnpicklingError, KeyError, ValueError, TypeError) as err:
        raise DataError(f"{path}: not a readable CIFAR batch ({type(err).__name__}: {err})") from None
    if len(labels) != len(data):
        raise DataError(f"{path}: {len(data)} images but {len(labels)} labels")
    return data, labels


# --- loaders ---------------------------------------------------------------------------------------------------


def _digits(params: DataParams) -> tuple[Split, None]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return Split.of((d.images / 16.0).astype(np.float32), d.target), None


FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _idx_file(folder: Path, name: str) -> Path | None:
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    return None


def _fashion_mnist(params: DataParams) -> tuple[Split, Split]:
    root = Path(params.root)
    folders = [root / "fashion-mnist", root, DEBIAN_FASHION_MNIST]
    names = [n for pair in FASHION_FILES.values() for n in pair]
    for folder in folders:
        files = [_idx_file(folder, n) for n in names]
        if all(files):
            break
    else:
        raise DataError(
            f"fashion-mnist: the IDX files ({', '.join(f'{n}.gz' for n in names)}) are in none of "
            f"{', '.join(str(f) for f in folders)}. Install Debian's package (apt-get install dataset-fashion-mnist) "
            f"or put the four files from https://github.com/zalandoresearch/fashion-mnist into {root / 'fashion-mnist'}"
        )
    x_train, y_train, x_test, y_test = (read_idx(f) for f in files)
    for x, y, f in ((x_train, y_train, files[0]), (x_test, y_test, files[2])):
        if len(x) != len(y):
            raise DataError(f"{f}: {len(x)} images but {len(y)} labels in the matching labels file")
    return Split.of(x_train, y_train), Split.of(x_test, y_test)


def _torchvision_download(params: DataParams, cls_name: str, folder: Path, hint: str) -> None:
    """Fetch a torchvision dataset into data.root when data.download allows it; else say how to get it."""
    if not params.download:
        raise DataError(
            f"{params.name}: no data in {folder} ({hint}); set data.download: true to fetch it with torchvision, "
            f"or copy the files there"
        )
    import torchvision

    getattr(torchvision.datasets, cls_name)(params.root, download=True)


def _mnist(params: DataParams) -> tuple[Split, Split]:
    raw = Path(params.root) / "MNIST" / "raw"
    names = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    if not all(_idx_file(raw, n) for n in names):
        _torchvision_download(params, "MNIST", raw, "torchvision's MNIST layout: " + ", ".join(names))
    from torchvision.datasets import MNIST

    splits = []
    for train in (True, False):
        try:
            d = MNIST(params.root, train=train, download=False)
        except (RuntimeError, ValueError, AssertionError, OSError) as err:
            raise DataError(f"{raw}: unreadable MNIST files ({type(err).__name__}: {err})") from None
        splits.append(Split.of(d.data.numpy(), d.targets.numpy()))
    return splits[0], splits[1]


CIFAR = {
    "cifar10": ("CIFAR10", "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels"),
    "cifar100": ("CIFAR100", "cifar-100-python", ["train"], ["test"], "fine_labels"),
}


def _cifar(params: DataParams) -> tuple[Split, Split]:
    cls_name, sub, train_files, test_files, key = CIFAR[params.name]
    folder = Path(params.root) / sub
    if not all((folder / f).is_file() for f in train_files + test_files):
        _torchvision_download(params, cls_name, folder, "the python version: " + ", ".join(train_files + test_files))
    splits = []
    for files in (train_files, test_files):
        parts = [read_cifar_batch(folder / f, key) for f in files]
        splits.append(Split.of(np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])))
    return splits[0], splits[1]


def _image_files(paths: list[Path], labels: list[int]) -> Split:
    def images(pos: np.ndarray) -> np.ndarray:
        from PIL import Image

        out = []
        for p in pos:
            try:
                with Image.open(paths[p]) as im:
                    out.append(np.asarray(im.convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255.0)
            except OSError as err:
                raise DataError(f"{paths[p]}: unreadable image ({err})") from None
        return np.stack(out)

    return Split(np.asarray(labels, dtype=np.int64), images)


def _tinyimagenet(params: DataParams) -> tuple[Split, Split]:
    from torchvision.datasets import ImageFolder

    root = Path(params.root) / "tiny-imagenet-200"
    train_dir, val_dir = root / "train", root / "val"
    if not train_dir.is_dir() or not val_dir.is_dir():
        raise DataError(
            f"tinyimagenet: {train_dir} and {val_dir} must exist (the ImageFolder layout of tiny-imagenet-200.zip, "
            f"from http://cs231n.stanford.edu/tiny-imagenet-200.zip, unzipped into {params.root})"
        )
    try:
        train = ImageFolder(str(train_dir))
    except (FileNotFoundError, RuntimeError) as err:
        raise DataError(f"{train_dir}: {err}") from None
    annotations = val_dir / "val_annotations.txt"
    if annotations.is_file():  # the archive's layout: val/images/*.JPEG and a table of file -> class
        rows = [line.split("\t")[:2] for line in annotations.read_text().splitlines() if line.strip()]
        unknown = sorted({wnid for _, wnid in rows} - set(train.class_to_idx))
        if unknown:
            raise DataError(f"{annotations}: classes {unknown[:3]} have no folder in {train_dir}")
        test_paths = [val_dir / "images" / name for name, _ in rows]
        test_labels = [train.class_to_idx[wnid] for _, wnid in rows]
    else:  # val/<class>/... like train
        val = ImageFolder(str(val_dir))
        test_paths = [Path(p) for p, _ in val.samples]
        test_labels = [train.class_to_idx[val.classes[t]] for _, t in val.samples]
    return (
        _image_files([Path(p) for p, _ in train.samples], [t for _, t in train.samples]),
        _image_files(test_paths, test_labels),
    )


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _stack(dataset) -> tuple[np.ndarray, np.ndarray]:
    """A torch dataset of (image, label) pairs as arrays."""
    return _numpy(torch.stack([torch.as_tensor(x) for x, _ in dataset])), np.array([int(y) for _, y in dataset])


def _user(params: DataParams) -> tuple[Split, Split]:
    """A user's loader `module:function`, called with data.root."""
    result = import_dotted("data.name", params.name)(params.root)
    if isinstance(result, tuple) and len(result) == 2:
        result = (*_stack(result[0]), *_stack(result[1]))
    if not (isinstance(result, tuple) and len(result) == 4):
        raise ParamsError(
            f"data.name = {params.name!r}: must return (x_train, y_train, x_test, y_test) or (train, test) datasets"
        )
    x_train, y_train, x_test, y_test = (_numpy(v) for v in result)
    for x, y, split in ((x_train, y_train, "train"), (x_test, y_test, "test")):
        if x.ndim not in (3, 4) or y.ndim != 1 or len(x) != len(y):
            raise ParamsError(
                f"data.name = {params.name!r}: {split} images must be (N, C, H, W) or (N, H, W) with N labels; "
                f"got images {x.shape} and labels {y.shape}"
            )
    return Split.of(x_train, y_train), Split.of(x_test, y_test)


LOADERS: dict[str, Callable[[DataParams], tuple[Split, Split | None]]] = {
    "digits": _digits,
    "fashion-mnist": _fashion_mnist,
    "mnist": _mnist,
    "cifar10": _cifar,
    "cifar100": _cifar,
    "tinyimagenet": _tinyimagenet,
}
assert set(LOADERS) == set(BUILTIN_DATASETS)


# --- the dataset of a run -----------------------------------------------------------------------------------


def _stratified_subset(labels: np.ndarray, n: int | None, seed: int, key: str) -> np.ndarray:
    """Positions of a stratified subset of size n (all positions when n is None)."""
    if n is None or n >= len(labels):
        return np.arange(len(labels))
    classes = np.unique(labels)
    if n < len(classes):
        raise ParamsError(f"data.subset.{key} = {n}: must keep at least one sample per class ({len(classes)})")
    keep, _ = train_test_split(np.arange(len(labels)), train_size=n, stratify=labels, random_state=seed)
    return np.sort(keep)


def flip_labels(
    images: torch.Tensor, labels: np.ndarray, num_classes: int, params: LabelNoiseParams
) -> tuple[np.ndarray, np.ndarray]:
    """(labels with `params.fraction` of them flipped to another class, mask of the flipped ones).

    uniform: samples drawn at random, each given another class at random. clustered: whole groups of similar
    images (k-means on pixels within each class) given one other class each, until the fraction is reached: a
    systematic mislabelling, as by a confused annotator.
    """
    rng = np.random.default_rng([params.seed, 3])
    target = round(params.fraction * len(labels))
    seen, flipped = labels.copy(), np.zeros(len(labels), dtype=bool)

    def other(c: int) -> int:  # any class but c, uniformly
        return int((c + rng.integers(1, num_classes)) % num_classes)

    if params.mode == "uniform":
        chosen = rng.choice(len(labels), size=target, replace=False)
        seen[chosen] = [other(c) for c in labels[chosen]]
        flipped[chosen] = True
    else:
        groups, _ = cluster_within_classes(images.flatten(1).numpy(), labels, NOISE_GROUPS_PER_CLASS, params.seed)
        for g in rng.permutation(groups.max() + 1):
            if flipped.sum() >= target:
                break
            members = groups == g
            seen[members] = other(int(labels[members][0]))
            flipped[members] = True
    return seen, flipped


def load_dataset(params: DataParams) -> Dataset:
    """Load the named dataset with its fixed split, keep the stratified subset, normalise per channel with the
    statistics of the training images kept."""
    train, test = LOADERS.get(params.name, _user)(params)
    if test is None:  # no split of its own: split once, with a seed that belongs to the dataset
        idx = np.arange(len(train.labels))
        tr, te = train_test_split(idx, test_size=params.test_fraction, stratify=train.labels, random_state=SPLIT_SEED)
        train, test = train.take(np.sort(tr)), train.take(np.sort(te))
    sub = params.subset
    train_index = _stratified_subset(train.labels, sub and sub.train, sub.seed if sub else 0, "train")
    test_index = _stratified_subset(test.labels, sub and sub.test, sub.seed if sub else 0, "test")
    x_train = torch.from_numpy(train.images(train_index))
    x_test = torch.from_numpy(test.images(test_index))
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(
            f"{params.name}: train images are {tuple(x_train.shape[1:])}, test images {tuple(x_test.shape[1:])}"
        )
    mean = x_train.mean(dim=(0, 2, 3))
    std = x_train.std(dim=(0, 2, 3)).clamp_min(1e-6)
    norm = lambda x: (x - mean[:, None, None]) / std[:, None, None]  # noqa: E731
    num_classes = int(max(train.labels.max(), test.labels.max())) + 1
    true_labels = train.labels[train_index]
    seen, noisy = true_labels, np.zeros(len(true_labels), dtype=bool)
    if params.label_noise is not None:
        seen, noisy = flip_labels(x_train, true_labels, num_classes, params.label_noise)
    return Dataset(
        name=params.name,
        x_train=norm(x_train).contiguous(),
        y_train=torch.from_numpy(seen),
        x_test=norm(x_test).contiguous(),
        y_test=torch.from_numpy(test.labels[test_index]),
        train_index=train_index,
        test_index=test_index,
        num_classes=num_classes,
        mean=mean,
        std=std,
        noisy=noisy,
        true_train_labels=true_labels,
    )
