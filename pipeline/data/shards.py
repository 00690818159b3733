"""WebDataset tar shards: kdpipe's format for data larger than a disk of loose files.

A sharded dataset is a folder or an fsspec URL (``s3://bucket/ds``, ``memory://ds``)
holding ``train-*.tar`` and ``test-*.tar`` shards, or a pattern with ``{split}`` and brace
ranges (``s3://bucket/ds/{split}-{000000..000031}.tar``). Each shard is a plain
(uncompressed) tar in WebDataset's convention: the members of one sample are adjacent and
share a *key* (the member name up to the first dot of its base name,
``webdataset.tariterators.base_plus_ext``); a sample has one image (``jpg``, ``png``, ...)
and a ``cls`` member, the class index as ASCII digits. The class names are in a
``classes.txt`` (one name per line, line *i* is class *i*) or a ``classes.json`` (a JSON
list) beside the shards.

Row alignment is explicit: **a row is a sample key**. The split's *index* lists every
sample in canonical order (by key, as Python orders strings), with its shard, the image
member's data offset and size, its label and a SHA-256 of the image bytes. It is built
once by reading each shard from start to end (a sequential read, the way shards are
meant to be read from an object store), stored beside the shards
(``.kdpipe-index-<split>.json``) when that location is writable, otherwise kept in
memory, and reused per shard while the shard's size and modification stamp hold. A
random row is then one ranged read of its member (a seek locally, an HTTP range request
on an object store), decoded by :func:`kdpipe.data.imagefolder.decode_image`, its bytes
checked against the index's digest. The fingerprint comes from the index (keys, labels,
digests and the decode shape): adding, removing, editing, relabelling or renaming a
sample changes it; moving samples between shards (re-sharding) does not.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem
from kdpipe.base.errors import DatasetError
from kdpipe.data.imagefolder import (
    DEFAULT_RESIZE,
    IMAGE_EXTENSIONS,
    LazyImages,
    check_image,
    decode_image,
    index_fingerprint,
)
from tqdm.auto import tqdm

if TYPE_CHECKING:  # for annotations: imported where they are used, so that a command
    # that reads records only loads no deep-learning library
    import torch

INDEX_FORMAT = 2  # 2: each image's decoded height, width and channels
FINGERPRINT_TAG = b"kdpipe webdataset index 2\n"  # what the shards' fingerprint digest covers
CLASS_FILES = ("classes.txt", "classes.json")
# a sample's image member, by extension (WebDataset's names, and the image folder's)
SHARD_IMAGE_EXTENSIONS = tuple(
    sorted({e.lstrip(".") for e in IMAGE_EXTENSIONS} | {"pgm", "pbm", "pnm"})
)


def is_shard_spec(spec: str) -> bool:
    """``--data`` names shards: a URL, a pattern with ``{split}``, or a local folder holding
    ``.tar`` files and no ``train/``/``test/`` folders (those make it an image folder)."""
    if "://" in spec or "{split}" in spec:
        return True
    path = Path(spec)
    if not path.is_dir() or (path / "train").is_dir() or (path / "test").is_dir():
        return False
    return any(p.suffix == ".tar" for p in path.iterdir())


@dataclass(frozen=True)
class ShardEntry:
    """One sample: its key, where its image member's bytes are, its label and digest."""

    key: str
    shard: str  # the shard's file name, relative to the dataset's folder
    member: str  # the image member's name inside the tar
    offset: int  # byte offset of the member's data in the tar
    size: int  # bytes
    label: int
    sha256: str  # of the image member's bytes
    height: int  # as decoded (after its EXIF orientation): what the decode size is chosen from
    width: int
    channels: int  # 1 for a grayscale mode, 3 for every other


@dataclass(frozen=True)
class ShardIndex:
    """A split's samples in canonical order (by key), and where the shards are."""

    where: str  # the folder or URL the shards and the class file are in, as the user gave it
    root: str  # the same, as a path of its fsspec filesystem
    split: str
    classes: tuple[str, ...]
    entries: tuple[ShardEntry, ...]

    @property
    def split_dir(self) -> str:
        """What a "the data changed" message names."""
        return f"the {self.split} shards of {self.where}"

    def labels(self) -> torch.Tensor:
        import torch

        return torch.tensor([entry.label for entry in self.entries], dtype=torch.int64)

    def shapes(self) -> list[tuple[int, int, int]]:
        """Each image's (channels, height, width) as decoded (``imagefolder.decode_shape``)."""
        return [(entry.channels, entry.height, entry.width) for entry in self.entries]

    def fingerprint(self, shape: tuple[int, int, int], resize: str = DEFAULT_RESIZE) -> dict:
        """Count, classes and a SHA-256 over the decode shape and resize mode and, per sample
        in canonical order, its key, label and image digest (the shard it sits in is not
        covered)."""
        rows = [(entry.key, entry.label, entry.sha256) for entry in self.entries]
        return index_fingerprint(FINGERPRINT_TAG, rows, self.classes, shape, resize)


