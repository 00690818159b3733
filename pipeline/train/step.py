"""One training step's forward pass and loss, as a task in timm's shape.

A task takes a batch (from :meth:`kdpipe.train.batches.TrainData.to_model`) and
returns ``{loss, output, task_loss, kd_loss}``, as ``timm.task`` tasks do: the
loss to backpropagate, the student's float32 logits, the hard-label term (CE) and
the soft term (KL, before its T² and 1 − α weights), either None where it does not
apply. The loop around it is the same for every kind of run:

- :class:`CachedDistillation`: the soft targets are the cache's (or none: a
  teacher or a hard-label baseline), :func:`kdpipe.tasks.classify.loss.distillation_loss`;
  with a :class:`FeatureTerm` (``--feature-loss``), β times a loss between a student
  layer, through a learned projector, and the teacher's layer cached for the same view;
- :class:`OnlineDistillation`: timm's own ``LogitDistillationTask`` runs the
  teacher on every batch, the reference that a cache is measured against; with a
  :class:`FeatureTerm`, the teacher's layer is tapped in that forward.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from kdpipe.base.errors import UsageError
from kdpipe.cache import CachedLayer
from kdpipe.tasks.classify.loss import attention_transfer_loss, distillation_loss, feature_loss
from kdpipe.train.config import TrainConfig
from kdpipe.views.features import LayerRequest, LayerTaps, attention_map, resolve_layer
from torch import nn

StepOutput = dict[str, torch.Tensor | None]


class FeatureTerm(nn.Module):
    """β · feature loss: the student's layer, tapped in the step's own forward, mapped by a
    learned projector (1x1 convolution for a spatial map, linear for a vector; none for
    attention maps, which have no channels) to the teacher's cached layer.

    The projector trains with the student (:class:`Trainee`) and is never part of the
    saved model: it exists only to make the two layers comparable.
    """

    def __init__(self, student_layer: str, teacher: CachedLayer, loss: str, weight: float,
                 projector: nn.Module | None) -> None:  # fmt: skip
        super().__init__()
        self.request = LayerRequest(student_layer, "features")
        self.teacher, self.loss, self.weight = teacher, loss, weight
        self.projector = projector

    @classmethod
    def build(cls, model: nn.Module, config: TrainConfig, teacher: CachedLayer) -> FeatureTerm:
        """The term for ``model``'s ``--student-layer`` against ``teacher``: the layer's
        shape probed by one forward pass of a blank input; a layer of a rank the teacher's
        cannot be compared with is one clear line."""
        who = f"student {config.model}"
        name = resolve_layer(model, config.student_layer, who)
        shape = probe(model, LayerRequest(name, "features"), model.pretrained_cfg["input_size"])
        target = tuple(teacher.shape)
        spatial, wanted = len(shape) == 3, len(target) == 3 or config.feature_loss == "attention"
        if config.feature_loss == "attention":
            side = math.isqrt(target[0])
            if not spatial or side * side != target[0]:
                raise UsageError(f"{who} layer {name} outputs {shape}: attention transfer needs "
                                 f"a spatial map (C, H, W) and a square teacher map "
                                 f"({teacher.name}: {target[0]} numbers)")  # fmt: skip
            return cls(name, teacher, config.feature_loss, config.feature_weight, None)
        if spatial != wanted or len(shape) != len(target) or len(shape) not in (1, 3):
            raise UsageError(f"{who} layer {name} outputs {shape}, teacher layer {teacher.name} "
                             f"{target}: a projector maps a spatial map (C, H, W) to a spatial "
                             "map, a vector (D,) to a vector, not one rank to another")  # fmt: skip
        projector = (nn.Conv2d(shape[0], target[0], 1) if spatial
                     else nn.Linear(shape[0], target[0]))  # fmt: skip
        return cls(name, teacher, config.feature_loss, config.feature_weight, projector)

    def forward(self, student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The unweighted feature loss of a batch: the student layer's output (its raw
        batch output) against the teacher's cached values."""
        student = student.float()
        if self.loss == "attention":
            side = math.isqrt(self.teacher.shape[0])
            return attention_transfer_loss(attention_map(student, side), target)
        if student.dim() == 4:  # to the teacher's grid, then the teacher's channels
            student = F.adaptive_avg_pool2d(student, tuple(self.teacher.shape[1:]))
        return feature_loss(self.loss, self.projector(student), target)


def probe(model: nn.Module, request: LayerRequest, input_size: Sequence[int]) -> tuple[int, ...]:
    """The per-sample shape of ``request``'s output as its taps give it (the layer's own, or
    its attention map), from one blank forward pass of ``input_size``."""
    blank = torch.zeros(1, *input_size, device=next(model.parameters()).device)
    was_training = model.training
    with torch.no_grad(), LayerTaps(model.eval(), [request]) as taps:
        model(blank)
        shape = tuple(taps.outputs()[request.array].shape[1:])
    model.train(was_training)
    return shape


