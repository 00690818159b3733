"""Datasets in their canonical order, with fingerprints.

Every dataset kdpipe reads becomes an :class:`ImageSet`: uint8 images
``(N, C, H, W)`` and int64 labels ``(N,)`` in a *canonical order* that never
depends on the file system, the number of workers or the machine. Row *i* of a
cache is sample *i* of this order, and the fingerprint (count, classes and a
digest) is how a reader proves it is looking at the same samples.

Sources: Fashion-MNIST from its four gzipped IDX files and a deterministic
synthetic set for tests, both held in memory (their digest covers labels and
pixels), and image folders (``root/train/<class>/*.png``), listed through timm's
dataset factory and never decoded whole: their index and rows decoded on demand
live in :mod:`kdpipe.data.imagefolder`, and their digest covers the index. WebDataset tar
shards (a folder or fsspec URL of ``train-*.tar``/``test-*.tar``) are the same, with a row
per sample key: :mod:`kdpipe.data.shards`.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from kdpipe.base.errors import CacheMismatchError, DatasetError
from kdpipe.data.imagefolder import (
    DEFAULT_RESIZE,
    RESIZE_MODES,
    FolderImages,
    FolderIndex,
    LazyImages,
    build_index,
    decode_shape,
    image_files,
    is_image_file,
    relative_path,
)
from kdpipe.data.imagefolder import pixel_stats as folder_pixel_stats
from kdpipe.data.shards import ShardImages, ShardIndex, is_shard_spec, pack_shards
from kdpipe.data.shards import build_index as build_shard_index
from kdpipe.data.shards import has_split as shards_have_split
from tqdm.auto import tqdm

if TYPE_CHECKING:  # for annotations: imported where they are used, so that a command
    # that reads records only loads no deep-learning library
    import torch

SPLITS = ("train", "test")
DEFAULT_DATA_ROOT = Path("data")

FASHION_MNIST_CLASSES = (
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


@dataclass(frozen=True)
class ImageSet:
    """A labelled image dataset in canonical order.

    ``images`` is a uint8 tensor ``(N, C, H, W)`` for the small sets held in memory
    (Fashion-MNIST, synthetic, a dataset given to the API), or, for an image folder,
    a :class:`~kdpipe.data.imagefolder.FolderImages` (for shards, a
    :class:`~kdpipe.data.shards.ShardImages`) that decodes only the rows asked for
    (``images[rows]`` is uint8 rows either way); ``index`` is then the folder's or the
    shards' index, which the fingerprint comes from.
    """

    name: str
    split: str
    images: torch.Tensor | LazyImages  # uint8 (N, C, H, W), or decoded on demand
    labels: torch.Tensor  # int64 (N,)
    classes: tuple[str, ...]
    index: FolderIndex | ShardIndex | None = field(default=None, repr=False, compare=False)
    _fingerprint: dict = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def labeled(self) -> bool:
        """False for an unlabeled split (a flat image folder): every label is -1."""
        return bool(self.classes) and bool((self.labels >= 0).all())

    @property
    def input_size(self) -> tuple[int, int, int]:
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    @property
    def decode(self) -> dict | None:
        """How an image folder's or shards' files became these pixels (``size`` [H, W],
        ``channels``, ``resize``): recorded with every cache and run made from them, so that
        later commands decode the same way without being told; None for a set in memory."""
        if self.index is None:
            return None
        c, h, w = self.input_size
        return {"size": [h, w], "channels": c, "resize": self.images.resize}

    def record(self) -> dict:
        """What a cache's manifest and a run's model card say about the dataset: ``name``,
        ``split``, ``fingerprint`` and, for a folder or shards, ``decode``."""
        decode = self.decode
        return {"name": self.name, "split": self.split, "fingerprint": self.fingerprint(),
                **({"decode": decode} if decode is not None else {})}  # fmt: skip

    @property
    def streamed(self) -> bool:
        """True for an image folder: rows are decoded per batch, never held whole."""
        return isinstance(self.images, LazyImages)

    def with_workers(self, workers: int) -> ImageSet:
        """This dataset with a folder's rows decoded ahead by ``workers`` DataLoader
        processes in a pass (:func:`kdpipe.data.imagefolder.batches_of`); the same dataset
        when it is held in memory."""
        if not self.streamed or workers == self.images.workers:
            return self
        return replace(self, images=self.images.with_workers(workers), _fingerprint={})

    def fingerprint(self) -> dict:
        """Count, classes and a SHA-256 (computed once): over shape, labels and pixels for a
        dataset in memory; over the decode shape and each file's path, label and content
        digest for an image folder (its index)."""
        if not self._fingerprint:
            if self.index is not None:
                shape, resize = self.input_size, self.images.resize
                self._fingerprint.update(self.index.fingerprint(shape, resize))
            elif self.streamed:  # some rows of a folder (a validation split)
                raise DatasetError(
                    f"{self.name} {self.split} is a part of an image folder: the fingerprint "
                    "is the whole split's"
                )
            else:
                self._fingerprint.update(fingerprint(self.images, self.labels, self.classes))
        return dict(self._fingerprint)

    def pixel_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and std of pixels scaled to [0, 1]: the normalisation a model
        trained on this set uses (stored in its data config, not recomputed later). A
        folder's are accumulated one decoded batch at a time."""
        import torch

        if self.streamed:
            mean, std = folder_pixel_stats(self.images)
            std = np.maximum(std, 1e-6)
        else:
            x = self.images.to(torch.float64) / 255.0
            mean = x.mean(dim=(0, 2, 3)).numpy()
            std = x.std(dim=(0, 2, 3)).clamp_min(1e-6).numpy()
        return tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std)