# --- finding the shards ------------------------------------------------------------------------


def _root_and_shards(spec: str, split: str) -> tuple[fsspec.AbstractFileSystem, str, list[str]]:
    """The filesystem, the folder the shards are in, and the split's shard names, sorted."""
    import braceexpand

    pattern = spec.replace("{split}", split) if "{split}" in spec else None
    location = spec.rsplit("/", 1)[0] if pattern else spec
    fs, root = fsspec.core.url_to_fs(location)
    root = root.rstrip("/") or "/"
    if pattern is not None:
        names = [p.rsplit("/", 1)[-1] for p in braceexpand.braceexpand(pattern)]
        missing = [n for n in names if not fs.isfile(f"{root}/{n}")]
        if missing:
            raise DatasetError(
                f"shard {location}/{missing[0]} does not exist ({len(missing)} of the "
                f"{len(names)} shards of {spec} missing)"
            )
    else:
        found = fs.glob(f"{root}/{split}-*.tar") if fs.isdir(root) else []
        names = sorted(p.rsplit("/", 1)[-1] for p in found)
    if not names:
        raise DatasetError(
            f"{spec} has no {split} shards (expected {split}-*.tar, e.g. {split}-000000.tar)"
        )
    return fs, root, sorted(names)


def has_split(spec: str, split: str) -> bool:
    """Whether ``spec`` holds shards of ``split`` (a ``{split}`` pattern names its shards:
    those missing are the loader's error, not an absent split)."""
    if "{split}" in spec:
        return True
    fs, root = fsspec.core.url_to_fs(spec)
    root = root.rstrip("/") or "/"
    return fs.isdir(root) and bool(fs.glob(f"{root}/{split}-*.tar"))


def read_classes(fs: fsspec.AbstractFileSystem, root: str, where: str) -> tuple[str, ...]:
    """The class names from ``classes.txt`` or ``classes.json`` beside the shards."""
    for name in CLASS_FILES:
        try:
            text = fs.cat_file(f"{root}/{name}").decode()
        except (FileNotFoundError, IsADirectoryError):
            continue
        try:
            classes = json.loads(text) if name.endswith(".json") else text.splitlines()
        except ValueError as exc:
            raise DatasetError(f"{where}/{name} is not a JSON list of class names: {exc}") from None
        classes = [str(c).strip() for c in classes] if isinstance(classes, list) else None
        if not classes or any(not c for c in classes) or len(set(classes)) != len(classes):
            raise DatasetError(f"{where}/{name} must list distinct, non-empty class names")
        return tuple(classes)
    raise DatasetError(
        f"{where} has no classes.txt or classes.json beside its shards (one class name per "
        "line; line i is the name of label i)"
    )


# --- the index ---------------------------------------------------------------------------------


def _stamp(fs: fsspec.AbstractFileSystem, path: str) -> str | None:
    """What says a shard is unchanged: size and modification time (or an object store's
    ETag / last-modified); None when the filesystem gives no time (never reused)."""
    if isinstance(fs, LocalFileSystem):
        stat = os.stat(path)
        return f"{stat.st_size}:{stat.st_mtime_ns}"
    info = fs.info(path)
    for field in ("ETag", "etag", "LastModified", "mtime", "updated", "created"):
        if info.get(field) is not None:
            return f"{info.get('size')}:{info[field]}"
    return None


def _samples_of(fs: fsspec.AbstractFileSystem, root: str, shard: str,
                classes: Sequence[str]) -> list[ShardEntry]:  # fmt: skip
    """Every sample of one shard, read once from start to end (tar's stream mode), each
    sample's entry made as soon as its members are read: memory holds one sample, never
    the shard."""
    where = f"{root}/{shard}"
    try:
        with fs.open(where, "rb") as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
            samples = [_entry(where, shard, key, members, classes)
                       for key, members in _samples_in(tar, where)]  # fmt: skip
            end = tar.offset  # where tarfile stopped: the end-of-archive block, if any
        ending = fs.cat_file(where, start=end, end=end + tarfile.BLOCKSIZE)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DatasetError(f"shard {where} is not a readable tar file: {exc}") from None
    if len(ending) < tarfile.BLOCKSIZE or ending.count(0) != tarfile.BLOCKSIZE:
        # tarfile ends quietly at a missing or partial header: a shard cut at a member
        # boundary would read as a shorter one
        raise DatasetError(
            f"shard {where} is cut short: it stops at byte {end}, after {len(samples)} "
            "sample(s), without tar's end-of-archive block (a copy or download that stopped "
            "early?): copy the shard again"
        )
    return samples


