"""Image folders that are never decoded whole: an index of files, and rows decoded on demand.

An image folder split (``root/<split>/<class>/<image>``) is described by its *index*: per
file, in canonical order (class name, then path relative to the split folder), the
relative path, the class, the byte size, the modification time and a SHA-256 of the
file's bytes. The index is stored beside the data (``root/.kdpipe-index-<split>.json``)
and reused: a file whose (size, mtime) is unchanged keeps its digest, any other is
hashed again, so opening a folder of 50,000 files a second time costs 50,000 ``stat``
calls, not a read of every byte. The split's fingerprint comes from the index (paths,
labels, the files' digests and the decode shape), never from decoded pixels.

Pixels come from :class:`FolderImages`: an object that looks like the uint8 tensor
``(N, C, H, W)`` the in-memory datasets hold (``len``, ``shape``, ``images[rows]``) but
decodes only the rows asked for, each converted by :func:`decode_image` (one documented
rule per PIL mode). :func:`batches_of` gives a pass's batches, decoded ahead in
DataLoader workers when asked.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
from kdpipe.base.errors import DatasetError
from tqdm.auto import tqdm

if TYPE_CHECKING:  # for annotations: imported where they are used, so that a command
    # that reads records only loads no deep-learning library
    import torch
    from kdpipe.views.inputs import DataConfig

INDEX_FORMAT = 2  # 2: each file's decoded height, width and channels
FINGERPRINT_TAG = b"kdpipe image folder index 2\n"  # what the folder fingerprint's digest covers
HASH_BLOCK = 2**20
# how a file of another size than the decode size is resized (``--resize``): ``crop`` keeps its
# aspect ratio (shorter side to the size, then the centre cut out: timm's eval transform,
# ``Resize(S)`` + ``CenterCrop(S)``), ``squash`` stretches both edges to it
RESIZE_MODES = ("crop", "squash")
DEFAULT_RESIZE = "crop"


# the files an image folder holds, by extension (case ignored): PIL reads each of them
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".ppm", ".tif", ".tiff", ".webp")


def is_image_file(path: Path) -> bool:
    """A file of an image folder: a regular file with one of :data:`IMAGE_EXTENSIONS`."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def image_files(top: Path) -> list[str]:
    """Every image file under ``top`` (:func:`is_image_file`), at any depth, as paths joined
    onto ``str(top)``, unsorted; symlinked folders are listed, not entered (as
    ``Path.rglob``). ``os.scandir`` rather than ``rglob``: its entries know their type
    without a ``stat`` each, so listing 50,000 files takes a tenth of the time."""
    found, folders = [], [str(top)]
    while folders:
        with os.scandir(folders.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    folders.append(entry.path)
                elif entry.name.lower().endswith(IMAGE_EXTENSIONS) and entry.is_file():
                    found.append(entry.path)
    return found


def relative_path(path: str, split_dir: Path) -> str:
    """``path`` relative to ``split_dir``, POSIX separators: a string operation where the
    path was joined onto ``str(split_dir)`` (every listed file), pathlib otherwise."""
    prefix = str(split_dir) + os.sep
    if path.startswith(prefix):
        return path[len(prefix) :].replace(os.sep, "/")
    return Path(path).relative_to(split_dir).as_posix()


def index_path(root: Path, split: str) -> Path:
    """Where a split's index is kept: beside the data, one hidden file per split."""
    return Path(root) / f".kdpipe-index-{split}.json"


@dataclass(frozen=True)
class IndexEntry:
    """One file of a split: where it is, its class, and what identifies its bytes."""

    path: str  # relative to the split folder, POSIX separators
    label: int  # class index, -1 in an unlabeled split
    size: int  # bytes
    mtime_ns: int  # st_mtime_ns when it was hashed: (size, mtime_ns) unchanged means reuse
    sha256: str  # of the file's bytes
    height: int  # as decoded (after its EXIF orientation): what the decode size is chosen from
    width: int
    channels: int  # 1 for a grayscale mode, 3 for every other (channels_of)


@dataclass(frozen=True)
class FolderIndex:
    """A split's files in canonical order (see the module docstring)."""

    split_dir: Path
    classes: tuple[str, ...]
    entries: tuple[IndexEntry, ...]

    def paths(self) -> tuple[str, ...]:
        top = str(self.split_dir)  # what str(split_dir / path) gives, without a Path each
        return tuple(os.path.join(top, *entry.path.split("/")) for entry in self.entries)

    def labels(self) -> torch.Tensor:
        import torch

        return torch.tensor([entry.label for entry in self.entries], dtype=torch.int64)

    def shapes(self) -> list[tuple[int, int, int]]:
        """Each file's (channels, height, width) as decoded: what :func:`decode_shape` reads."""
        return [(entry.channels, entry.height, entry.width) for entry in self.entries]

    def fingerprint(self, shape: tuple[int, int, int], resize: str = DEFAULT_RESIZE) -> dict:
        """Count, classes and a SHA-256 over the decode shape and resize mode and, per file in
        canonical order, its relative path, label and content digest: renaming, adding,
        removing or editing a file changes it, and so does decoding at another size, channel
        count or resize mode."""
        rows = [(entry.path, entry.label, entry.sha256) for entry in self.entries]
        return index_fingerprint(FINGERPRINT_TAG, rows, self.classes, shape, resize)


def index_fingerprint(
    tag: bytes, rows: Sequence[tuple[str, int, str]], classes: Sequence[str],
    shape: tuple[int, int, int], resize: str,
) -> dict:  # fmt: skip
    """A dataset's fingerprint from its index: count, classes and a SHA-256 over ``tag``, the
    count, decode shape and resize mode, then per row in canonical order its name (a folder's
    relative path, a shard sample's key), label and content digest. Shared by folders and
    shards.

    Each row is one JSON line (``["NAME", LABEL, "SHA256"]``): JSON escapes every tab,
    newline and quote a name may hold, so no name can end one row and forge the next
    (with ``NAME\\tLABEL\\tSHA\\n`` lines, two different folders could share a digest)."""
    digest = hashlib.sha256(tag)
    digest.update(_json_line([len(rows), *shape, resize]))
    for name, label, sha256 in rows:
        digest.update(_json_line([name, int(label), sha256]))
    return {
        "count": len(rows),
        "num_classes": len(classes),
        "classes": list(classes),
        "sha256": digest.hexdigest(),
    }


def _json_line(value: list) -> bytes:
    """``value`` as one line of JSON (ASCII, no spaces): its own framing, unforgeable."""
    return (json.dumps(value, ensure_ascii=True, separators=(",", ":")) + "\n").encode()


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes; an unreadable file is an error naming it."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(HASH_BLOCK), b""):
                digest.update(block)
    except OSError as exc:
        raise DatasetError(f"cannot read image {path}: {exc.strerror or exc}") from None
    return digest.hexdigest()


def build_index(
    root: Path,
    split: str,
    samples: Sequence[tuple[str, int]],
    classes: tuple[str, ...],
    rehash: bool = False,
) -> FolderIndex:
    """The index of ``samples`` (absolute paths and labels, in canonical order), reusing the
    stored index's digest of every file whose (size, mtime) has not changed, and storing
    the result when it differs from what was stored (skipped where the folder is read-only:
    the index is then rebuilt, in memory, on every open). Each file hashed is also opened
    once (:func:`check_image`), so a file that is not an image stops the open, named.

    With ``rehash`` nothing stored is trusted: every file is read and hashed again
    (``verify --data --rehash``), and the stored index is replaced by what was found. The
    quick path cannot see a file edited with its size and mtime put back, nor an index
    entry edited to a file's new size and mtime with the old digest; this one can."""
    split_dir = Path(root) / split
    stored_file = index_path(root, split)
    stored = {} if rehash else _read_stored(stored_file)
    entries = []
    progress = tqdm(samples, desc=f"indexing {split_dir}", unit="file", disable=None)
    for path, label in progress:
        relative = relative_path(path, split_dir)
        try:
            stat = os.stat(path)
        except OSError as exc:
            raise DatasetError(f"cannot read image {path}: {exc.strerror or exc}") from None
        known = stored.get(relative)
        if known is not None and (known.size, known.mtime_ns) == (stat.st_size, stat.st_mtime_ns):
            sha, channels, height, width = known.sha256, known.channels, known.height, known.width
        else:  # a new or changed file: hashed, and opened once to prove it is an image
            sha = file_digest(Path(path))
            channels, (height, width) = check_image(path)
        entries.append(IndexEntry(relative, int(label), stat.st_size, stat.st_mtime_ns, sha,
                                  height, width, channels))  # fmt: skip
    index = FolderIndex(split_dir, classes, tuple(entries))
    if rehash or {e.path: e for e in entries} != stored:
        _write_stored(stored_file, index)
    return index


def _read_stored(path: Path) -> dict[str, IndexEntry]:
    """The stored index by relative path; empty when there is none or it is not one of
    ours (a damaged index file costs a re-hash, never a wrong digest)."""
    try:
        record = json.loads(path.read_text())
        if record.get("format") != INDEX_FORMAT:
            return {}
        entries = [IndexEntry(**entry) for entry in record["files"]]
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}
    return {entry.path: entry for entry in entries}