def take_rows(images: torch.Tensor | LazyImages, rows: torch.Tensor) -> torch.Tensor | LazyImages:
    """Rows ``rows`` of a dataset's images: gathered from a tensor, or, for a folder, another
    lazy source (a validation split of a folder is not decoded whole either)."""
    if isinstance(images, LazyImages):
        return images.subset(rows)
    return images[rows]


FINGERPRINT_BLOCK = 2**28  # bytes of pixels hashed per update: 256 MiB


def fingerprint(images: torch.Tensor, labels: torch.Tensor, classes: tuple[str, ...]) -> dict:
    """The identity of a dataset: what a cache row is aligned to.

    The digest covers the image shape, every label and every pixel in
    canonical order, so reordering, relabelling or editing one pixel changes it.
    """
    digest = hashlib.sha256()
    digest.update(repr(tuple(images.shape)).encode())
    digest.update(np.ascontiguousarray(labels.numpy().astype("<i8")).tobytes())
    pixels = np.ascontiguousarray(images.numpy()).reshape(-1)
    block = FINGERPRINT_BLOCK
    # in blocks (the same digest as one update), with a progress bar for a large dataset
    for start in tqdm(range(0, len(pixels), block), desc="fingerprinting the dataset",
                      unit="block", disable=None if len(pixels) > 4 * block else True):  # fmt: skip
        digest.update(pixels[start : start + block].data)
    return {
        "count": int(images.shape[0]),
        "num_classes": len(classes),
        "classes": list(classes),
        "sha256": digest.hexdigest(),
    }


def load_dataset(
    spec: str,
    split: str,
    *,
    data_root: Path = DEFAULT_DATA_ROOT,
    image_size: int | tuple[int, int] | None = None,
    channels: int | None = None,
    resize: str | None = None,
) -> ImageSet:
    """Load ``fashion-mnist``, ``synthetic``, an image folder path or WebDataset shards (a
    folder, an fsspec URL or a ``{split}`` pattern: :mod:`kdpipe.data.shards`), one split.
    ``image_size`` (S, or (H, W)), ``channels`` and ``resize`` (``crop``, the default, or
    ``squash``) say how a folder's or shards' files are decoded; where not given, the one
    rule of :func:`kdpipe.data.imagefolder.decode_shape` on the train split decides, the same
    for every split."""
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    resize = resize or DEFAULT_RESIZE
    if resize not in RESIZE_MODES:
        raise DatasetError(f"--resize must be one of {', '.join(RESIZE_MODES)}, not {resize!r}")
    if spec == "fashion-mnist":
        return load_fashion_mnist(Path(data_root) / "fashion-mnist", split)
    if spec == "synthetic":
        return make_synthetic(split)
    decode = {"image_size": image_size, "channels": channels, "resize": resize}
    if is_shard_spec(spec):
        return load_shards(spec, split, **decode)
    path = Path(spec)
    if path.is_dir():
        return load_image_folder(path, split, **decode)
    raise DatasetError(
        f"unknown dataset {spec!r}: use 'fashion-mnist', 'synthetic', the path of an image "
        "folder (with train/ and test/ inside, one subfolder per class) or a folder or URL of "
        "WebDataset shards (train-*.tar, test-*.tar)"
    )


