"""Training from a cache larger than memory: whole chunks read on demand, in windows.

A cache whose decoded size exceeds ``--cache-memory`` is not read whole. Its
per-row arrays (labels, dataset indices: 16 bytes a row) are; its per-view
arrays (soft labels, view parameters, partners) are read a chunk at a time,
the chunk being the unit zarr stores, checksums and decompresses. An epoch
visits the chunks in a shuffled order, a window of ``W`` chunks at a time, and
the rows of a window in a shuffled order (:func:`windowed_order`): every row
once per epoch. Two windows are held in slot buffers and the next one is read
ahead in a thread, so ``W`` is the largest window for which three fit in the
budget.

Rows drawn at random from the whole cache would decode a whole chunk for a
few rows each, about a full read of the cache per batch; whole chunks in a
shuffled order cost one full read per epoch.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import zarr
from kdpipe.base.errors import CacheError, UsageError
from kdpipe.cache.format import Manifest, array_specs
from kdpipe.cache.location import Location
from kdpipe.cache.store import (
    Positions,
    SoftLabels,
    check_flagged,
    check_present,
    check_temperature,
    load_soft_labels,
    open_complete,
    read_array,
    read_chunk,
    read_manifest,
    read_positions,
    to_log_probs,
)

if TYPE_CHECKING:  # for annotations: imported where they are used, so that a command
    # that reads records only loads no deep-learning library
    import torch

PER_VIEW = ("targets", "views", "partners")


def decoded_bytes_per_row(manifest: Manifest) -> int:
    """Memory one row takes once read for training: float32 log-probabilities for every
    class, the view parameters (10 float32) and the partner (int64) of each view."""
    return manifest.num_views * (manifest.num_classes * 4 + 10 * 4 + 8)


def human_bytes(size: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"


def smallest_budget(manifest: Manifest) -> int:
    """The least ``--cache-memory`` that streams: three chunks decoded (the window being
    trained on, the one before it and the one read ahead, of one chunk each)."""
    return 3 * manifest.chunk_size * decoded_bytes_per_row(manifest)


def decoded_bytes(manifest: Manifest) -> int:
    return manifest.num_samples * (decoded_bytes_per_row(manifest) + 16)


class ChunkReader:
    """Reads whole chunks of a complete cache's per-view arrays, verified, on demand, and
    reads the next window ahead in a thread while the current one is trained on.

    An array no one asks for (the view parameters of a cache without views) is never
    read. Each array read has a buffer of ``2 * window`` chunk slots (the window being
    trained on and the one before or after it), filled least recently used first, so
    that a batch is one gather from the buffer whatever chunks its rows live in; the
    window read ahead waits outside the buffer. Memory: at most three windows of
    chunks per array read, which is what the budget is divided by.
    """

    def __init__(
        self,
        path: Location,
        manifest: Manifest,
        arrays: dict[str, zarr.Array],
        window: int,
        temperature: float | None,
        positions: Positions,
    ) -> None:
        import torch

        self.path, self.manifest, self.arrays = path, manifest, arrays
        self.positions = positions
        self.window, self.capacity = window, 2 * window
        self.temperature = temperature
        num_chunks = -(-manifest.num_samples // manifest.chunk_size)
        self.buffers: dict[str, dict[str, torch.Tensor]] = {}  # name: its stored arrays
        self.slot_of = {name: torch.full((num_chunks,), -1) for name in PER_VIEW}
        self.used: dict[str, OrderedDict[int, int]] = {n: OrderedDict() for n in PER_VIEW}
        self.ahead: dict[str, dict[int, Future]] = {name: {} for name in PER_VIEW}
        self.plan: list[int] = []  # the epoch's chunks in the order it reaches them
        self.chunks_read = self.chunks_ahead = self.peak_bytes = 0  # chunks_ahead: read ahead
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = 0

    @property
    def chunk_size(self) -> int:
        return self.manifest.chunk_size

    def gather(self, name: str, rows: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        """``array[rows, views]`` for cache rows ``rows``: their chunks made resident (read
        ahead if they were planned), then one gather from the slots."""
        step = self.chunk_size
        chunks = rows // step
        needed = chunks.unique().tolist()
        slot_of = self.slot_of[name]
        for index in needed:
            if int(slot_of[index]) < 0:
                self._load(name, index, keep=needed)
            self.used[name].move_to_end(index)
        at = slot_of[chunks] * step + rows - chunks * step
        parts = {part: buffer[at, views] for part, buffer in self.buffers[name].items()}
        if name != "targets":
            return parts[name]
        # the stored form (top-K values and classes, or float16) decoded for these rows and
        # views only: a window of a top-10 cache of 1000 classes and 8 views held dense
        # would be 400 times its stored size, and decoding it whole cost 8 views per row
        return to_log_probs(parts, self.manifest, self.temperature, self.path)

    def _load(self, name: str, index: int, keep: list[int]) -> None:
        import torch

        self._executor()  # in a forked DataLoader worker: drop the parent's reads in flight
        pending = self.ahead[name].pop(index, None)
        self.chunks_ahead += pending is not None
        parts = pending.result() if pending is not None else self._read(name, index)
        length = len(next(iter(parts.values())))
        if name not in self.buffers:
            self.buffers[name] = {
                part: torch.empty((self.capacity * self.chunk_size, *values.shape[1:]),
                                  dtype=values.dtype)
                for part, values in parts.items()
            }  # fmt: skip
        buffers = self.buffers[name]
        used, slot_of = self.used[name], self.slot_of[name]
        victim = next((chunk for chunk in used if chunk not in keep), None)
        if len(used) < len(next(iter(buffers.values()))) // self.chunk_size:
            slot = len(used)
        elif victim is not None:  # the least recently used chunk this batch does not need
            slot = used.pop(victim)
            slot_of[victim] = -1
        else:  # one batch spans more chunks than the slots: one more slot, over budget
            for part, buffer in buffers.items():
                buffers[part] = torch.cat([buffer, torch.empty_like(buffer[: self.chunk_size])])
            slot = len(used)
        start = slot * self.chunk_size
        for part, values in parts.items():
            buffers[part][start : start + length] = values
        used[index] = slot
        slot_of[index] = slot
        self._read_ahead(name, index)

    def _read_ahead(self, name: str, index: int) -> None:
        """Start reading the window that follows chunk ``index`` in the plan."""
        if index not in self.plan:
            return
        position = self.plan.index(index)
        upcoming = self.plan[position + 1 : position + 1 + self.window]
        pool = self._executor()
        for chunk in upcoming:
            if int(self.slot_of[name][chunk]) < 0 and chunk not in self.ahead[name]:
                self.ahead[name][chunk] = pool.submit(self._read, name, chunk)
        self._account()

    def _executor(self) -> ThreadPoolExecutor:
        # one per process: a DataLoader worker forked from this one has no threads
        if self._pool is None or self._pool_pid != os.getpid():
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdpipe-reader")
            self._pool_pid = os.getpid()
            self.ahead = {name: {} for name in PER_VIEW}
        return self._pool

    def _account(self) -> None:
        row_bytes = {
            name: sum(b[0].element_size() * b[0].nelement() for b in parts.values())
            for name, parts in self.buffers.items()
        }
        total = sum(b.element_size() * b.nelement()
                    for parts in self.buffers.values() for b in parts.values())  # fmt: skip
        total += sum(len(self.ahead[name]) * self.chunk_size * size
                     for name, size in row_bytes.items())  # fmt: skip
        self.peak_bytes = max(self.peak_bytes, total)

    def _array(self, name: str, index: int) -> np.ndarray:
        return read_chunk(self.path, self.arrays[name], name, index)

    def _read(self, name: str, index: int) -> dict[str, torch.Tensor]:
        """Chunk ``index`` of ``name``, checked, as its stored arrays (the soft labels stay
        in the layout's stored form: :meth:`gather` decodes the rows it returns)."""
        import torch

        self.chunks_read += 1
        if name != "targets":
            values = self._array(name, index)
            self.positions.check(name, index, values, f"chunk {index}")
            return {name: torch.from_numpy(values)}
        stored = {
            name: torch.from_numpy(self._array(name, index)) for name in self.manifest.layout.names
        }
        values = stored[self.manifest.layout.values_name]
        if not torch.isfinite(values).all():
            raise CacheError(f"{self.path}: NaN or Inf soft labels in chunk {index}")
        for layout_name, array in stored.items():  # after the check that names the problem
            self.positions.check(layout_name, index, array.numpy(), f"chunk {index}")
        return stored


class StreamedRows:
    """One per-view array of a cache (``targets``, ``views`` or ``partners``) at the rows
    ``rows``, indexed like the tensor it stands for: ``a[positions, views]`` reads the
    chunks it needs, ``a[mask]`` keeps some rows."""

    def __init__(self, reader: ChunkReader, name: str, rows: torch.Tensor) -> None:
        if name not in PER_VIEW:
            raise ValueError(f"{name!r} is not one of {PER_VIEW}")
        self.reader, self.name, self.rows = reader, name, rows

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, ...]:
        manifest = self.reader.manifest
        tail = {"targets": (manifest.num_classes,), "views": (10,), "partners": ()}[self.name]
        return (len(self.rows), manifest.num_views, *tail)

    def __getitem__(self, key: object) -> StreamedRows | torch.Tensor:
        import torch

        if isinstance(key, torch.Tensor) and key.dtype == torch.bool:
            return StreamedRows(self.reader, self.name, self.rows[key])
        if not isinstance(key, tuple) or len(key) != 2:
            raise TypeError("index a streamed cache array as [positions, views] or [mask]")
        positions, views = key
        rows = self.rows[positions]
        if not len(rows):
            return torch.empty((0, *self.shape[2:]))
        return self.reader.gather(self.name, rows, torch.as_tensor(views).expand(len(rows)))


