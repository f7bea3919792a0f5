"""Every dataset loader on small files written here in the real on-disk format; missing and corrupt files are named."""

from __future__ import annotations

import gzip
import pickle
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ddm_ops import data
from ddm_ops.config import DataParams, ParamsError, SubsetParams
from ddm_ops.data import DataError, load_dataset, read_idx

RNG = np.random.default_rng(0)


def write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    """An IDX file of unsigned bytes: zero, zero, type 0x08, ndim, big-endian dims, then the data."""
    body = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    (gzip.open if compress else open)(path, "wb").write(body)


def mnist_like(folder: Path, n_train: int = 40, n_test: int = 20, compress: bool = True) -> dict[str, np.ndarray]:
    arrays = {
        "train-images-idx3-ubyte": RNG.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.tile(np.arange(10, dtype=np.uint8), n_train // 10),
        "t10k-images-idx3-ubyte": RNG.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.tile(np.arange(10, dtype=np.uint8), n_test // 10),
    }
    for name, array in arrays.items():
        write_idx(folder / (f"{name}.gz" if compress else name), array, compress)
    return arrays


def test_idx_reader_round_trips_and_names_a_corrupt_file(tmp_path):
    a = RNG.integers(0, 256, (3, 4, 5), dtype=np.uint8)
    write_idx(tmp_path / "a.gz", a, compress=True)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), a)
    raw = gzip.open(tmp_path / "a.gz").read()
    (tmp_path / "cut").write_bytes(raw[:-7])
    with pytest.raises(DataError, match=r"cut: truncated or corrupt: 53 bytes of data, its header says \(3, 4, 5\)"):
        read_idx(tmp_path / "cut")
    (tmp_path / "junk.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=r"junk.gz: unreadable"):
        read_idx(tmp_path / "junk.gz")


def test_fashion_mnist_from_data_root(tmp_path):
    arrays = mnist_like(tmp_path / "fashion-mnist")
    ds = load_dataset(DataParams(name="fashion-mnist", root=str(tmp_path)))
    assert ds.x_train.shape == (40, 1, 28, 28) and ds.x_test.shape == (20, 1, 28, 28) and ds.num_classes == 10
    assert np.array_equal(ds.y_train.numpy(), arrays["train-labels-idx1-ubyte"])
    restored = (ds.denormalise(ds.x_train)[:, 0] * 255).round().numpy()
    assert np.array_equal(restored, arrays["train-images-idx3-ubyte"])  # exact pixels after de-normalising
    assert torch.allclose(ds.x_train.mean(), torch.tensor(0.0), atol=1e-5)
    assert np.array_equal(ds.test_index, np.arange(20))  # the dataset's own test split, in its order


def test_fashion_mnist_missing_names_every_place_and_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "debian")
    with pytest.raises(DataError) as err:
        load_dataset(DataParams(name="fashion-mnist", root=str(tmp_path / "nowhere")))
    message = str(err.value)
    for part in ("train-images-idx3-ubyte.gz", str(tmp_path / "nowhere"), str(tmp_path / "debian"), "apt-get install"):
        assert part in message


def test_fashion_mnist_with_mismatched_labels_is_rejected(tmp_path):
    mnist_like(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(7, dtype=np.uint8), compress=True)
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte.gz: 20 images but 7 labels"):
        load_dataset(DataParams(name="fashion-mnist", root=str(tmp_path)))


