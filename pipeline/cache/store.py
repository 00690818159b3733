"""Writing and reading the Zarr store. Knows nothing about models.

Layout (see ``docs/cache-format.md`` and ``format.array_specs``): a Zarr v3
group with

- the storage layout's arrays (``layout.py``): ``logprobs``, float16 ``(N, V, C)``,
  ``log_softmax(z / T)`` per row and view (or ``topk_logprobs`` and ``topk_indices``,
  ``(N, V, K)``, for a top-k cache),
- ``labels`` and ``indices``: int64 ``(N,)``, each row's label and its index
  in the dataset's canonical order,
- ``views``: float32 ``(N, V, 10)`` view parameters, ``partners``: int64
  ``(N, V)`` the dataset index mixed in (-1: none),

all chunked along the row axis, zstd-compressed and crc32c-checksummed, and
the manifest in the group attributes under ``kdpipe``. The manifest's
``status`` becomes ``complete`` only after every chunk is written.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import zarr
from kdpipe.base.checks import check_temperature as check_temperature_value
from kdpipe.base.errors import (
    CacheError,
    CacheIncompleteError,
    CacheMismatchError,
    ManifestError,
    NotACacheError,
)
from kdpipe.cache.detection import (
    TASK as DETECTION_TASK,
)
from kdpipe.cache.detection import (
    DetectionManifest,
    derive_detection_cache_id,
    derive_detection_teacher_id,
)
from kdpipe.cache.format import (
    CHECKSUM_KEY,
    MANIFEST_KEY,
    STATUS_COMPLETE,
    VIEW_COLUMNS,
    Manifest,
    array_specs,
    derive_cache_id,
    derive_teacher_id,
    manifest_checksum,
)
from kdpipe.cache.location import Location
from zarr.codecs import Crc32cCodec, ZstdCodec

if TYPE_CHECKING:  # for annotations: imported where they are used, so that a command
    # that reads records only loads no deep-learning library
    import torch

PROGRESS = "progress"
# one digest per data array and chunk, binding the chunk's values to its position and to
# this cache: crc32c proves the bytes are intact, not that they belong where they are
DIGESTS = "chunk_digests"
DIGEST_BYTES = 16


def chunk_digest(cache_id: str, name: str, index: int, values: np.ndarray) -> np.ndarray:
    """The first 16 bytes of SHA-256 over (cache_id, array name, chunk index, dtype, shape,
    values): a chunk moved to another position, or copied from another cache, differs."""
    values = np.ascontiguousarray(values)
    digest = hashlib.sha256(
        f"{cache_id}|{name}|{index}|{values.dtype.str}|{values.shape}|".encode()
    )
    digest.update(values.tobytes())
    return np.frombuffer(digest.digest()[:DIGEST_BYTES], dtype=np.uint8)


def digest_matches(
    cache_id: str, name: str, index: int, values: np.ndarray, expected: np.ndarray
) -> bool:
    """Whether ``values`` are what was written at chunk ``index`` of ``name`` in this cache."""
    return np.array_equal(chunk_digest(cache_id, name, index, values), expected)


class Positions:
    """The chunk digests of a cache, read once: every chunk read is checked against the
    digest of its position."""

    def __init__(self, path: str | Path | Location, manifest: Manifest, table: np.ndarray):
        self.path, self.cache_id = path, manifest.cache_id
        self.names = list(array_specs(manifest))
        self.table = table  # (chunks, arrays, DIGEST_BYTES)

    def mismatch(self, name: str, index: int, values: np.ndarray) -> bool:
        expected = self.table[index, self.names.index(name)]
        return not digest_matches(self.cache_id, name, index, values, expected)

    def check_all(self, data: dict[str, np.ndarray], chunk_size: int) -> None:
        """Every chunk of the arrays read whole (``data``) against its digest."""
        for name in self.names:
            for index, start in enumerate(range(0, len(data[name]), chunk_size)):
                stop = min(start + chunk_size, len(data[name]))
                self.check(name, index, data[name][start:stop], f"rows {start}-{stop - 1}")

    def check(self, name: str, index: int, values: np.ndarray, rows: str) -> None:
        if self.mismatch(name, index, values):
            raise CacheError(
                f"{self.path}: chunk {index} of {name!r} ({rows}) is not this cache's chunk "
                f"{index}: its contents belong to another position or another cache "
                "(moved or copied in; the position digest does not match)"
            )


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def array_codecs() -> dict:
    # crc32c after zstd: the checksum covers the bytes on disk, so a flipped bit
    # is caught before decompression (zstd alone does not always notice).
    return {
        "compressors": [ZstdCodec(level=3), Crc32cCodec()],
        # an all-zero labels chunk equals the fill value and would otherwise be
        # skipped, indistinguishable from a chunk that was never written
        "config": {"write_empty_chunks": True},
    }


def chunk_key(array: zarr.Array, index: int) -> str:
    """The store key of chunk ``index`` along the sample axis (zarr's default encoding)."""
    return "/".join(["c", str(index)] + ["0"] * (array.ndim - 1))


class CacheWriter:
    """Creates (or reopens) the store, writes it chunk by chunk, marks it complete last.

    Chunk *k* counts as done only when ``progress[k] == 1``, and that flag is
    written after chunk *k* of every data array has been flushed to disk: a
    kill or a power cut at any moment leaves flags only for durable chunks.
    """

    def __init__(
        self, path: str | Path | Location, manifest: Manifest, *, resume: bool = False
    ) -> None:
        self.location = Location(path)
        self.manifest = manifest
        self.names = tuple(array_specs(manifest))
        if resume:  # KeyError when an array was never created
            self.group = zarr.open_group(self.location.zarr_path, mode="r+")
            # write_empty_chunks is a runtime setting, not stored: set it again, or an
            # all-fill chunk (partners of unmixed views are all -1) would never be written
            self.arrays = {
                name: self.group[name].with_config({"write_empty_chunks": True})
                for name in (*self.names, DIGESTS, PROGRESS)
            }
            return
        self.group = zarr.open_group(self.location.zarr_path, mode="w")
        write_manifest(self.group, manifest)
        self.arrays = {
            name: self.group.create_array(
                name,
                shape=shape,
                chunks=(manifest.chunk_size, *shape[1:]),
                dtype=dtype,
                fill_value=fill,
                **array_codecs(),
            )
            for name, (shape, dtype, fill) in array_specs(manifest).items()
        }
        self.arrays[DIGESTS] = self.group.create_array(
            DIGESTS, shape=(self.num_chunks, len(self.names), DIGEST_BYTES),
            chunks=(1, len(self.names), DIGEST_BYTES), dtype="uint8", fill_value=0,
            **array_codecs(),
        )  # fmt: skip
        self.arrays[PROGRESS] = self.group.create_array(
            PROGRESS, shape=(self.num_chunks,), chunks=(1,), dtype="uint8", fill_value=0,
            **array_codecs(),
        )  # fmt: skip
        self.manifest = replace(
            manifest, array_metadata_sha256=array_metadata_sha256(self.location)
        )
        write_manifest(self.group, self.manifest)

    @property
    def num_chunks(self) -> int:
        return -(-self.manifest.num_samples // self.manifest.chunk_size)

    def finished_chunks(self) -> set[int]:
        """Chunks flagged done whose data files are all still there."""
        return {index for index in range(self.num_chunks) if self._is_finished(index)}

    def _is_finished(self, index: int) -> bool:
        try:
            flagged = int(self.arrays[PROGRESS][index]) == 1
        except Exception:  # a damaged flag only means: compute this chunk again
            return False
        return flagged and all(
            self.location.is_file(name, chunk_key(self.arrays[name], index))
            for name in (*self.names, DIGESTS)
        )

    def write(self, index: int, chunk: dict[str, np.ndarray]) -> None:
        """Write chunk ``index`` of every data array and its position digests, flush them,
        then flag the chunk done."""
        if set(chunk) != set(self.names):
            raise ValueError(f"chunk has arrays {sorted(chunk)}, the cache {sorted(self.names)}")
        start = index * self.manifest.chunk_size
        digests = np.empty((len(self.names), DIGEST_BYTES), dtype=np.uint8)
        for position, name in enumerate(self.names):
            array = self.arrays[name]
            values = chunk[name].astype(array.dtype, copy=False)
            array[start : start + len(values)] = values
            digests[position] = chunk_digest(self.manifest.cache_id, name, index, values)
        self.arrays[DIGESTS][index] = digests
        for name in (*self.names, DIGESTS):
            self.location.sync(name, chunk_key(self.arrays[name], index))
        self.arrays[PROGRESS][index] = 1
        self.location.sync(PROGRESS, chunk_key(self.arrays[PROGRESS], index))

    def finish(self, teacher_accuracy: float | None = None) -> Manifest | DetectionManifest:
        """Mark the cache complete: the last write, after all data is on disk."""
        changes = {"status": STATUS_COMPLETE, "completed": utc_now()}
        if not isinstance(self.manifest, DetectionManifest):  # a detector has no accuracy
            changes["teacher_accuracy"] = teacher_accuracy
        self.manifest = replace(self.manifest, **changes)
        write_manifest(self.group, self.manifest)
        self.location.sync("zarr.json")
        return self.manifest


def write_manifest(group: zarr.Group, manifest: Manifest) -> None:
    """Manifest and checksum in one attribute update: one atomic write of zarr.json."""
    data = manifest.to_dict()
    group.attrs.update({MANIFEST_KEY: data, CHECKSUM_KEY: manifest_checksum(data)})


def array_metadata_sha256(path: str | Path | Location) -> dict:
    """SHA-256 of each array's zarr.json, so that damaged array metadata is noticed too."""
    location = Location(path)
    digests = {}
    for name in location.children():
        if name == "zarr.json":
            continue
        try:
            digests[name] = hashlib.sha256(location.read_bytes(name, "zarr.json")).hexdigest()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            continue
    return digests


def read_manifest(path: str | Path | Location) -> Manifest:
    """The manifest of a classification cache at ``path`` (a folder or an fsspec URL); a
    clear error when it is not a kdpipe cache, or is a detection cache (every reader of
    soft labels comes through here, so none mistakes head outputs for log-probabilities)."""
    manifest = read_cache_manifest(path)
    if isinstance(manifest, DetectionManifest):
        raise CacheMismatchError(
            f"{path} is a detection cache (a YOLO teacher's head outputs), not a classifier's "
            "soft labels: a classification student cannot learn from it; give it to a "
            "detection student"
        )
    return manifest


def read_detection_manifest(path: str | Path | Location) -> DetectionManifest:
    """The manifest of a detection cache at ``path``; a classification cache is one line."""
    manifest = read_cache_manifest(path)
    if not isinstance(manifest, DetectionManifest):
        raise CacheMismatchError(
            f"{path} is a classification cache (soft labels over {manifest.num_classes} "
            "classes), not a detection cache: a detection student needs the cache of a "
            "detection teacher (cache-teacher --teacher DETECTION_RUN --data DATA.yaml)"
        )
    return manifest


def read_cache_manifest(path: str | Path | Location) -> Manifest | DetectionManifest:
    """The manifest of any kdpipe cache at ``path``, classification or detection (its
    ``task``), checksum and ids checked: for the tools that take both (verify, caches, the
    output guard)."""
    path = Location(path)
    meta = f"{path}/zarr.json"
    try:
        raw = path.read_bytes("zarr.json")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise NotACacheError(
            f"{path} is not a kdpipe cache (no zarr.json: not a Zarr v3 group)"
        ) from None
    try:
        document = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{meta} is not valid JSON ({exc}): the cache is damaged") from None
    if (
        not isinstance(document, dict)
        or set(document) - {"attributes", "consolidated_metadata"} != {"zarr_format", "node_type"}
        or document["zarr_format"] != 3
        or document["node_type"] != "group"
    ):
        raise ManifestError(f"{meta} is not the metadata of a Zarr v3 group: the cache is damaged")
    attributes = document.get("attributes", {})
    if not isinstance(attributes, dict):
        raise ManifestError(f"{meta}: 'attributes' is not an object: the cache is damaged")
    if MANIFEST_KEY not in attributes:
        raise NotACacheError(
            f"{path} is a Zarr group but not a kdpipe cache (no '{MANIFEST_KEY}' manifest)"
        )
    data = attributes[MANIFEST_KEY]
    if attributes.get(CHECKSUM_KEY) != manifest_checksum(data):
        raise ManifestError(
            f"{meta}: the manifest does not match its checksum ({CHECKSUM_KEY}): it was edited "
            "or damaged"
        )
    if isinstance(data, dict) and data.get("task") == DETECTION_TASK:
        manifest = DetectionManifest.from_dict(data, where=f"{path}: manifest")
        check_detection_ids(manifest, meta)
        return manifest
    manifest = Manifest.from_dict(data, where=f"{path}: manifest")
    check_ids(manifest, meta)
    return manifest


def check_detection_ids(manifest: DetectionManifest, where: str) -> None:
    """:func:`check_ids` for a detection manifest: both ids derived, never trusted."""
    for name, derived in (("teacher_id", derive_detection_teacher_id(manifest.teacher)),
                          ("cache_id", derive_detection_cache_id(manifest))):  # fmt: skip
        if getattr(manifest, name) != derived:
            raise ManifestError(f"{where}: {name} {getattr(manifest, name)} is not the one its "
                                f"fields give ({derived}): the manifest was edited")  # fmt: skip


def check_ids(manifest: Manifest, where: str) -> None:
    """The ids are derived from the fields, never trusted: a manifest edited and re-signed
    (its checksum recomputed) still cannot pass as another cache or another teacher."""
    teacher_id = derive_teacher_id(list(manifest.teachers), manifest.combine)
    if manifest.teacher_id != teacher_id:
        raise ManifestError(
            f"{where}: teacher_id {manifest.teacher_id} is not the one its teachers and combine "
            f"rule give ({teacher_id}): the manifest was edited"
        )
    cache_id = derive_cache_id(manifest)
    if manifest.cache_id != cache_id:
        raise ManifestError(
            f"{where}: cache_id {manifest.cache_id} is not the one its fields give ({cache_id}): "
            "the manifest was edited"
        )


def open_complete(
    path: str | Path | Location, *, detection: bool = False
) -> tuple[Manifest | DetectionManifest, dict[str, zarr.Array]]:
    """Open a cache's arrays for reading (a detection cache's with ``detection``, else a
    classification cache's); refuse one that is not complete or is damaged."""
    manifest = read_detection_manifest(path) if detection else read_manifest(path)
    if manifest.status != STATUS_COMPLETE:
        raise CacheIncompleteError(
            f"{path} is not complete (status {manifest.status!r}): the teacher pass did not "
            "finish; run cache-teacher again"
        )
    check_array_metadata(path, manifest)  # before zarr parses it: zarr's errors are not ours
    try:
        group = zarr.open_group(Location(path).zarr_path, mode="r")
        arrays = {name: group[name] for name in (*array_specs(manifest), DIGESTS, PROGRESS)}
    except Exception as exc:
        raise CacheError(f"{path}: the arrays cannot be opened ({exc!r})") from None
    return manifest, arrays


def check_array_metadata(path: str | Path | Location, manifest: Manifest) -> None:
    actual = array_metadata_sha256(path)
    expected = manifest.array_metadata_sha256
    if set(expected) != {*array_specs(manifest), DIGESTS, PROGRESS}:
        raise CacheError(f"{path}: the manifest lists arrays {sorted(expected)}, not this layout")
    for name, digest in expected.items():
        if actual.get(name) != digest:
            raise CacheError(
                f"{path}: {name}/zarr.json does not match its checksum in the manifest"
            )


@dataclass(frozen=True)
class SoftLabels:
    """A complete cache read into memory: soft labels, rows and views."""

    path: Location  # str() is the path or URL as given
    manifest: Manifest
    stored: dict[str, torch.Tensor]  # the layout's arrays, as stored (manifest.layout)
    labels: torch.Tensor  # (N,) int64, -1 for an unlabeled transfer set
    indices: torch.Tensor  # (N,) int64: the dataset index of each row
    views: torch.Tensor  # (N, V, 10) float32 view parameters
    partners: torch.Tensor  # (N, V) int64 dataset index mixed in, -1 for none
    # the cached layers (manifest.features), array name -> float16 (N, V, *shape)
    features: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def values(self) -> torch.Tensor:
        """The stored values: log-probabilities ``(N, V, C)``, or the top K ``(N, V, K)``."""
        return self.stored[self.manifest.layout.values_name]

    def log_probs(self, temperature: float | None = None) -> torch.Tensor:
        """float32 ``log_softmax(z / T)`` ``(N, V, C)`` at ``temperature`` (default: stored)."""
        return to_log_probs(self.stored, self.manifest, temperature, self.path)

    @property
    def has_views(self) -> bool:
        """True unless every view is the plain image (then training needs no rendering)."""
        return self.manifest.has_views


def check_temperature(
    manifest: Manifest, temperature: float | None, path: str | Path | Location
) -> None:
    """Refuse a temperature that cannot be one (0, NaN, ...: the command line's message),
    and re-tempering a layout that cannot be (top-k holds only T's top K)."""
    if temperature is not None:
        check_temperature_value(temperature)
    stored = manifest.temperature
    layout = manifest.layout
    if not layout.retemperable and temperature is not None and temperature != stored:
        raise CacheError(
            f"{path} is a {layout.describe()} cache at T={stored:g}: it cannot be "
            f"re-tempered to T={temperature:g} exactly; use T={stored:g} or a dense cache"
        )


def to_log_probs(
    stored: dict[str, torch.Tensor],
    manifest: Manifest,
    temperature: float | None,
    path: str | Path | Location,
) -> torch.Tensor:
    """A layout's stored arrays as float32 log-probabilities at ``temperature`` (default:
    the stored one): decoded by the layout, then re-tempered exactly where it can be."""
    check_temperature(manifest, temperature, path)
    values = manifest.layout.decode(stored)
    if temperature is None or temperature == manifest.temperature:
        return values
    return retemper(values, manifest.temperature, temperature)


def retemper(logprobs: torch.Tensor, stored: float, wanted: float) -> torch.Tensor:
    """``log_softmax(z / wanted)`` from ``log_softmax(z / stored)``, exactly.

    log_softmax(z/T1) = z/T1 - c, so (z/T1 - c) * T1/T2 = z/T2 - c*T1/T2 and the
    constant vanishes in the next log_softmax.
    """
    import torch

    return torch.log_softmax(logprobs * (stored / wanted), dim=-1)


def read_chunk(
    path: str | Path | Location,
    array: zarr.Array,
    name: str,
    index: int,
    positions: Positions | None = None,
) -> np.ndarray:
    """Chunk ``index`` of ``array`` along the rows; damage is reported with that chunk, and
    with ``positions``, a chunk that is not this cache's chunk ``index``."""
    step = array.chunks[0]
    start, stop = index * step, min((index + 1) * step, array.shape[0])
    try:
        values = array[start:stop]
    except Exception as exc:  # zarr raises bare ValueErrors/RuntimeErrors for bad bytes
        raise CacheError(
            f"{path}: chunk {index} of {name!r} (rows {start}-{stop - 1}) is corrupt: {exc}"
        ) from None
    if positions is not None:
        positions.check(name, index, values, f"rows {start}-{stop - 1}")
    return values


def read_positions(path: str | Path | Location, manifest: Manifest, arrays: dict) -> Positions:
    """The chunk digests of a complete cache (a missing digest chunk is an error)."""
    return Positions(path, manifest, read_array(path, arrays[DIGESTS], DIGESTS))


def check_present(path: str | Path | Location, array: zarr.Array, name: str) -> None:
    """Every chunk of ``array`` exists: zarr reads a missing one as fill values, silently."""
    initialized = array.nchunks_initialized
    if initialized != array.nchunks:
        raise CacheError(
            f"{path}: {array.nchunks - initialized} chunk(s) of {name!r} are missing on disk "
            "(zarr would read them as fill values)"
        )


def check_flagged(path: str | Path | Location, arrays: dict[str, zarr.Array]) -> None:
    """Every chunk's progress flag is set, as the manifest's ``complete`` promises."""
    unflagged = np.flatnonzero(read_array(path, arrays[PROGRESS], PROGRESS) != 1)
    if len(unflagged):
        raise CacheError(
            f"{path}: chunk(s) {', '.join(map(str, unflagged[:10]))} are not flagged "
            "as written, although the manifest says complete"
        )


def read_array(
    path: str | Path | Location,
    array: zarr.Array,
    name: str,
    positions: Positions | None = None,
) -> np.ndarray:
    """Read chunk by chunk so that damage is reported with the chunk that holds it."""
    check_present(path, array, name)  # first: a missing chunk would read as fill values
    out = np.empty(array.shape, dtype=array.dtype)
    step = array.chunks[0]
    for index, start in enumerate(range(0, array.shape[0], step)):
        out[start : start + step] = read_chunk(path, array, name, index, positions)
    return out


def load_soft_labels(path: str | Path | Location) -> SoftLabels:
    """Read a complete cache (a folder or an fsspec URL) into memory once, checksums
    verified on the way."""
    import torch

    path = Location(path)
    manifest, data = read_arrays(path)
    layout = manifest.layout
    return SoftLabels(
        path,
        manifest,
        {name: torch.from_numpy(data[name]) for name in layout.names},
        torch.from_numpy(data["labels"]),
        torch.from_numpy(data["indices"]),
        torch.from_numpy(data["views"]),
        torch.from_numpy(data["partners"]),
        {layer.array: torch.from_numpy(data[layer.array]) for layer in manifest.features},
    )


def read_arrays(path: str | Path | Location) -> tuple[Manifest, dict[str, np.ndarray]]:
    """Every array of a complete cache as numpy, each checked (checksums, finite values,
    shapes, positions): what :func:`load_soft_labels` wraps as tensors, and what a table
    that needs no torch (``kdpipe storage``) reads."""
    path = Location(path)
    manifest, arrays = open_complete(path)
    data = {name: read_array(path, arrays[name], name) for name in array_specs(manifest)}
    layout = manifest.layout
    values = data[layout.values_name]
    not_finite = np.flatnonzero(~np.isfinite(values).all(axis=(1, 2)))
    if len(not_finite):
        raise CacheError(
            f"{path}: NaN or Inf soft labels at row(s) {', '.join(map(str, not_finite[:10]))}"
        )
    for layer in manifest.features:
        bad = np.flatnonzero(~np.isfinite(data[layer.array].reshape(len(values), -1)).all(axis=1))
        if len(bad):
            raise CacheError(f"{path}: NaN or Inf in {layer.array} at row(s) "
                             f"{', '.join(map(str, bad[:10]))}")  # fmt: skip
    check_flagged(path, arrays)
    for name, (shape, _, _) in array_specs(manifest).items():
        if data[name].shape != shape:
            raise CacheError(
                f"{path}: array {name} has shape {data[name].shape}, the manifest says {shape}"
            )
    # last: the checks above name a specific problem; this one, that a chunk moved or changed
    read_positions(path, manifest, arrays).check_all(data, manifest.chunk_size)
    return manifest, data


def stored_teacher_accuracy(manifest: Manifest, arrays: dict) -> float | None:
    """Top-1 accuracy of the stored (combined) teacher over every view, from the stored
    values and labels: what the writer records as ``teacher_accuracy`` and ``verify``
    recomputes (a re-signed manifest could otherwise claim any figure).

    A mixed view counts as right when the teacher's top class is the label of the
    sample with the larger share of the mix.
    """
    step = manifest.chunk_size
    indices = arrays["indices"][:]
    labels = arrays["labels"][:]
    label_of = np.full(manifest.transfer["dataset_samples"], -1, dtype=np.int64)
    label_of[indices] = labels
    correct = total = 0
    for start in range(0, manifest.num_samples, step):
        top = manifest.layout.top1(
            {name: arrays[name][start : start + step] for name in manifest.layout.names}
        )
        lam = arrays["views"][start : start + step][..., VIEW_COLUMNS["lam"]]
        partners = arrays["partners"][start : start + step]
        own = labels[start : start + step, None]
        # a partner outside the labeled rows (never, for kdpipe's own caches) counts as -1
        partner_labels = np.where(partners >= 0, label_of[np.clip(partners, 0, None)], -1)
        target = np.where(lam >= 0.5, np.broadcast_to(own, top.shape), partner_labels)
        correct += int((top == target).sum())
        total += top.size
    return correct / total if total else None