def _write_stored(path: Path, index: FolderIndex) -> None:
    """Written aside, then moved into place, so a reader never sees half an index. Where
    nothing can be written (a read-only mount, a folder of another user) the index stays
    in memory: every failure here, the clean-up's included, is swallowed, since the index
    is a shortcut and never the data."""
    record = {
        "format": INDEX_FORMAT,
        "classes": list(index.classes),
        "files": [entry.__dict__ for entry in index.entries],
    }
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        with os.fdopen(descriptor, "w") as out:
            out.write(json.dumps(record, indent=0))
        os.replace(temporary, path)
    except OSError:
        with contextlib.suppress(OSError):  # on a read-only mount unlink fails too (EROFS)
            os.unlink(temporary)


# --- decoding ----------------------------------------------------------------------------------

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
GRAY_MODES = ("1", "L", "LA", "La", "F", *SIXTEEN_BIT_MODES)


def channels_of(mode: str) -> int:
    """The channel count a file decodes to when ``--channels`` is not given: 1 for grayscale
    modes (with or without alpha, 16-bit), 3 for every other."""
    return 1 if mode in GRAY_MODES else 3


def to_8bit_mode(image: object) -> object:
    """A PIL image in L, RGB or RGBA/LA (alpha kept for compositing), by the rules in
    ``docs/cache-format.md``: 16-bit and 32-bit grayscale scaled 0-65535 onto 0-255 (PIL's
    own ``convert("L")`` clips at 255 and turns most of a 16-bit image white), float
    grayscale clipped to 0-255, palette images expanded (to RGBA when the palette has
    transparency), CMYK and YCbCr converted by PIL to RGB."""
    from PIL import Image

    mode = image.mode
    if mode in SIXTEEN_BIT_MODES:
        pixels = np.asarray(image, dtype=np.float64)
        return Image.fromarray(np.clip(np.rint(pixels * (255 / 65535)), 0, 255).astype(np.uint8))
    if mode == "F":
        return Image.fromarray(np.clip(np.rint(np.asarray(image)), 0, 255).astype(np.uint8))
    if mode in ("P", "PA"):
        return image.convert("RGBA")
    if mode in ("LA", "La"):
        return image.convert("LA")
    if mode in ("RGBA", "RGBa"):
        return image.convert("RGBA")
    if mode in ("L", "RGB"):
        return image
    return image.convert("RGB")  # 1, CMYK, YCbCr, LAB, HSV, RGBX