def _samples_in(tar: tarfile.TarFile, where: str) -> Iterator[tuple[str, dict]]:
    """A tar's samples in WebDataset's grouping: adjacent members sharing a key, as
    ``(key, {extension: (member, bytes)})``."""
    from webdataset.tariterators import base_plus_ext

    key, members = None, {}
    for member in tar:
        if not member.isfile():
            continue
        name_key, ext = base_plus_ext(member.name)
        if name_key is None:
            raise DatasetError(f"shard {where}: member {member.name} has no extension")
        if name_key != key and members:
            yield key, members
            members = {}
        elif ext.lower() in members:
            raise DatasetError(
                f"shard {where}: key {name_key} appears twice ({member.name}): a row is a "
                "sample key, each key must be unique"
            )
        key = name_key
        members[ext.lower()] = (member, tar.extractfile(member).read())
    if members:
        yield key, members


def _entry(where: str, shard: str, key: str, members: dict, classes: Sequence[str]) -> ShardEntry:
    """One sample's entry, or the one-line error of what is wrong with it."""
    images = [ext for ext in members if ext in SHARD_IMAGE_EXTENSIONS]
    if len(images) != 1:
        found = ", ".join(sorted(members)) or "nothing"
        what = "no image" if not images else f"{len(images)} images"
        raise DatasetError(f"shard {where}: sample {key} has {what} (members: {found})")
    if "cls" not in members:
        raise DatasetError(f"shard {where}: sample {key} has no cls label")
    text = members["cls"][1].decode(errors="replace").strip()
    if not re.fullmatch(r"-?\d+", text):
        raise DatasetError(f"shard {where}: sample {key} has cls {text!r}, not a class index")
    label = int(text)
    if not 0 <= label < len(classes):
        raise DatasetError(
            f"shard {where}: sample {key} has label {label}, outside the {len(classes)} classes "
            f"of the class file (0..{len(classes) - 1})"
        )
    member, data = members[images[0]]
    name = f"{key}.{images[0]} (shard {where})"
    channels, (height, width) = check_image(io.BytesIO(data), name)
    return ShardEntry(key, shard, member.name, member.offset_data, member.size, label,
                      hashlib.sha256(data).hexdigest(), height, width, channels)  # fmt: skip


def build_index(
    spec: str, split: str, rehash: bool = False
) -> tuple[ShardIndex, fsspec.AbstractFileSystem]:
    """The split's index (see the module docstring): shards whose stamp matches the stored
    index keep their entries, the others are read again; stored when it changed and the
    location is writable. Duplicate keys (in one shard or across shards) are an error.
    With ``rehash`` (``verify --data --rehash``) no stamp is trusted: every shard is read
    and every sample hashed again, and the stored index replaced by what was found."""
    fs, root, shards = _root_and_shards(spec, split)
    where = spec.rsplit("/", 1)[0] if "{split}" in spec else spec
    classes = read_classes(fs, root, where)
    stored_file = f"{root}/.kdpipe-index-{split}.json"
    stored = {} if rehash else _read_stored(fs, stored_file, classes)
    records, entries = [], []
    for shard in tqdm(shards, desc=f"indexing {where} {split}", unit="shard", disable=None):
        stamp = _stamp(fs, f"{root}/{shard}")
        known = stored.get(shard)
        if stamp is not None and known is not None and known[0] == stamp:
            samples = known[1]
        else:
            samples = _samples_of(fs, root, shard, classes)
        records.append({"shard": shard, "stamp": stamp, "samples": [s.__dict__ for s in samples]})
        entries.extend(samples)
    entries.sort(key=lambda entry: entry.key)
    for before, after in itertools.pairwise(entries):
        if before.key == after.key:
            raise DatasetError(
                f"{where}: key {after.key} appears twice (in shard {before.shard} and shard "
                f"{after.shard}): a row is a sample key, each key must be unique"
            )
    if rehash or {r["shard"]: (r["stamp"], r["samples"]) for r in records} != {
        k: (v[0], [s.__dict__ for s in v[1]]) for k, v in stored.items()
    }:
        _write_stored(fs, stored_file, classes, records)
    return ShardIndex(where, root, split, classes, tuple(entries)), fs


def _read_stored(fs: fsspec.AbstractFileSystem, path: str,
                 classes: tuple[str, ...]) -> dict[str, tuple[str, list[ShardEntry]]]:  # fmt: skip
    """The stored index by shard; empty when there is none, it is not ours, or the class
    file changed (labels are checked against it)."""
    try:
        record = json.loads(fs.cat_file(path))
        if record.get("format") != INDEX_FORMAT or tuple(record["classes"]) != classes:
            return {}
        return {
            r["shard"]: (r["stamp"], [ShardEntry(**s) for s in r["samples"]])
            for r in record["shards"]
        }
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}


