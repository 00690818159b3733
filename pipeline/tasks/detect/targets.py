"""What a detection student trains on, batch by batch, whichever source made it.

Three sources give the same :class:`DetectBatch`: the cache (stored views re-rendered, the
teacher's stored head outputs), online distillation (views drawn and rendered, the teacher
run on them) and hard labels (views only, ``teacher`` is ``None``). The trainer sees only
this type, so the three arms of an experiment differ in where the targets come from and in
nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from kdpipe.base.errors import KdpipeError


@dataclass(frozen=True)
class TeacherTargets:
    """The teacher's raw head outputs on the pixels of one batch.

    ``scores`` (B, nc, A) class logits and ``boxes`` (B, 4 * reg_max, A) box logits (DFL
    distributions, or plain box values when reg_max is 1), anchors in Ultralytics' order;
    ``stored`` (B, A) says which anchors carry outputs: all of them for a dense cache or a
    teacher run online, the top-K by class score for a top-K cache. An anchor not stored is
    background: no object (its class targets are 0) and no box target.
    """

    scores: torch.Tensor
    boxes: torch.Tensor
    stored: torch.Tensor

    def __post_init__(self) -> None:
        b, _, a = self.scores.shape
        if self.boxes.ndim != 3 or (self.boxes.shape[0], self.boxes.shape[2]) != (b, a):
            raise KdpipeError(f"teacher boxes {tuple(self.boxes.shape)} do not match its "
                              f"scores {tuple(self.scores.shape)} (batch and anchors)")  # fmt: skip
        if self.boxes.shape[1] % 4:
            raise KdpipeError(f"teacher boxes have {self.boxes.shape[1]} channels, not 4 x reg_max")
        if tuple(self.stored.shape) != (b, a) or self.stored.dtype != torch.bool:
            raise KdpipeError(f"stored mask {tuple(self.stored.shape)} {self.stored.dtype} "
                              f"is not a ({b}, {a}) bool")  # fmt: skip

    @classmethod
    def from_head(cls, outputs: dict[str, torch.Tensor]) -> TeacherTargets:
        """Targets from :func:`kdpipe.tasks.detect.yolo.head_outputs` (every anchor known)."""
        scores = outputs["scores"].float()
        stored = torch.ones(scores.shape[0], scores.shape[2], dtype=torch.bool,
                            device=scores.device)  # fmt: skip
        return cls(scores=scores, boxes=outputs["boxes"].float(), stored=stored)

    @property
    def reg_max(self) -> int:
        return self.boxes.shape[1] // 4

    def to(self, device: torch.device | str) -> TeacherTargets:
        return TeacherTargets(self.scores.to(device), self.boxes.to(device), self.stored.to(device))


@dataclass(frozen=True)
class DetectBatch:
    """One batch: ``images`` (B, 3, S, S) float in [0, 1] (the rendered views), their ground
    truth in Ultralytics' batch keys (``batch_idx`` (n,), ``cls`` (n, 1), ``bboxes`` (n, 4)
    cx cy w h normalised to the canvas), and the teacher's targets (``None``: hard labels)."""

    images: torch.Tensor
    batch_idx: torch.Tensor
    cls: torch.Tensor
    bboxes: torch.Tensor
    teacher: TeacherTargets | None = None

    @classmethod
    def from_views(
        cls, canvases: list[np.ndarray], boxes: list[np.ndarray],
        teacher: TeacherTargets | None = None,
    ) -> DetectBatch:  # fmt: skip
        """A batch from rendered ``(S, S, 3)`` uint8 canvases and their ``(m, 5)`` boxes
        (class cx cy w h), as :func:`kdpipe.tasks.detect.views.render` returns them."""
        images = torch.from_numpy(np.stack(canvases)).permute(0, 3, 1, 2).float() / 255
        index = np.concatenate([np.full(len(b), i, np.float32) for i, b in enumerate(boxes)])
        table = np.concatenate([np.asarray(b, np.float32).reshape(-1, 5) for b in boxes])
        return cls(images=images.contiguous(), batch_idx=torch.from_numpy(index),
                   cls=torch.from_numpy(table[:, :1].copy()),
                   bboxes=torch.from_numpy(table[:, 1:].copy()), teacher=teacher)  # fmt: skip

    def ultralytics_batch(self) -> dict[str, torch.Tensor]:
        """The dict Ultralytics' ``v8DetectionLoss`` reads."""
        return {"batch_idx": self.batch_idx, "cls": self.cls, "bboxes": self.bboxes}