def _on_white(image: object) -> object:
    """Alpha composited on white (transparent pixels become white, as a browser shows them
    on a white page), the alpha band then dropped."""
    from PIL import Image

    if image.mode not in ("LA", "RGBA"):
        return image
    white = Image.new(image.mode, image.size, (255,) * len(image.mode))
    return Image.alpha_composite(white.convert("RGBA"), image.convert("RGBA")).convert(
        image.mode[:-1]
    )


def decode_image(
    path: str | BinaryIO, channels: int, size: tuple[int, int], name: str | None = None,
    resize: str = DEFAULT_RESIZE, through: DataConfig | None = None,
) -> np.ndarray:  # fmt: skip
    """One file (a path, or an open binary file such as a shard's member) to uint8
    ``(channels, *size)``: EXIF orientation applied (``ImageOps.exif_transpose``), converted
    to 8 bits (:func:`to_8bit_mode`), alpha composited on white, then to L or RGB and, when
    its size is not ``size`` (H, W), resized by PIL's bilinear filter (:func:`resized`);
    with ``through`` (a pretrained model's data config), by that model's own eval transform
    instead (:func:`kdpipe.views.inputs.eval_transform`), to its input size.
    An unreadable or truncated file is an error naming it (``name``, else the path), never
    skipped."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as opened:
            opened.load()
            image = _on_white(to_8bit_mode(ImageOps.exif_transpose(opened)))
            image = image.convert("L" if channels == 1 else "RGB")
            if through is not None:
                from kdpipe.views.inputs import eval_transform

                return eval_transform(through)(image).numpy()  # uint8 (C, H, W) already
            pixels = np.asarray(resized(image, size, resize), dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise _unreadable(name or path, exc) from None
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)


def resized(image: object, size: tuple[int, int], resize: str = DEFAULT_RESIZE) -> object:
    """A PIL image at ``size`` (H, W). ``squash``: both edges resized to it. ``crop``: the
    aspect ratio kept, resized (bilinear) until it covers ``size``, then the centre cut out:
    for a square size S exactly torchvision's ``Resize(S)`` (the shorter side to S, the
    longer to ``int(S * long / short)``) then ``CenterCrop(S)``, which timm's eval transform
    is, so a file decodes to the pixels timm's loader gives it."""
    from PIL import Image

    height, width = int(size[0]), int(size[1])
    if (image.height, image.width) == (height, width):
        return image
    if resize == "squash":
        return image.resize((width, height), Image.BILINEAR)
    if resize != "crop":
        raise DatasetError(f"--resize must be one of {', '.join(RESIZE_MODES)}, not {resize!r}")
    if height * image.width <= width * image.height:  # the width decides: scaled to it
        scaled = (width, max(height, int(width * image.height / image.width)))
    else:
        scaled = (max(width, int(height * image.width / image.height)), height)
    if scaled != image.size:
        image = image.resize(scaled, Image.BILINEAR)
    top = round((image.height - height) / 2.0)  # torchvision's CenterCrop, to the pixel
    left = round((image.width - width) / 2.0)
    return image.crop((left, top, left + width, top + height))