@pytest.mark.skipif(not data.DEBIAN_FASHION_MNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_from_the_debian_package_with_a_stratified_subset(tmp_path):
    ds = load_dataset(
        DataParams(name="fashion-mnist", root=str(tmp_path), subset=SubsetParams(train=500, test=100, seed=1))
    )
    assert ds.x_train.shape == (500, 1, 28, 28) and ds.x_test.shape == (100, 1, 28, 28)
    assert np.bincount(ds.y_train.numpy()).tolist() == [50] * 10  # stratified: the classes are balanced
    assert ds.train_index.max() < 60000 and ds.test_index.max() < 10000
    again = load_dataset(
        DataParams(name="fashion-mnist", root=str(tmp_path), subset=SubsetParams(train=500, test=100, seed=1))
    )
    assert np.array_equal(again.train_index, ds.train_index)


def test_mnist_through_torchvision_from_local_files(tmp_path):
    arrays = mnist_like(tmp_path / "MNIST" / "raw", compress=False)
    ds = load_dataset(DataParams(name="mnist", root=str(tmp_path)))
    assert ds.x_train.shape == (40, 1, 28, 28)
    assert np.array_equal(ds.y_test.numpy(), arrays["t10k-labels-idx1-ubyte"])


def test_mnist_missing_says_how_to_get_it_and_does_not_download(tmp_path):
    with pytest.raises(DataError, match=r"mnist: no data in .*MNIST/raw .*set data.download: true"):
        load_dataset(DataParams(name="mnist", root=str(tmp_path)))
    assert not (tmp_path / "MNIST").exists()


def write_cifar(folder: Path, files: dict[str, int], label_key: str, classes: int) -> None:
    folder.mkdir(parents=True)
    for name, n in files.items():
        batch = {"data": RNG.integers(0, 256, (n, 3072), dtype=np.uint8), label_key: [i % classes for i in range(n)]}
        (folder / name).write_bytes(pickle.dumps(batch))


def test_cifar10_and_cifar100_from_their_python_batches(tmp_path):
    write_cifar(
        tmp_path / "cifar-10-batches-py",
        {f"data_batch_{i}": 10 for i in range(1, 6)} | {"test_batch": 20},
        "labels",
        10,
    )
    ds = load_dataset(DataParams(name="cifar10", root=str(tmp_path)))
    assert ds.x_train.shape == (50, 3, 32, 32) and ds.x_test.shape == (20, 3, 32, 32) and ds.num_classes == 10
    assert ds.mean.shape == (3,)  # normalised per channel
    write_cifar(tmp_path / "cifar-100-python", {"train": 200, "test": 100}, "fine_labels", 100)
    ds = load_dataset(DataParams(name="cifar100", root=str(tmp_path)))
    assert ds.x_train.shape == (200, 3, 32, 32) and ds.num_classes == 100


def test_cifar_pickles_cannot_run_code(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    (folder / "train").write_bytes(
        pickle.dumps({"data": np.zeros((1, 3072), np.uint8), "fine_labels": [0], "x": Path("/")})
    )
    (folder / "test").write_bytes(b"garbage")
    with pytest.raises(
        DataError, match=r"cifar-100-python/train: not a readable CIFAR batch .*refusing to load pathlib"
    ):
        load_dataset(DataParams(name="cifar100", root=str(tmp_path)))


def test_tinyimagenet_in_its_imagefolder_layout(tmp_path):
    from PIL import Image

    root = tmp_path / "tiny-imagenet-200"
    wnids = ["n01443537", "n01629819", "n01641577"]
    rows = []
    for c, wnid in enumerate(wnids):
        (root / "train" / wnid / "images").mkdir(parents=True)
        for i in range(4):
            pixels = np.full((64, 64, 3), 40 * c + i, dtype=np.uint8)
            Image.fromarray(pixels).save(root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", quality=100)
        (root / "val" / "images").mkdir(parents=True, exist_ok=True)
        name = f"val_{c}.JPEG"
        Image.fromarray(np.full((64, 64, 3), 40 * c, dtype=np.uint8)).save(root / "val" / "images" / name, quality=100)
        rows.append(f"{name}\t{wnid}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(rows) + "\n")
    ds = load_dataset(DataParams(name="tinyimagenet", root=str(tmp_path)))
    assert ds.x_train.shape == (12, 3, 64, 64) and ds.x_test.shape == (3, 3, 64, 64)
    assert ds.y_train.tolist() == [0] * 4 + [1] * 4 + [2] * 4 and ds.y_test.tolist() == [0, 1, 2]
    pixel = ds.denormalise(ds.x_test)[:, 0, 0, 0] * 255
    assert torch.allclose(pixel, torch.tensor([0.0, 40.0, 80.0]), atol=2.0)


def test_tinyimagenet_missing_names_the_layout(tmp_path):
    with pytest.raises(DataError, match=r"tiny-imagenet-200/train and .*tiny-imagenet-200/val must exist"):
        load_dataset(DataParams(name="tinyimagenet", root=str(tmp_path)))


def test_a_users_own_loader_by_dotted_path(tmp_path, monkeypatch):
    (tmp_path / "mydata.py").write_text(
        "import torch\n"
        "from torch.utils.data import TensorDataset\n"
        "def tensors(root):\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    x, x_test = torch.rand(30, 2, 6, 6, generator=g), torch.rand(9, 2, 6, 6, generator=g)\n"
        "    return x, torch.arange(30) % 3, x_test, torch.arange(9) % 3\n"
        "def datasets(root):\n"
        "    x, y, xt, yt = tensors(root)\n"
        "    return TensorDataset(x, y), TensorDataset(xt, yt)\n"
        "def wrong(root):\n"
        "    return torch.zeros(3)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    a = load_dataset(DataParams(name="mydata:tensors"))
    b = load_dataset(DataParams(name="mydata:datasets"))
    assert a.x_train.shape == (30, 2, 6, 6) and a.num_classes == 3
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    with pytest.raises(ParamsError, match=r"data.name = 'mydata:wrong': must return \(x_train, y_train, x_test"):
        load_dataset(DataParams(name="mydata:wrong"))
    with pytest.raises(ParamsError, match=r"data.name = 'mydata:nothing': cannot load nothing from mydata"):
        load_dataset(DataParams(name="mydata:nothing"))
    sys.modules.pop("mydata", None)
