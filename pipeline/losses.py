"""Distillation losses: pure functions, no I/O."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distillation_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logprobs: torch.Tensor | None,
    *,
    alpha: float,
    temperature: float,
    partner_labels: torch.Tensor | None = None,
    lam: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    r"""Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural Network".

    .. math::

        L = \alpha \, \mathrm{CE}(y, \mathrm{softmax}(z_s))
            + (1 - \alpha) \, T^2 \, \mathrm{KL}(p_t \,\|\, \mathrm{softmax}(z_s / T))

    with ``p_t = exp(teacher_logprobs)`` the teacher's distribution at
    temperature ``T`` (the cache stores ``log_softmax(z_t / T)``). The
    :math:`T^2` factor keeps the soft term's gradients the same size as the
    hard term's when T changes (they scale as :math:`1/T^2`). KL is summed over
    classes and averaged over the batch (``reduction="batchmean"``), the
    per-sample mean of the true KL divergence.

    ``alpha = 1`` is plain cross-entropy (the baseline); ``teacher_logprobs``
    may then be None. ``alpha = 0`` needs no labels (a transfer set without
    them). For a mixed input (mixup, cutmix) the hard term is
    ``lam * CE(y) + (1 - lam) * CE(y_partner)`` per sample (Zhang et al. 2018),
    while the teacher's term needs nothing special: the teacher labelled the
    same mixed image. Returns ``loss`` (to backpropagate) and its terms
    ``hard`` (CE, when alpha > 0) and ``soft`` (KL, before the T² and 1 − α weights).
    """
    terms: dict[str, torch.Tensor] = {}
    if alpha > 0 or bool((labels >= 0).all()):  # the CE is reported whenever labels exist
        hard = F.cross_entropy(student_logits, labels, reduction="none")
        if partner_labels is not None and lam is not None:
            mixed = lam < 1
            partner_ce = F.cross_entropy(
                student_logits, torch.where(mixed, partner_labels, labels), reduction="none"
            )
            hard = lam * hard + (1 - lam) * partner_ce
        terms["hard"] = hard.mean()
    if teacher_logprobs is None:
        if alpha != 1.0:
            raise ValueError("teacher_logprobs are required when alpha < 1")
        return {"loss": terms["hard"], **terms}
    student_logprobs = F.log_softmax(student_logits / temperature, dim=-1)
    soft = F.kl_div(student_logprobs, teacher_logprobs, reduction="batchmean", log_target=True)
    loss = (1.0 - alpha) * temperature**2 * soft
    if alpha > 0:
        loss = alpha * terms["hard"] + loss
    return {"loss": loss, **terms, "soft": soft}