class Trainee(nn.Module):
    """What the optimizer and the checkpoints hold: the student and the feature term's
    projector. Only ``student`` is saved as the run's model."""

    def __init__(self, student: nn.Module, term: FeatureTerm) -> None:
        super().__init__()
        self.student, self.term = student, term


class CachedDistillation:
    """α·CE + (1−α)·T²·KL against stored soft targets; CE alone where there are none; plus
    β times the feature loss with ``feature``. ``standardize``: the soft term on z-scored
    logits (Sun et al. 2024, ``--logit-standardize``)."""

    def __init__(
        self,
        model: nn.Module,
        *,
        alpha: float,
        temperature: float,
        amp: contextlib.AbstractContextManager,
        feature: FeatureTerm | None = None,
        standardize: bool = False,
    ) -> None:
        self.model, self.alpha, self.temperature, self.amp = model, alpha, temperature, amp
        self.feature, self.standardize = feature, standardize

    def train(self) -> None:
        self.model.train()
        if self.feature is not None:
            self.feature.train()

    def __call__(self, batch: dict[str, torch.Tensor | None]) -> StepOutput:
        taps = contextlib.nullcontext()
        if self.feature is not None:  # the student's layer, from this very forward pass
            taps = LayerTaps(self.model, [self.feature.request])
        with self.amp, taps:
            logits = self.model(batch["inputs"])
            tapped = taps.captured[self.feature.request.name] if self.feature else None
        logits = logits.float()  # the loss in float32, whatever the forward's precision
        terms = distillation_loss(
            logits,
            batch["labels"],
            batch["targets"],
            alpha=self.alpha,
            temperature=self.temperature,
            partner_labels=batch["partner_labels"],
            lam=batch["lam"],
            standardize=self.standardize,
        )
        loss = terms["loss"]
        if self.feature is not None:
            loss = loss + self.feature.weight * self.feature(tapped, batch["layer_targets"])
        return {
            "loss": loss,
            "output": logits,
            "task_loss": terms.get("hard"),
            "kd_loss": terms.get("soft"),
        }


class OnlineDistillation:
    """timm's ``LogitDistillationTask``: the teacher runs on every batch. Hard targets go
    in as (mixed) one-hot distributions, so one criterion serves plain and mixed batches.

    With ``feature``, the teacher's layer is tapped in that same teacher forward and the
    student's in the student's: the cached feature term, paid for at every step."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        *,
        alpha: float,
        temperature: float,
        device: torch.device,
        amp: contextlib.AbstractContextManager,
        feature: FeatureTerm | None = None,
    ) -> None:
        from timm.loss import SoftTargetCrossEntropy
        from timm.task import LogitDistillationTask
        from timm.task.distillation import DistillationTeacher

        self.task = LogitDistillationTask(
            student,
            DistillationTeacher(teacher, device=device),
            criterion=SoftTargetCrossEntropy(),
            task_loss_weight=alpha,
            temperature=temperature,
            device=device,
            verbose=False,
        )
        self.student, self.teacher = student, teacher
        self.temperature, self.amp, self.feature = temperature, amp, feature
        # the teacher's layer, tapped as a cache would have stored it (never pooled online)
        layer = None if feature is None else feature.teacher
        self.teacher_request = None if layer is None else LayerRequest(layer.name, layer.kind)

    def train(self) -> None:
        self.student.train()
        self.task.train()
        if self.feature is not None:
            self.feature.train()

    def __call__(self, batch: dict[str, torch.Tensor | None]) -> StepOutput:
        student_taps = teacher_taps = contextlib.nullcontext()
        if self.feature is not None:
            student_taps = LayerTaps(self.student, [self.feature.request])
            teacher_taps = LayerTaps(self.teacher, [self.teacher_request])
        with self.amp, student_taps, teacher_taps:
            output = self.task(batch["inputs"], soft_one_hot(batch, self.student.num_classes))
        loss = output["loss"].float()
        if self.feature is not None:
            tapped = student_taps.captured[self.feature.request.name]
            target = teacher_taps.outputs()[self.teacher_request.array].detach()
            loss = loss + self.feature.weight * self.feature(tapped, target)
        return {
            "loss": loss,
            "output": output["output"].float(),
            "task_loss": output["task_loss"].float(),
            # timm's kd_loss carries the T² factor; kdpipe reports the KL before it
            "kd_loss": output["kd_loss"].float() / self.temperature**2,
        }


def soft_one_hot(batch: dict[str, torch.Tensor | None], num_classes: int) -> torch.Tensor:
    """Labels as distributions: one-hot, or the mix of a sample's and its partner's."""
    target = torch.nn.functional.one_hot(batch["labels"], num_classes).float()
    if batch["lam"] is None:
        return target
    lam = batch["lam"][:, None]
    partner = torch.nn.functional.one_hot(batch["partner_labels"], num_classes).float()
    return lam * target + (1 - lam) * partner
