"""The three sources of :class:`DetectBatch`: hard labels, online distillation, a cache.

The first two draw V views per training image once (:func:`kdpipe.tasks.detect.views.draw_views`,
view 0 the plain letterbox, parameters from the view seed: the run's seed unless told) and,
in epoch ``e``, give each row the view ``views.policy.view_schedule`` picks for it (the
schedule classification's cache uses, so V consecutive epochs use every view once), rows in
an order drawn from the seed and the epoch. The views are rendered by
:func:`kdpipe.tasks.detect.views.render`, the same pixels and boxes a cache stores and
replays. Hard labels end there (``teacher`` None); online distillation runs the teacher on
the rendered batch (:func:`yolo.head_outputs`), which is the cost a cache pays once.
:class:`CachedBatches` replays a cache's stored views (drawn by the teacher pass from the
cache's seed) with the same schedule and the same order of rows: a cached student sees the
pixels of a hard-label or online student of its seed whose view seed is the cache's, and
its teacher's outputs, read instead of computed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from kdpipe.data.yolo import DetectionSplit
from kdpipe.tasks.detect.cache import DetectionCache
from kdpipe.tasks.detect.targets import DetectBatch, TeacherTargets
from kdpipe.tasks.detect.views import PLAIN_VIEW, DetectAugment, draw_views, read_image, render
from kdpipe.tasks.detect.yolo import head_outputs
from kdpipe.views.policy import view_schedule


def epoch_order(
    num_rows: int, num_views: int, seed: int, epoch: int
) -> tuple[np.ndarray, np.ndarray]:
    """Epoch ``epoch``'s order of rows and each row's view: the same for every source."""
    order = np.random.default_rng((seed, epoch)).permutation(num_rows)
    return order, view_schedule(num_rows, num_views, seed, epoch).numpy()


def plain_views(split: DetectionSplit, rows: np.ndarray, size: int) -> DetectBatch:
    """Rows of a split in view 0 (the letterbox), as evaluation and calibration see them."""
    rendered = [render(read_image(split.paths[r]), split.boxes[r], PLAIN_VIEW, size)
                for r in rows]  # fmt: skip
    return DetectBatch.from_views([c for c, _ in rendered], [b for _, b in rendered])


@dataclass(frozen=True)
class ViewBatches:
    """The hard-label source: a split's rows in their scheduled views, batch by batch."""

    split: DetectionSplit
    size: int
    batch_size: int
    views: int
    seed: int  # the order of rows and each epoch's view
    augment: DetectAugment = field(default_factory=DetectAugment)
    view_seed: int | None = None  # the views' parameters (None: seed)

    def __post_init__(self) -> None:
        seed = self.seed if self.view_seed is None else self.view_seed
        table = draw_views(np.arange(len(self.split)), self.views, seed, self.augment)
        object.__setattr__(self, "table", table)

    def epoch(self, epoch: int) -> Iterator[DetectBatch]:
        """Epoch ``epoch`` (1-based): every row once, in its view of that epoch."""
        order, chosen = epoch_order(len(self.split), self.views, self.seed, epoch)
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            rendered = [render(read_image(self.split.paths[r]), self.split.boxes[r],
                               self.table[r, chosen[r]], self.size) for r in rows]  # fmt: skip
            yield DetectBatch.from_views([c for c, _ in rendered], [b for _, b in rendered])


@dataclass(frozen=True)
class OnlineBatches:
    """The online source: the hard-label batches with the teacher run on each one."""

    views: ViewBatches
    teacher: torch.nn.Module  # an eval-mode DetectionModel
    device: torch.device

    def epoch(self, epoch: int) -> Iterator[DetectBatch]:
        for batch in self.views.epoch(epoch):
            with torch.no_grad():
                outputs = head_outputs(self.teacher, batch.images.to(self.device))
            yield replace(batch, teacher=TeacherTargets.from_head(outputs))


@dataclass(frozen=True)
class CachedBatches:
    """The cached source: a detection cache's rows in their scheduled stored views, each
    batch re-rendered and paired with the teacher's stored outputs (the teacher not run)."""

    cache: DetectionCache
    batch_size: int
    seed: int

    def epoch(self, epoch: int) -> Iterator[DetectBatch]:
        """Epoch ``epoch`` (1-based): every cached row once, in its stored view of that epoch."""
        order, chosen = epoch_order(len(self.cache), self.cache.num_views, self.seed, epoch)
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            yield self.cache.batch([(row, chosen[row]) for row in rows])
