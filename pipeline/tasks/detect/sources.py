"""Two of the three sources of :class:`DetectBatch`: hard labels and online distillation.

Both draw V views per training image once (:func:`kdpipe.tasks.detect.views.draw_views`,
view 0 the plain letterbox) and, in epoch ``e``, give each row the view
``views.policy.view_schedule`` picks for it (the schedule classification's cache uses, so
V consecutive epochs use every view once), rows in an order drawn from the seed and the
epoch. The views are rendered by :func:`kdpipe.tasks.detect.views.render`, the same pixels
and boxes a cache stores and replays. Hard labels end there (``teacher`` None); online
distillation runs the teacher on the rendered batch (:func:`yolo.head_outputs`), which is
the cost a cache pays once.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from kdpipe.data.imagefolder import decode_image
from kdpipe.data.yolo import DetectionSplit
from kdpipe.tasks.detect.targets import DetectBatch, TeacherTargets
from kdpipe.tasks.detect.views import PLAIN_VIEW, DetectAugment, draw_views, render
from kdpipe.tasks.detect.yolo import head_outputs
from kdpipe.views.policy import view_schedule


def read_image(path: str) -> np.ndarray:
    """An image file as RGB uint8 ``(H, W, 3)`` at its own size (EXIF orientation applied,
    16-bit and palette images to 8-bit RGB, alpha on white: the image folders' decoder)."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as opened:
            width, height = ImageOps.exif_transpose(opened).size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        width = height = 1  # decode_image names the file and its fault
    return decode_image(path, 3, (height, width)).transpose(1, 2, 0)


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
    seed: int
    augment: DetectAugment = field(default_factory=DetectAugment)

    def __post_init__(self) -> None:
        table = draw_views(np.arange(len(self.split)), self.views, self.seed, self.augment)
        object.__setattr__(self, "table", table)

    def epoch(self, epoch: int) -> Iterator[DetectBatch]:
        """Epoch ``epoch`` (1-based): every row once, in its view of that epoch."""
        order = np.random.default_rng((self.seed, epoch)).permutation(len(self.split))
        chosen = view_schedule(len(self.split), self.views, self.seed, epoch).numpy()
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
