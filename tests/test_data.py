"""Datasets: canonical order, fingerprints, IDX parsing, image folders, fetch checks."""

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from kdpipe.base.errors import DatasetError
from kdpipe.data import fetch
from kdpipe.data.datasets import fingerprint, load_dataset, make_synthetic
from PIL import Image


def test_synthetic_is_deterministic_and_pinned() -> None:
    a, b = make_synthetic("train"), make_synthetic("train")
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.input_size == (1, 12, 12) and len(a) == 600 and a.num_classes == 5
    # pinned: a change in the generator changes every cache made from it
    assert a.fingerprint()["sha256"] == (
        "2bdb7b1f3375dc8e1da0e0c9450e5c4bb4bdc8c5b725812b513da89ec8b99f73"
    )
    assert make_synthetic("test").fingerprint() != a.fingerprint()


def test_fingerprint_sees_one_pixel_one_label_and_the_order() -> None:
    data = make_synthetic("train")
    base = fingerprint(data.images, data.labels, data.classes)["sha256"]
    pixel = data.images.clone()
    pixel[17, 0, 3, 4] ^= 1
    label = data.labels.clone()
    label[5] = (label[5] + 1) % 5
    order = torch.arange(len(data)).roll(1)
    assert fingerprint(pixel, data.labels, data.classes)["sha256"] != base
    assert fingerprint(data.images, label, data.classes)["sha256"] != base
    assert fingerprint(data.images[order], data.labels[order], data.classes)["sha256"] != base


def write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = np.array([magic, *array.shape], dtype=">u4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_fashion_mnist(tmp_path: Path) -> Path:
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for images_name, labels_name, n in (
        ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 30),
        ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10),
    ):
        write_idx(folder / images_name, rng.integers(0, 256, (n, 28, 28)), 0x803)
        write_idx(folder / labels_name, rng.integers(0, 10, n), 0x801)
    return tmp_path


def test_fashion_mnist_reader(fake_fashion_mnist: Path) -> None:
    data = load_dataset("fashion-mnist", "train", data_root=fake_fashion_mnist)
    assert data.images.shape == (30, 1, 28, 28) and data.images.dtype == torch.uint8
    assert data.labels.dtype == torch.int64 and data.num_classes == 10
    assert len(load_dataset("fashion-mnist", "test", data_root=fake_fashion_mnist)) == 10


def test_fashion_mnist_errors(fake_fashion_mnist: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="is missing: run 'make data'"):
        load_dataset("fashion-mnist", "train", data_root=tmp_path / "nowhere")
    folder = fake_fashion_mnist / "fashion-mnist"
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.zeros(30), 0x803)
    with pytest.raises(DatasetError, match="bad magic number"):
        load_dataset("fashion-mnist", "train", data_root=fake_fashion_mnist)
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip")
    with pytest.raises(DatasetError, match="not a readable gzip file"):
        load_dataset("fashion-mnist", "test", data_root=fake_fashion_mnist)


def test_unknown_dataset_and_split() -> None:
    with pytest.raises(DatasetError, match="unknown dataset 'mnist-ish'"):
        load_dataset("mnist-ish", "train")
    with pytest.raises(DatasetError, match="unknown split 'val'"):
        load_dataset("synthetic", "val")


def make_folder(root: Path, spec: dict[str, dict[str, list[str]]], mode: str = "L") -> Path:
    """spec: split -> class -> file names; each image's pixels encode its own name."""
    for split, classes in spec.items():
        for name, files in classes.items():
            (root / split / name).mkdir(parents=True)
            for index, file in enumerate(files):
                value = 10 * index + len(name)
                Image.new(mode, (6, 4), color=value if mode == "L" else (value,) * 3).save(
                    root / split / name / file
                )
    return root


def test_image_folder_canonical_order_and_shape(tmp_path: Path) -> None:
    root = make_folder(
        tmp_path / "imgs",
        {
            "train": {"zebra": ["b.png", "a.png"], "cat": ["x.png"], "dog": ["m.png", "n.png"]},
            "test": {"cat": ["y.png"]},
        },
    )
    data = load_dataset(str(root), "train")
    assert data.classes == ("cat", "dog", "zebra")
    assert data.labels.tolist() == [0, 1, 1, 2, 2]
    assert data.input_size == (1, 4, 6)
    # by class, then path: zebra's a.png (written second) comes before b.png
    assert data.images[:, 0, 0, 0].tolist() == [3, 3, 13, 15, 5]
    assert load_dataset(str(root), "test").labels.tolist() == [0]
    resized = load_dataset(str(root), "train", image_size=8, channels=3)
    assert resized.input_size == (3, 8, 8)


def test_image_folder_errors(tmp_path: Path) -> None:
    root = make_folder(
        tmp_path / "imgs",
        {
            "train": {"cat": ["a.png"], "dog": ["c.png"]},
            "test": {"cat": ["a.png"], "emu": ["b.png"]},
        },
    )
    with pytest.raises(DatasetError, match=r"classes not in .*: emu"):
        load_dataset(str(root), "test")
    (root / "train" / "cat" / "deeper").mkdir()
    Image.new("L", (6, 4)).save(root / "train" / "cat" / "deeper" / "lost.png")
    with pytest.raises(DatasetError, match=r"outside a class folder, e.g. .*lost.png"):
        load_dataset(str(root), "train")
    (root / "train" / "cat" / "deeper" / "lost.png").unlink()
    (root / "train" / "cat" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DatasetError, match=r"cannot read image .*broken.png"):
        load_dataset(str(root), "train")
    with pytest.raises(DatasetError, match=r"has no val/ folder|unknown split"):
        load_dataset(str(root), "val")


def test_fetch_verify_names_bad_and_missing_files(tmp_path: Path) -> None:
    with gzip.open(tmp_path / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(b"wrong content")
    assert fetch.verify(tmp_path) == list(fetch.FASHION_MNIST_SHA256)
    assert fetch.payload_sha256(tmp_path / "absent.gz") is None
