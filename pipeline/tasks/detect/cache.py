"""A detection cache read for a student: stored views re-rendered, stored targets replayed.

``DetectionCache(path, data).batch(pairs)`` gives a :class:`DetectBatch` for ``(row, view)``
pairs: each view's pixels rendered again from its image and its seven stored parameters
(:func:`kdpipe.tasks.detect.views.render`, the renderer the teacher pass used), its stored
ground truth, and the teacher's stored head outputs as :class:`TeacherTargets` (a top-K
cache: its K anchors marked stored, every other anchor zeros and not stored). The cache is
checked once when opened (complete, array metadata, every progress flag, the data's
fingerprint: images and labels) and each chunk when it is first read (crc32c, its position
digest, finite values); a classification cache is refused with one line.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from kdpipe.base.errors import CacheError, CacheMismatchError
from kdpipe.cache import (
    DetectionManifest,
    Location,
    check_flagged,
    open_complete,
    read_array,
    read_chunk,
    read_positions,
)
from kdpipe.data.datasets import class_mismatch
from kdpipe.data.yolo import DetectionSplit, load_detection_split
from kdpipe.tasks.detect.targets import DetectBatch, TeacherTargets
from kdpipe.tasks.detect.views import read_image, render


def check_split(manifest: DetectionManifest, split: DetectionSplit, path: object) -> None:
    """The data a cache is read with must be the data it was made from: the same class
    names in the same order (checked first, as the fingerprint covers them too and would only
    say "other"), then the same images and labels (one line naming both fingerprints)."""
    if differ := class_mismatch(manifest.classes, split.data.names, f"the cache {path}",
                                str(split.data.yaml_file)):  # fmt: skip
        raise CacheMismatchError(differ)
    recorded, given = manifest.dataset["fingerprint"], split.fingerprint
    if recorded != given:
        raise CacheMismatchError(
            f"{path} was made from {manifest.dataset['name']} ({manifest.dataset['split']}: "
            f"{recorded.get('count')} images, sha256 {str(recorded.get('sha256'))[:16]}), but "
            f"the data given is {split.data.yaml_file} ({split.split}: {given['count']} images, "
            f"sha256 {given['sha256'][:16]}): other images or labels"
        )


class DetectionCache:
    """A complete detection cache and the data it was made from (``data``: a data YAML or
    a loaded split; default the data YAML the manifest names)."""

    def __init__(
        self, path: str | Path | Location, data: str | Path | DetectionSplit | None = None,
        *, memory: int | None = None,
    ) -> None:  # fmt: skip
        self.path = Location(path)
        self.manifest, self.arrays = open_complete(self.path, detection=True)
        if not isinstance(data, DetectionSplit):
            data = load_detection_split(data or self.manifest.dataset["name"],
                                        self.manifest.dataset["split"])  # fmt: skip
        check_split(self.manifest, data, self.path)
        self.split = data
        check_flagged(self.path, self.arrays)
        self.positions = read_positions(self.path, self.manifest, self.arrays)
        self.indices = read_array(self.path, self.arrays["indices"], "indices", self.positions)
        # decoded chunks, least recently read first: all of them (memory None, as classification
        # reads a cache whole), else as many as fit in ``memory`` bytes. A student draws rows at
        # random, so a cache of more chunks than are kept decodes about one chunk per row drawn
        self._chunks: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self.memory, self.decoded_bytes = memory, 0

    def __len__(self) -> int:
        return self.manifest.num_samples

    @property
    def num_views(self) -> int:
        return self.manifest.num_views

    def _chunk(self, name: str, index: int) -> np.ndarray:
        """Chunk ``index`` of ``name``, checked when it is decoded, kept while it fits."""
        key = (name, index)
        if key in self._chunks:
            self._chunks.move_to_end(key)
            return self._chunks[key]
        values = read_chunk(self.path, self.arrays[name], name, index, self.positions)
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            raise CacheError(f"{self.path}: NaN or Inf in chunk {index} of {name!r}")
        self._chunks[key] = values
        self.decoded_bytes += values.nbytes
        budget = self.memory
        while budget is not None and self.decoded_bytes > budget and len(self._chunks) > 1:
            self.decoded_bytes -= self._chunks.popitem(last=False)[1].nbytes
        return values

    def stored(self, name: str, row: int, view: int) -> np.ndarray:
        """The stored ``name`` of one row and view."""
        if not (0 <= row < len(self) and 0 <= view < self.num_views):
            raise IndexError(f"(row {row}, view {view}) is outside the cache's "
                             f"{len(self)} rows x {self.num_views} views")  # fmt: skip
        step = self.manifest.chunk_size
        return self._chunk(name, row // step)[row % step, view]

    def ground_truth(self, row: int, view: int) -> np.ndarray:
        """The view's stored boxes, ``(m, 5)`` class cx cy w h normalised to its canvas."""
        count = int(self.stored("gt_counts", row, view))
        return self.stored("gt_boxes", row, view)[:count]

    def render(self, row: int, view: int) -> np.ndarray:
        """The view's pixels, rendered again from its image and its stored parameters."""
        index = int(self.indices[row])
        image = read_image(self.split.paths[index])
        params = self.stored("views", row, view)
        canvas, _ = render(image, self.split.boxes[index], params, self.manifest.image_size)
        return canvas

    def targets(self, pairs: Sequence[tuple[int, int]]) -> TeacherTargets:
        """The teacher's stored outputs for ``pairs``, on every anchor."""
        m = self.manifest
        if m.top_k is None:
            scores = np.stack([self.stored("scores", r, v) for r, v in pairs])
            boxes = np.stack([self.stored("boxes", r, v) for r, v in pairs])
            stored = torch.ones(len(pairs), m.num_anchors, dtype=torch.bool)
            return TeacherTargets(torch.from_numpy(scores).float(),
                                  torch.from_numpy(boxes).float(), stored)  # fmt: skip
        scores = torch.zeros(len(pairs), m.num_classes, m.num_anchors)
        boxes = torch.zeros(len(pairs), m.box_channels, m.num_anchors)
        stored = torch.zeros(len(pairs), m.num_anchors, dtype=torch.bool)
        for i, (row, view) in enumerate(pairs):
            anchors = torch.from_numpy(self.stored("topk_anchors", row, view).astype(np.int64))
            scores[i][:, anchors] = torch.from_numpy(self.stored("topk_scores", row, view)).float()
            boxes[i][:, anchors] = torch.from_numpy(self.stored("topk_boxes", row, view)).float()
            stored[i, anchors] = True
        return TeacherTargets(scores, boxes, stored)

    def batch(self, pairs: Sequence[tuple[int, int]]) -> DetectBatch:
        """A student's batch for ``(row, view)`` pairs: re-rendered pixels, the stored ground
        truth, the teacher's stored outputs."""
        pairs = [(int(row), int(view)) for row, view in pairs]
        canvases = [self.render(row, view) for row, view in pairs]
        boxes = [self.ground_truth(row, view) for row, view in pairs]
        return DetectBatch.from_views(canvases, boxes, self.targets(pairs))