def windowed_order(
    rows: torch.Tensor, chunk_size: int, window: int, seed: int, epoch: int
) -> torch.Tensor:
    """A permutation of ``range(len(rows))``: chunks in a random order, ``window`` at a time,
    the positions of a window's rows in a random order. ``rows[p]`` is the cache row of
    training position ``p``; the draws depend on (seed, epoch) alone."""
    import torch

    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    chunks = rows // chunk_size
    num_chunks = int(chunks.max()) + 1 if len(rows) else 0
    rank = torch.empty(num_chunks, dtype=torch.long)
    rank[torch.randperm(num_chunks, generator=generator)] = torch.arange(num_chunks)
    windows = (rank[chunks] // window).double()
    return torch.argsort(windows + torch.rand(len(rows), generator=generator, dtype=torch.float64))


def chunk_plan(rows: torch.Tensor, order: torch.Tensor, chunk_size: int) -> list[int]:
    """The chunks of an epoch in the order its rows first reach them."""
    import torch

    chunks = rows[order] // chunk_size
    first = torch.full((int(chunks.max()) + 1,), len(chunks), dtype=torch.long)
    first.scatter_reduce_(0, chunks, torch.arange(len(chunks)), reduce="amin")
    reached = first < len(chunks)
    return torch.arange(len(first))[reached][torch.argsort(first[reached])].tolist()


class StreamedSoftLabels:
    """A complete cache opened for streaming: what :class:`SoftLabels` offers to training,
    with the per-view arrays read chunk by chunk."""

    def __init__(self, path: str | Path | Location, memory: int) -> None:
        import torch

        self.path = Location(path)
        self.manifest, self.arrays = open_complete(self.path)
        manifest = self.manifest
        smallest = smallest_budget(manifest)
        if memory < smallest:
            raise UsageError(
                f"--cache-memory {memory} bytes is less than three chunks of {self.path} "
                f"({smallest} bytes decoded): raise it, or cache again with a smaller "
                "--chunk-size"
            )
        window = memory // smallest  # two resident windows and one read ahead
        self.window = window
        positions = read_positions(self.path, manifest, self.arrays)
        self.labels = torch.from_numpy(
            read_array(self.path, self.arrays["labels"], "labels", positions)
        )
        self.indices = torch.from_numpy(
            read_array(self.path, self.arrays["indices"], "indices", positions)
        )
        check_flagged(self.path, self.arrays)
        for name in array_specs(manifest):
            check_present(self.path, self.arrays[name], name)
        self.reader = ChunkReader(self.path, manifest, self.arrays, window, None, positions)
        every = torch.arange(manifest.num_samples)
        self.views = StreamedRows(self.reader, "views", every)
        self.partners = StreamedRows(self.reader, "partners", every)

    @property
    def has_views(self) -> bool:
        return self.manifest.has_views

    def log_probs(self, temperature: float | None = None) -> StreamedRows:
        """Soft labels at ``temperature``, converted chunk by chunk as they are read."""
        import torch

        check_temperature(self.manifest, temperature, self.path)  # before training starts
        self.reader.temperature = temperature
        return StreamedRows(self.reader, "targets", torch.arange(self.manifest.num_samples))


def open_soft_labels(
    path: str | Path | Location, memory: int | None, log: Callable[[str], None]
) -> SoftLabels | StreamedSoftLabels:
    """The cache read whole when it fits ``memory`` bytes decoded (or no budget is set),
    else opened for streaming."""
    if memory is None:
        return load_soft_labels(path)
    size = decoded_bytes(read_manifest(path))
    if size <= memory:
        return load_soft_labels(path)
    streamed = StreamedSoftLabels(path, memory)
    log(
        f"{path}: {human_bytes(size)} decoded is more than --cache-memory "
        f"{human_bytes(memory)}: streaming it, {streamed.window} chunk(s) of "
        f"{streamed.manifest.chunk_size} rows per shuffle window"
    )
    return streamed
