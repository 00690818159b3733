"""The detection student's loss: Ultralytics' own loss on the ground truth, plus a
distillation term against the teacher's head outputs (:class:`TeacherTargets`).

With ``teacher`` ``None`` (hard labels) the loss is Ultralytics' own criterion of the student
(``DetectionModel.init_criterion``: ``v8DetectionLoss``, or ``E2ELoss`` over it for an
end-to-end head), unchanged. With a teacher::

    loss = alpha * L_yolo + (1 - alpha) * B * (L_class + beta * L_box)

as classification weighs its hard-label term (``alpha`` 1: labels alone). ``B`` is the batch
size, the scale Ultralytics gives its own loss. For anchor ``a`` and class ``c``, with student
logits ``s``, teacher logits ``t``, ``q = sigmoid(t / T)`` (0 where the anchor is not stored:
background) and weights ``w_a = max_c q_ac``:

- ``L_class = T^2 * sum_a w_a sum_c KL(Bernoulli(q_ac) || Bernoulli(sigmoid(s_ac / T)))
  / max(sum_a w_a, 1)``: the BCE of the student's tempered class logits against the teacher's
  sigmoid (its gradient is BCE's), less the target's entropy, so that it is 0 when the
  student says what the teacher says. Score-weighted as in Ultralytics' and YOLOv6's
  distillation (Li et al. 2022, arXiv:2209.02976).
- ``L_box`` at the teacher's positive anchors (stored, ``max_c sigmoid(t_ac) > positive``,
  0.1 by default: a YOLO's class scores are trained towards its task-aligned targets, IoU
  times score, so they are rarely near 1; make detect's yolo11s teacher had 0.11 anchors per
  view above 0.5 and 3.69 above 0.1, for 2.50 objects per view, and 0.1 was chosen on the val
  split, docs/results.md),
  weighted by ``w_a`` and normalised by their sum: for DFL heads (reg_max > 1) the KL between
  the teacher's and the student's tempered box distributions, mean over the 4 sides, times
  ``T^2`` (LD, Zheng et al. 2022, arXiv:2102.12252); for a reg_max-1 student, L1 between its
  box values and the teacher's (a DFL teacher's as their expectations, the distances in
  stride units that Ultralytics decodes), mean over the 4 sides.

A student is compared with its teacher anchor by anchor, so anchors (strides and image
size), classes and, for DFL students, reg_max must be the teacher's; anything else is
refused with the reason (:func:`target_mismatch`). The functions do no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from kdpipe.base.checks import check_alpha, check_temperature
from kdpipe.base.errors import CacheMismatchError, UsageError
from kdpipe.tasks.detect.targets import DetectBatch, TeacherTargets
from kdpipe.tasks.detect.yolo import with_loss_settings


@dataclass(frozen=True, kw_only=True)
class DistillSettings:
    """How the distillation term is weighed (see the module docstring)."""

    alpha: float = 0.5  # weight of Ultralytics' loss; 1 - alpha the distillation term
    beta: float = 1.0  # weight of the box term beside the class term
    temperature: float = 2.0
    positive: float = 0.1  # teacher score above which an anchor's box is distilled

    def validate(self) -> None:
        check_alpha(self.alpha)
        check_temperature(self.temperature)
        if not self.beta >= 0:
            raise UsageError(f"the box term's weight (--beta) must be >= 0, not {self.beta}")
        if not 0 <= self.positive < 1:
            raise UsageError(f"the positive-anchor score (--positive) must be in [0, 1), "
                             f"not {self.positive}")  # fmt: skip


def anchors_of(strides: list[int] | tuple[int, ...], image_size: int) -> int:
    """Anchors of a square input: one per cell of each stride's grid."""
    return sum((image_size // s) ** 2 for s in strides)


def target_mismatch(student: dict[str, torch.Tensor], teacher: TeacherTargets) -> str | None:
    """Why the student's head outputs cannot be compared with ``teacher``'s, or None."""
    s_classes, s_anchors = student["scores"].shape[1:]
    t_classes, t_anchors = teacher.scores.shape[1:]
    s_reg = student["boxes"].shape[1] // 4
    if s_anchors != t_anchors:
        return (f"the student's head has {s_anchors} anchors but the teacher's targets have "
                f"{t_anchors}: anchors are one per grid cell of each stride, so the student "
                "needs the teacher's strides and image size")  # fmt: skip
    if s_classes != t_classes:
        return (f"the student predicts {s_classes} classes but the teacher's targets have "
                f"{t_classes}")  # fmt: skip
    if s_reg > 1 and s_reg != teacher.reg_max:
        return (f"the student's box head has reg_max {s_reg} but the teacher's has "
                f"{teacher.reg_max}: DFL distributions of different bins cannot be compared "
                "(a reg_max-1 student learns the teacher's decoded distances instead)")  # fmt: skip
    return None


def check_targets(student: dict[str, torch.Tensor], teacher: TeacherTargets) -> None:
    problem = target_mismatch(student, teacher)
    if problem is not None:
        raise CacheMismatchError(problem)


def _binary_kl(student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """KL(Bernoulli(target) || Bernoulli(sigmoid(student))) elementwise: BCE minus the
    target's entropy (0 at agreement; BCE's gradient)."""
    bce = F.binary_cross_entropy_with_logits(student, target, reduction="none")
    entropy = F.binary_cross_entropy(target, target, reduction="none")
    return bce - entropy


def class_term(scores: torch.Tensor, teacher: TeacherTargets, temperature: float) -> torch.Tensor:
    """``L_class`` for student class logits ``scores`` (B, nc, A)."""
    target = torch.sigmoid(teacher.scores / temperature) * teacher.stored[:, None]
    weight = target.amax(1)  # (B, A)
    kl = _binary_kl(scores.float() / temperature, target).sum(1)
    return temperature**2 * (weight * kl).sum() / weight.sum().clamp(min=1)


def box_term(
    boxes: torch.Tensor, teacher: TeacherTargets, temperature: float, positive: float
) -> torch.Tensor:
    """``L_box`` for student box outputs ``boxes`` (B, 4 * reg_max, A)."""
    b, channels, a = boxes.shape
    score = torch.sigmoid(teacher.scores).amax(1)
    chosen = teacher.stored & (score > positive)  # (B, A)
    weight = torch.sigmoid(teacher.scores / temperature).amax(1) * chosen
    reg = channels // 4
    t_reg = teacher.reg_max
    if reg > 1:
        student = F.log_softmax(boxes.float().view(b, 4, reg, a) / temperature, dim=2)
        target = F.softmax(teacher.boxes.view(b, 4, t_reg, a) / temperature, dim=2)
        side = (target * (target.clamp(min=1e-12).log() - student)).sum(2).mean(1)
        side = side * temperature**2
    else:
        if t_reg > 1:  # the teacher's expected distance per side, as Ultralytics decodes it
            bins = torch.arange(t_reg, dtype=torch.float32, device=boxes.device)
            wanted = (F.softmax(teacher.boxes.view(b, 4, t_reg, a), 2) * bins[:, None]).sum(2)
        else:
            wanted = teacher.boxes
        side = (boxes.float() - wanted).abs().mean(1)
    return (weight * side).sum() / weight.sum().clamp(min=1e-6)


def many_head(preds: object) -> dict[str, torch.Tensor]:
    """The one-to-many outputs of a training-mode forward (the only ones of a YOLO11 head)."""
    raw = preds[1] if isinstance(preds, tuple | list) else preds
    return raw["one2many"] if isinstance(raw, dict) and "one2many" in raw else raw


class StudentLoss:
    """The loss of one batch for ``model`` (a training-mode ``DetectionModel``): the total to
    back-propagate and its parts (Ultralytics' own ``box``/``cls``/``dfl`` and the
    distillation terms), as floats for ``metrics.csv``."""

    def __init__(self, model: torch.nn.Module, settings: DistillSettings | None = None) -> None:
        self.settings = settings or DistillSettings()
        self.settings.validate()
        self.criterion = with_loss_settings(model).init_criterion()

    def __call__(self, preds: object, batch: DetectBatch) -> tuple[torch.Tensor, dict]:
        device = batch.images.device
        labels = {k: v.to(device) for k, v in batch.ultralytics_batch().items()}
        summed, items = self.criterion(preds, labels)
        yolo = summed.sum()
        parts = {f"yolo_{k.removesuffix('_loss')}": float(v) for k, v in items.items()}
        if batch.teacher is None:
            return yolo, parts
        head, teacher, s = many_head(preds), batch.teacher.to(device), self.settings
        check_targets(head, teacher)
        kd_class = class_term(head["scores"], teacher, s.temperature)
        kd_box = box_term(head["boxes"], teacher, s.temperature, s.positive)
        size = batch.images.shape[0]
        total = s.alpha * yolo + (1 - s.alpha) * size * (kd_class + s.beta * kd_box)
        return total, {**parts, "kd_class": float(kd_class.detach()),
                       "kd_box": float(kd_box.detach())}  # fmt: skip

    def end_epoch(self) -> None:
        """An end-to-end head's one-to-many weight decays per epoch, as Ultralytics' trainer
        steps it (``E2ELoss.update``)."""
        if hasattr(self.criterion, "update"):
            self.criterion.update()