def dataset_fingerprint(
    spec: str,
    split: str,
    *,
    data_root: Path = DEFAULT_DATA_ROOT,
    image_size: int | tuple[int, int] | None = None,
    channels: int | None = None,
    resize: str | None = None,
) -> dict:
    """``load_dataset(...).fingerprint()``; for an image folder or shards, from the index
    alone, so that checking a record (``lineage``) loads no deep-learning library. The
    sets held in memory (Fashion-MNIST, synthetic) are loaded as tensors."""
    resize = resize or DEFAULT_RESIZE
    indexed = spec not in ("fashion-mnist", "synthetic")
    if indexed and resize in RESIZE_MODES and split in SPLITS:  # else load_dataset says why
        if is_shard_spec(spec):
            index, _, channels, size = _shard_parts(spec, split, image_size, channels)
            return index.fingerprint((channels, *size), resize)
        if Path(spec).is_dir():
            index, channels, size = _folder_parts(Path(spec), split, image_size, channels)
            return index.fingerprint((channels, *size), resize)
    return load_dataset(spec, split, data_root=data_root, image_size=image_size,
                        channels=channels, resize=resize).fingerprint()  # fmt: skip


DECODE_FLAGS = {"image_size": "--image-size", "channels": "--channels", "resize": "--resize"}


def recorded_decode(record: dict | None) -> dict:
    """``load_dataset``'s decode keywords as a dataset record (a cache manifest's or a model
    card's ``dataset``) stores them in ``decode``: ``image_size`` (H, W), ``channels``,
    ``resize``. Empty for a set held in memory, and for a record older than ``decode``
    (its folder or shards were decoded by the old default: the first file's size, squashed;
    their fingerprints, of an older framing, no longer match anyway)."""
    decode = (record or {}).get("decode")
    if not decode:
        return {}
    return {"image_size": tuple(decode["size"]), "channels": decode["channels"],
            "resize": decode["resize"]}  # fmt: skip


def decode_options(
    record: dict | None, what: str, *, image_size: int | tuple[int, int] | None = None,
    channels: int | None = None, resize: str | None = None,
) -> dict:  # fmt: skip
    """The decode keywords of ``load_dataset`` for data that must be what ``what`` (a cache,
    a run) was made from: each setting given is kept, each not given is taken from the
    record, so no command needs ``--image-size`` repeated. A setting given and different
    from the record is one line naming it and both values."""
    given = {"image_size": image_size, "channels": channels, "resize": resize}
    recorded = recorded_decode(record)
    for name, value in given.items():
        if value is None or name not in recorded:
            continue
        wanted, stored = _shown(name, value), _shown(name, recorded[name])
        if wanted != stored:
            flag = DECODE_FLAGS[name]
            raise CacheMismatchError(
                f"{flag} {wanted} differs from the {stored} that {what} was made with (its "
                f"dataset.decode): drop {flag} to decode the data as it was"
            )
    return {name: recorded.get(name) if value is None else value for name, value in given.items()}


def _shown(name: str, value: object) -> str:
    """A decode setting as a person reads it: a size as HxW (S alone is S x S)."""
    if name != "image_size":
        return str(value)
    size = (value, value) if isinstance(value, int) else tuple(value)
    return "x".join(str(int(v)) for v in size)


def has_split(spec: str, split: str) -> bool:
    """Whether the dataset ``spec`` has ``split`` at all: the named sets have both, an image
    folder its ``split/`` folder, shards their ``split-*.tar`` files. A split that is there
    but cannot be read is :func:`load_dataset`'s error, never a missing split."""
    if spec in ("fashion-mnist", "synthetic"):
        return True
    if is_shard_spec(spec):
        return shards_have_split(spec, split)
    return (Path(spec) / split).is_dir()


