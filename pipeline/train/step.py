"""One training step's forward pass and loss, as a task in timm's shape.

A task takes a batch (from :meth:`pipeline.train.batches.TrainData.to_model`) and
returns ``{loss, output, task_loss, kd_loss}``, as ``timm.task`` tasks do: the
loss to backpropagate, the student's float32 logits, the hard-label term (CE) and
the soft term (KL, before its T² and 1 − α weights), either None where it does not
apply. The loop around it is the same for every kind of run:

- :class:`CachedDistillation`: the soft targets are the cache's (or none: a
  teacher or a hard-label baseline), :func:`pipeline.losses.distillation_loss`;
- :class:`OnlineDistillation`: timm's own ``LogitDistillationTask`` runs the
  teacher on every batch, the reference that a cache is measured against.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from pipeline.losses import distillation_loss

StepOutput = dict[str, torch.Tensor | None]


class CachedDistillation:
    """α·CE + (1−α)·T²·KL against stored soft targets; CE alone where there are none."""

    def __init__(
        self,
        model: nn.Module,
        *,
        alpha: float,
        temperature: float,
        amp: contextlib.AbstractContextManager,
    ) -> None:
        self.model, self.alpha, self.temperature, self.amp = model, alpha, temperature, amp

    def train(self) -> None:
        self.model.train()

    def __call__(self, batch: dict[str, torch.Tensor | None]) -> StepOutput:
        with self.amp:
            logits = self.model(batch["inputs"])
        logits = logits.float()  # the loss in float32, whatever the forward's precision
        terms = distillation_loss(
            logits,
            batch["labels"],
            batch["targets"],
            alpha=self.alpha,
            temperature=self.temperature,
            partner_labels=batch["partner_labels"],
            lam=batch["lam"],
        )
        return {
            "loss": terms["loss"],
            "output": logits,
            "task_loss": terms.get("hard"),
            "kd_loss": terms.get("soft"),
        }


class OnlineDistillation:
    """timm's ``LogitDistillationTask``: the teacher runs on every batch. Hard targets go
    in as (mixed) one-hot distributions, so one criterion serves plain and mixed batches."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        *,
        alpha: float,
        temperature: float,
        device: torch.device,
        amp: contextlib.AbstractContextManager,
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
        self.student, self.temperature, self.amp = student, temperature, amp

    def train(self) -> None:
        self.student.train()
        self.task.train()

    def __call__(self, batch: dict[str, torch.Tensor | None]) -> StepOutput:
        with self.amp:
            output = self.task(batch["inputs"], soft_one_hot(batch, self.student.num_classes))
        return {
            "loss": output["loss"].float(),
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