def _unreadable(name: object, exc: BaseException) -> DatasetError:
    reason = " ".join(str(exc).split()) or type(exc).__name__
    return DatasetError(f"cannot read image {name}: {reason}")


EXIF_ORIENTATION = 0x0112  # orientations 5-8 turn the image a quarter: height and width swap


def check_image(path: str | BinaryIO, name: str | None = None) -> tuple[int, tuple[int, int]]:
    """The file's channels and (H, W) as decoded (after its EXIF orientation), read from
    its header; fails now, naming the file (``name``, else the path), when ``path`` is not
    an image PIL can identify and verify (header and, for PNG, chunk checksums). Damage only
    a full decode finds is named when the row is decoded."""
    from PIL import Image

    try:
        with Image.open(path) as opened:
            (width, height), channels = opened.size, channels_of(opened.mode)
            opened.verify()
        if not isinstance(path, str):
            path.seek(0)
        with Image.open(path) as opened:  # verify() leaves the file unusable: opened again
            if opened.getexif().get(EXIF_ORIENTATION) in (5, 6, 7, 8):
                width, height = height, width
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise _unreadable(name or path, exc) from None
    return channels, (height, width)


def decode_shape(
    shapes: Sequence[tuple[int, int, int]], image_size: int | tuple[int, int] | None,
    channels: int | None,
) -> tuple[int, tuple[int, int]]:  # fmt: skip
    """The one decode shape of every split of a dataset, from its reference split's files
    (``shapes``: each file's channels, height, width; the train split's, see
    ``docs/cache-format.md``) where not given: channels 3 when any file is in colour, else
    1; size the files' own when they all share one, otherwise S x S with S the median
    (the lower one) of their shorter sides, so one odd file (a 1 x 1 icon first in order)
    cannot set the size of the rest."""
    if channels is None:
        channels = 3 if any(c == 3 for c, _, _ in shapes) else 1
    if channels not in (1, 3):
        raise DatasetError(f"--channels must be 1 or 3, not {channels}")
    if isinstance(image_size, int):
        return channels, (image_size, image_size)
    if image_size is not None:
        return channels, (int(image_size[0]), int(image_size[1]))
    sizes = sorted({(h, w) for _, h, w in shapes})
    if len(sizes) == 1:
        return channels, sizes[0]
    sides = sorted(min(h, w) for _, h, w in shapes)
    side = sides[(len(sides) - 1) // 2]
    return channels, (side, side)


# --- rows decoded on demand --------------------------------------------------------------------


class LazyImages:
    """Rows of a dataset decoded only when asked for: the common shape of an image folder
    (:class:`FolderImages`) and WebDataset shards (:class:`kdpipe.data.shards.ShardImages`).

    Stands where an in-memory dataset's uint8 tensor ``(N, C, H, W)`` stands: ``len``,
    ``shape``, ``dtype`` and ``images[rows]`` (an int, a slice, or an index tensor or
    array) returning decoded uint8 rows, so the teacher pass, training batches,
    evaluation and the API index it as they index a tensor, and memory holds a batch,
    never the dataset. ``workers`` is how many DataLoader processes :func:`batches_of`
    decodes ahead in. A subclass says how many rows it has (``__len__``), how one row is
    decoded (``decode_row``) and how to make itself again (``subset``, ``with_workers``).
    """

    ndim = 4

    @property
    def dtype(self) -> torch.dtype:
        import torch

        return torch.uint8

    def __init__(
        self, channels: int, size: tuple[int, int], workers: int = 0, resize: str = DEFAULT_RESIZE
    ) -> None:
        self.channels = int(channels)
        self.size = (int(size[0]), int(size[1]))
        self.workers = int(workers)
        self.resize = resize  # how a file of another size is brought to ``size`` (resized)
        self.through: DataConfig | None = None  # a model's eval transform, applied to files

    def __len__(self) -> int:
        raise NotImplementedError

    def decode_row(self, row: int) -> np.ndarray:
        """Row ``row`` (0 <= row < len) as uint8 ``(C, H, W)``."""
        raise NotImplementedError

    def subset(self, rows: torch.Tensor | np.ndarray | Sequence[int]) -> LazyImages:
        """Rows ``rows`` as another lazy source (nothing decoded)."""
        raise NotImplementedError

    def with_workers(self, workers: int) -> LazyImages:
        """The same rows, decoded ahead by ``workers`` DataLoader processes in a pass."""
        raise NotImplementedError

    def through_model(self, data_config: DataConfig) -> LazyImages:
        """These rows as a pretrained model reads them: each file through the model's own
        eval transform (resize by its interpolation, its crop) to its input size, what
        timm's loader gives it, rather than the decoded row resized a second time."""
        made = self.with_workers(self.workers)  # a copy, decoding as these rows do
        made.through, made.size = data_config, tuple(data_config.input_size[1:])
        return made

    def _keep(self, made: LazyImages) -> LazyImages:
        """``made`` (a subset, another worker count) decoding as these rows do."""
        if self.through is not None:
            made.through, made.size = self.through, self.size
        return made

    @property
    def shape(self) -> torch.Size:
        import torch

        return torch.Size((len(self), self.channels, *self.size))

    def __getitem__(self, index: object) -> torch.Tensor:
        import torch

        if isinstance(index, tuple):  # rows first, then the rest on the decoded rows
            if not index:
                return self[:]
            one_row = isinstance(index[0], (int, np.integer))
            return self[index[0]][index[1:] if one_row else (slice(None), *index[1:])]
        if isinstance(index, (int, np.integer)):
            return torch.from_numpy(self._decode([int(index)])[0])
        if isinstance(index, slice):
            return torch.from_numpy(self._decode(range(*index.indices(len(self)))))
        if isinstance(index, torch.Tensor):
            index = index.cpu().numpy()
        rows = np.asarray(index)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        return torch.from_numpy(self._decode(rows.astype(np.int64).reshape(-1)))

    def _decode(self, rows: Iterable[int]) -> np.ndarray:
        rows = [int(r) + len(self) if int(r) < 0 else int(r) for r in rows]
        out = np.empty((len(rows), self.channels, *self.size), dtype=np.uint8)
        for slot, row in enumerate(rows):
            if not 0 <= row < len(self):
                raise IndexError(f"row {row} of {len(self)} images")
            out[slot] = self.decode_row(row)
        return out


class FolderImages(LazyImages):
    """The pixels of an image folder split (see :class:`LazyImages`), one file per row."""

    def __init__(
        self, paths: Sequence[str], channels: int, size: tuple[int, int], workers: int = 0,
        resize: str = DEFAULT_RESIZE,
    ) -> None:  # fmt: skip
        super().__init__(channels, size, workers, resize)
        self.paths = tuple(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        return f"FolderImages({len(self)} files, {self.channels}x{self.size[0]}x{self.size[1]})"

    def with_workers(self, workers: int) -> FolderImages:
        return self._keep(FolderImages(self.paths, self.channels, self.size, workers, self.resize))

    def subset(self, rows: torch.Tensor | np.ndarray | Sequence[int]) -> FolderImages:
        picked = np.asarray(rows, dtype=np.int64).reshape(-1)
        return self._keep(FolderImages([self.paths[i] for i in picked], self.channels,
                                       self.size, self.workers, self.resize))  # fmt: skip

    def decode_row(self, row: int) -> np.ndarray:
        return decode_image(self.paths[row], self.channels, self.size, resize=self.resize,
                            through=self.through)  # fmt: skip


class _Requests:
    """A map-style dataset (what DataLoader indexes; no torch base class needed) of whole
    batches of rows, so DataLoader workers decode them; an error travels back as its
    message (a worker's exception would arrive as a traceback)."""

    def __init__(self, images: LazyImages, requests: Sequence[torch.Tensor]) -> None:
        self.images = images
        self.requests = requests

    def __len__(self) -> int:
        return len(self.requests)

    def __getitem__(self, item: int) -> torch.Tensor | str:
        try:
            return self.images[self.requests[item]]
        except DatasetError as exc:
            return str(exc)


def batches_of(
    images: torch.Tensor | LazyImages, requests: Sequence[torch.Tensor]
) -> Iterator[torch.Tensor]:
    """``images[r]`` for each index tensor ``r`` of ``requests``, in order: a tensor's rows
    gathered, lazy rows (a folder's, shards') decoded here or, with ``images.workers``, ahead
    in DataLoader worker processes (at most a few batches in flight: memory stays one
    batch's order)."""
    import torch

    workers = getattr(images, "workers", 0)
    if not isinstance(images, LazyImages) or workers == 0 or len(requests) < 2:
        yield from (images[request] for request in requests)
        return
    loader = torch.utils.data.DataLoader(
        _Requests(images, requests),
        batch_size=None,
        num_workers=min(workers, len(requests)),
        prefetch_factor=2,
    )
    for batch in loader:
        if isinstance(batch, str):
            raise DatasetError(batch)
        yield batch


def pixel_stats(images: LazyImages, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and (unbiased) std of pixels scaled to [0, 1], over every image,
    one batch decoded at a time."""
    import torch

    total = np.zeros(images.channels)
    squares = np.zeros(images.channels)
    requests = [torch.arange(s, min(s + batch_size, len(images)))
                for s in range(0, len(images), batch_size)]  # fmt: skip
    for batch in batches_of(images, requests):
        x = batch.numpy().astype(np.float64) / 255.0
        total += x.sum(axis=(0, 2, 3))
        squares += (x * x).sum(axis=(0, 2, 3))
    n = len(images) * images.size[0] * images.size[1]
    mean = total / n
    variance = np.maximum(squares - n * mean * mean, 0.0) / max(n - 1, 1)
    return mean, np.sqrt(variance)