# --- Fashion-MNIST -----------------------------------------------------------------------------


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DatasetError(
            f"{path} is missing: run 'make data' (or 'kdpipe fetch-data') first"
        ) from None
    except (OSError, EOFError) as exc:
        raise DatasetError(f"{path} is not a readable gzip file ({exc})") from None
    header = np.frombuffer(raw[: 4 * (ndim + 1)], dtype=">u4")
    if len(header) != ndim + 1 or int(header[0]) != magic:
        raise DatasetError(f"{path} is not an IDX file (bad magic number)")
    shape = tuple(int(d) for d in header[1:])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 * (ndim + 1))
    if data.size != int(np.prod(shape)):
        raise DatasetError(f"{path} is truncated: {data.size} bytes of data for shape {shape}")
    return data.reshape(shape)


def load_fashion_mnist(folder: Path, split: str) -> ImageSet:
    """Fashion-MNIST from its gzipped IDX files; the file order is the canonical order."""
    import torch

    image_file, label_file = FASHION_MNIST_FILES[split]
    images = _read_idx(folder / image_file, 0x803, 3)
    labels = _read_idx(folder / label_file, 0x801, 1)
    if len(images) != len(labels):
        raise DatasetError(f"{folder}: {len(images)} images but {len(labels)} labels ({split})")
    return ImageSet(
        name="fashion-mnist",
        split=split,
        images=torch.from_numpy(images.copy()).unsqueeze(1),
        labels=torch.from_numpy(labels.astype(np.int64)),
        classes=FASHION_MNIST_CLASSES,
    )


# --- synthetic ---------------------------------------------------------------------------------

SYNTHETIC_SIZES = {"train": 600, "test": 200}
SYNTHETIC_SHAPE = (1, 12, 12)
SYNTHETIC_CLASSES = ("a", "b", "c", "d", "e")


def make_synthetic(split: str) -> ImageSet:
    """A tiny deterministic, learnable dataset: one noisy prototype image per class.

    Same bytes on every machine (numpy's PCG64 with fixed seeds), so tests can
    pin fingerprints and expect a small model to beat chance quickly.
    """
    import torch

    prototypes = np.random.default_rng(1234).uniform(
        0, 255, (len(SYNTHETIC_CLASSES), *SYNTHETIC_SHAPE)
    )
    rng = np.random.default_rng({"train": 1, "test": 2}[split])
    n = SYNTHETIC_SIZES[split]
    labels = rng.integers(0, len(SYNTHETIC_CLASSES), n)
    noise = rng.normal(0, 70, (n, *SYNTHETIC_SHAPE))
    images = np.clip(prototypes[labels] + noise, 0, 255).astype(np.uint8)
    return ImageSet(
        name="synthetic",
        split=split,
        images=torch.from_numpy(images),
        labels=torch.from_numpy(labels.astype(np.int64)),
        classes=SYNTHETIC_CLASSES,
    )


# --- image folders -----------------------------------------------------------------------------


def _class_names(root: Path) -> tuple[str, ...]:
    """Classes come from ``train/`` when it exists, so every split shares one class index."""
    source = root / "train" if (root / "train").is_dir() else root
    names = tuple(sorted(p.name for p in source.iterdir() if p.is_dir()))
    if not names:
        raise DatasetError(f"{source} has no class subfolders")
    return names


def load_image_folder(
    root: Path, split: str, *, image_size: int | tuple[int, int] | None = None,
    channels: int | None = None, resize: str = DEFAULT_RESIZE,
) -> ImageSet:  # fmt: skip
    """An image folder in canonical order: by class name, then by path relative to the
    split folder. Files are listed by extension (:data:`~kdpipe.data.imagefolder.IMAGE_EXTENSIONS`;
    other files are ignored), indexed, and decoded only when rows are asked for. Channels
    and size, unless given, come from the train split's index by one rule
    (:func:`~kdpipe.data.imagefolder.decode_shape`), the same for every split; every image is
    converted to that mode and brought to that size (``resize``: ``crop`` keeps the aspect
    ratio, ``squash`` stretches).
    """
    index, channels, size = _folder_parts(root, split, image_size, channels)
    return ImageSet(
        name=str(root),
        split=split,
        images=FolderImages(index.paths(), channels, size, resize=resize),
        labels=index.labels(),
        classes=index.classes,
        index=index,
    )