def _write_stored(fs: fsspec.AbstractFileSystem, path: str, classes: tuple[str, ...],
                  records: list[dict]) -> None:  # fmt: skip
    """Locally written aside and moved into place; on an object store one PUT (atomic).
    A location that cannot be written keeps the index in memory only."""
    text = json.dumps({"format": INDEX_FORMAT, "classes": list(classes), "shards": records})
    try:
        if isinstance(fs, LocalFileSystem):
            temporary = f"{path}.{os.getpid()}.tmp"
            try:
                Path(temporary).write_text(text)
                os.replace(temporary, path)
            finally:
                Path(temporary).unlink(missing_ok=True)
        else:
            fs.pipe_file(path, text.encode())
    except (OSError, NotImplementedError, ValueError):
        pass


# --- rows read on demand -----------------------------------------------------------------------


class ShardImages(LazyImages):
    """The pixels of a sharded split (see :class:`~kdpipe.data.imagefolder.LazyImages`): row
    *i* is the index's sample *i*, one ranged read of its image member, checked against
    the member's digest, then decoded."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str,
                 entries: Sequence[ShardEntry], channels: int, size: tuple[int, int],
                 workers: int = 0, resize: str = DEFAULT_RESIZE) -> None:  # fmt: skip
        super().__init__(channels, size, workers, resize)
        self.fs, self.root, self.entries = fs, root, tuple(entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        c, (h, w) = self.channels, self.size
        return f"ShardImages({len(self)} samples of {self.root}, {c}x{h}x{w})"

    def with_workers(self, workers: int) -> ShardImages:
        return self._keep(ShardImages(self.fs, self.root, self.entries, self.channels,
                                      self.size, workers, self.resize))  # fmt: skip

    def subset(self, rows: torch.Tensor | np.ndarray | Sequence[int]) -> ShardImages:
        picked = np.asarray(rows, dtype=np.int64).reshape(-1)
        entries = [self.entries[i] for i in picked]
        return self._keep(ShardImages(self.fs, self.root, entries, self.channels, self.size,
                                      self.workers, self.resize))  # fmt: skip

    def member_bytes(self, row: int) -> bytes:
        """The image member's bytes of row ``row``, as indexed (a changed shard is an error)."""
        entry = self.entries[row]
        where = f"{self.root}/{entry.shard}"
        try:
            data = self.fs.cat_file(where, start=entry.offset, end=entry.offset + entry.size)
        except OSError as exc:
            raise DatasetError(f"cannot read shard {where}: {exc.strerror or exc}") from None
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            raise DatasetError(
                f"shard {where} changed since it was indexed (sample {entry.key}): open the "
                "dataset again"
            )
        return data

    def decode_row(self, row: int) -> np.ndarray:
        entry = self.entries[row]
        name = f"{entry.member} (shard {self.root}/{entry.shard})"
        data = io.BytesIO(self.member_bytes(row))
        return decode_image(data, self.channels, self.size, name, self.resize, self.through)


# --- writing shards ----------------------------------------------------------------------------


def iter_folder_samples(paths: Sequence[str], labels: Sequence[int]) -> Iterator[dict]:
    """WebDataset samples of an image folder, in its canonical order: key = the position
    (zero-padded, so the shards' canonical order is the folder's), the file's bytes as they
    are (no re-encoding: the same pixels) under its extension, and ``cls``."""
    width = max(6, len(str(len(paths))))
    for position, (path, label) in enumerate(zip(paths, labels, strict=True)):
        ext = Path(path).suffix.lower().lstrip(".")
        yield {"__key__": f"{position:0{width}d}", ext: Path(path).read_bytes(), "cls": int(label)}


def pack_shards(splits: dict[str, tuple[Sequence[str], Sequence[int]]], classes: Sequence[str],
                out: Path, shard_size: int) -> dict[str, int]:  # fmt: skip
    """Write each split's samples (paths and labels) as ``OUT/<split>-NNNNNN.tar`` shards of
    at most ``shard_size`` samples (``webdataset.ShardWriter``) and ``classes.txt``; built in
    a folder beside ``out`` and moved into place at the end, so a failure leaves nothing
    half-written. Returns the number of shards per split."""
    import shutil
    import tempfile

    import webdataset

    if shard_size < 1:
        raise DatasetError(f"--shard-size must be at least 1, not {shard_size}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DatasetError(f"{out} exists and is not an empty folder: choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    counts = {}
    try:
        (building / "classes.txt").write_text("".join(f"{name}\n" for name in classes))
        for split, (paths, labels) in splits.items():
            pattern = str(building / f"{split}-%06d.tar")
            with webdataset.ShardWriter(pattern, maxcount=shard_size, verbose=0) as sink:
                for sample in iter_folder_samples(paths, labels):
                    sink.write(sample)
            counts[split] = len(list(building.glob(f"{split}-*.tar")))
        if out.exists():
            out.rmdir()
        os.replace(building, out)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return counts