def _folder_parts(
    root: Path, split: str, image_size: int | tuple[int, int] | None, channels: int | None
) -> tuple[FolderIndex, int, tuple[int, int]]:
    """A folder split's index and the channels and size its files are decoded at."""
    index = folder_index(root, split)
    reference = index
    if split != "train" and (image_size is None or channels is None) and (root / "train").is_dir():
        reference = folder_index(root, "train")
    channels, size = decode_shape(reference.shapes(), image_size, channels)
    return index, channels, size


def folder_index(root: Path, split: str) -> FolderIndex:
    """The index of an image folder's split (:func:`kdpipe.data.imagefolder.build_index`), after
    the folder's layout is checked: class folders, one level, no empty class."""
    split_dir = root / split
    if not split_dir.is_dir():
        raise DatasetError(f"{root} has no {split}/ folder (expected {split_dir})")
    if not any(p.is_dir() for p in split_dir.iterdir()):
        return build_index(root, split, _unlabeled_samples(split_dir), ())
    classes = _class_names(root)
    extra = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and p.name not in classes)
    if extra:
        raise DatasetError(f"{split_dir} has classes not in {root / 'train'}: {', '.join(extra)}")
    if len(classes) < 2:
        raise DatasetError(
            f"{root} has a single class ({classes[0]}): a classifier needs two or more class "
            "folders (a folder of images without class folders is an unlabeled split)"
        )
    images = image_files(split_dir)
    # exactly one level: an image in a nested folder or at the top has no class
    top = str(split_dir)
    dropped = sorted(p for p in images if os.path.dirname(os.path.dirname(p)) != top)
    if dropped:
        raise DatasetError(
            f"{split_dir}: {len(dropped)} image(s) outside a class folder, e.g. {dropped[0]} "
            "(expected exactly one level: <split>/<class>/<image>)"
        )
    if not images:
        raise DatasetError(f"{split_dir} holds no images")
    class_map = {name: index for index, name in enumerate(classes)}
    samples = [(p, class_map[os.path.basename(os.path.dirname(p))]) for p in images]
    counts = np.bincount([label for _, label in samples], minlength=len(classes))
    empty = [classes[i] for i in np.flatnonzero(counts == 0) if (split_dir / classes[i]).is_dir()]
    if empty:
        raise DatasetError(
            f"{split_dir / empty[0]} holds no images ({len(empty)} empty class folder(s)): add "
            "images or remove the folder"
        )
    samples.sort(key=lambda s: (s[1], relative_path(s[0], split_dir)))
    # Each file is decoded by kdpipe rather than through timm's dataset[i]: timm's
    # ImageDataset silently substitutes the next sample for an unreadable one, which
    # would shift every later row of a cache.
    return build_index(root, split, samples, classes)


def _unlabeled_samples(split_dir: Path) -> list[tuple[str, int]]:
    """A flat folder of images is an unlabeled split: label -1, order by file name."""
    paths = sorted(p for p in split_dir.iterdir() if is_image_file(p))
    if not paths:
        raise DatasetError(f"{split_dir} holds no images")
    return [(str(p), -1) for p in paths]


# --- WebDataset shards -------------------------------------------------------------------------


def load_shards(
    spec: str, split: str, *, image_size: int | tuple[int, int] | None = None,
    channels: int | None = None, resize: str = DEFAULT_RESIZE,
) -> ImageSet:  # fmt: skip
    """A split of WebDataset shards (:mod:`kdpipe.data.shards`) in canonical order (by sample
    key), as its index and rows read and decoded on demand; channels, size and resize as
    for an image folder (from the train split's index unless given)."""
    index, fs, channels, size = _shard_parts(spec, split, image_size, channels)
    return ImageSet(
        name=spec,
        split=split,
        images=ShardImages(fs, index.root, index.entries, channels, size, resize=resize),
        labels=index.labels(),
        classes=index.classes,
        index=index,
    )


def _shard_parts(
    spec: str, split: str, image_size: int | tuple[int, int] | None, channels: int | None
) -> tuple[ShardIndex, Any, int, tuple[int, int]]:
    """A shard split's index, its filesystem, and the channels and size it is decoded at."""
    index, fs = build_shard_index(spec, split)
    reference = index
    derived = image_size is None or channels is None
    if split != "train" and derived and shards_have_split(spec, "train"):
        reference = build_shard_index(spec, "train")[0]
    channels, size = decode_shape(reference.shapes(), image_size, channels)
    return index, fs, channels, size


def rehashed(dataset: ImageSet) -> tuple[ImageSet, list[str]]:
    """``dataset`` with its index rebuilt from every file's bytes (``verify --data --rehash``)
    and the names (a folder's relative paths, the shards' keys) whose digest differs from the
    index it was opened with: the quick index trusts a file's size and mtime, this reads
    everything. A dataset in memory is hashed whole on every open and comes back as it is."""
    index = dataset.index
    if index is None:
        return dataset, []
    if isinstance(index, ShardIndex):
        fresh, _ = build_shard_index(dataset.name, dataset.split, rehash=True)
        name_of = "key"
    else:
        samples = list(zip(index.paths(), index.labels().tolist(), strict=True))
        fresh = build_index(index.split_dir.parent, index.split_dir.name, samples,
                            index.classes, rehash=True)  # fmt: skip
        name_of = "path"
    before = {getattr(e, name_of): e.sha256 for e in index.entries}
    after = {getattr(e, name_of): e.sha256 for e in fresh.entries}
    changed = sorted(n for n in before.keys() | after.keys() if before.get(n) != after.get(n))
    return replace(dataset, index=fresh, _fingerprint={}), changed


def pack_image_folder(folder: Path, out: Path, shard_size: int) -> dict[str, int]:
    """``kdpipe pack-shards``: an image folder's splits (those it has of train/ and test/)
    written as WebDataset shards in its canonical order, so row *i* of the shards is row *i*
    of the folder and a cache of one is a cache of the other, value for value. Returns the
    number of shards written per split."""
    folder = Path(folder)
    present = [split for split in SPLITS if (folder / split).is_dir()]
    if not present:
        raise DatasetError(f"{folder} has no train/ or test/ folder to pack")
    splits, classes = {}, ()
    for split in present:
        dataset = load_image_folder(folder, split)
        if not dataset.labeled:
            raise DatasetError(
                f"{folder / split} is unlabeled: a shard's sample needs a cls label (put the "
                "images in class folders)"
            )
        splits[split], classes = (dataset.images.paths, dataset.labels.tolist()), dataset.classes
    from kdpipe.base.outputs import check_output

    check_output(out, [folder])  # new or empty (pack_shards), never the folder or the cwd
    return pack_shards(splits, classes, Path(out), shard_size)


def select_rows(
    labels: torch.Tensor,
    *,
    subset: float | None = None,
    exclude_classes: tuple[int, ...] = (),
    num_classes: int,
    seed: int = 0,
) -> np.ndarray:
    """The dataset indices of a transfer set, ascending: every sample, minus the excluded
    classes, then a random ``subset`` fraction of what is left (drawn with ``seed``)."""
    indices = np.arange(len(labels))
    if exclude_classes:
        bad = [c for c in exclude_classes if not 0 <= c < num_classes]
        if bad:
            raise DatasetError(
                f"--exclude-classes {', '.join(map(str, bad))}: class ids are 0..{num_classes - 1}"
            )
        if bool((labels < 0).any()):
            raise DatasetError("--exclude-classes needs labels, and this dataset has none")
        keep = ~np.isin(labels.numpy(), np.asarray(exclude_classes))
        indices = indices[keep]
    if subset is not None:
        if not 0.0 < subset <= 1.0:
            raise DatasetError(f"--subset must be in (0, 1], not {subset}")
        count = round(subset * len(indices))
        picked = np.random.default_rng(seed).permutation(len(indices))[:count]
        indices = np.sort(indices[picked])
    if not len(indices):
        raise DatasetError("the transfer set is empty: --subset or --exclude-classes left no rows")
    return indices


VALIDATION_SEED = 2015  # one fixed split: every run with the same fraction holds out the same rows


def validation_rows(num_samples: int, fraction: float) -> np.ndarray:
    """The dataset indices held out for validation, ascending: ``round(fraction * n)`` rows of
    a permutation drawn with :data:`VALIDATION_SEED`.

    The split depends only on the training split's size and the fraction, never on a
    run's seed or transfer set, so training (early stopping) and ``tune-bias`` (choosing
    a logit bias) hold out the same rows, and every arm of an experiment trains without them.
    """
    if not 0.0 < fraction < 1.0:
        raise DatasetError(f"--val-fraction must be in (0, 1), not {fraction}")
    count = round(fraction * num_samples)
    if count == 0:
        raise DatasetError(f"--val-fraction {fraction} of {num_samples} samples holds out no rows")
    return np.sort(np.random.default_rng(VALIDATION_SEED).permutation(num_samples)[:count])


def describe_mismatch(expected: dict, actual: dict) -> str:
    """One line naming each fingerprint field that differs, with both values."""
    parts = []
    for key in ("count", "num_classes", "sha256", "classes"):
        if expected.get(key) != actual.get(key):
            parts.append(f"{key} {expected.get(key)} (cache) != {actual.get(key)} (data)")
    return "; ".join(parts) or "fingerprints differ"


def source_folder(dataset: ImageSet) -> Path | None:
    """The folder an image-folder dataset was read from (None for a named dataset)."""
    path = Path(dataset.name)
    return path if dataset.name not in ("fashion-mnist", "synthetic") and path.is_dir() else None


def dataset_mismatch(record: dict, dataset: ImageSet) -> str | None:
    """What makes ``dataset`` another dataset than the one ``record`` (a manifest's or a
    model card's ``dataset``) was made from, or None when it is the same: one line naming
    each fingerprint field that differs, with both values."""
    expected, actual = record["fingerprint"], dataset.fingerprint()
    if expected == actual and record.get("split", dataset.split) == dataset.split:
        return None
    if dataset.index is not None and expected.get("classes") == actual["classes"]:
        # an image folder's digest covers its files: say so, not only which digests differ
        return (
            f"the files of {dataset.index.split_dir} changed since (a file or sample renamed, "
            "added, removed or edited, or another --image-size/--channels): "
            + describe_mismatch(expected, actual)
        )
    return describe_mismatch(expected, actual)


def check_same_dataset(record: dict, dataset: ImageSet, what: str) -> None:
    """The one "same dataset?" check: ``what`` (a cache, a run) must have been made from
    ``dataset``; the error shows both sides."""
    mismatch = dataset_mismatch(record, dataset)
    if mismatch is not None:
        from kdpipe.base.errors import CacheMismatchError

        raise CacheMismatchError(
            f"{what} was made from another dataset than {dataset.name} {dataset.split}: " + mismatch
        )


def class_mismatch(
    ours: Sequence[str], theirs: Sequence[str], our_name: str, their_name: str
) -> str | None:
    """The one "same classes, in the same order?" comparison of a model with the data it is
    paired with (a teacher and a folder, a cache and its students' data): None when class
    *i* has the same name on both sides for every *i*, else one line listing each position
    that differs with both names (the first few, and how many in all)."""
    ours, theirs = [str(n) for n in ours], [str(n) for n in theirs]
    if ours == theirs:
        return None
    if len(ours) != len(theirs):
        return f"{our_name} has {len(ours)} classes, {their_name} has {len(theirs)}"
    differ = [i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b]
    shown = "; ".join(f"class {i}: {ours[i]!r} vs {theirs[i]!r}" for i in differ[:5])
    more = f" (and {len(differ) - 5} more)" if len(differ) > 5 else ""
    moved = " (the same names in another order)" if sorted(ours) == sorted(theirs) else ""
    return (f"{our_name} and {their_name} name the classes differently at "
            f"{len(differ)} position(s){moved}: {shown}{more}")  # fmt: skip


def check_classes(ours: Sequence[str], theirs: Sequence[str], our_name: str,
                  their_name: str) -> None:  # fmt: skip
    """:func:`class_mismatch` as an error (``CacheMismatchError``) where one is found."""
    mismatch = class_mismatch(ours, theirs, our_name, their_name)
    if mismatch is not None:
        from kdpipe.base.errors import CacheMismatchError

        raise CacheMismatchError(mismatch)
