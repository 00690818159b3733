"""Distillation losses: pure functions, no I/O."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from kdpipe.base.checks import check_alpha, check_temperature


def distillation_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logprobs: torch.Tensor | None,
    *,
    alpha: float,
    temperature: float,
    partner_labels: torch.Tensor | None = None,
    lam: torch.Tensor | None = None,
    standardize: bool = False,
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

    ``standardize`` (``--logit-standardize``): Sun et al. (2024), "Logit Standardization in
    Knowledge Distillation" (CVPR). Both distributions of the soft term come from logits
    z-scored per row, :math:`\mathcal{Z}(z) = (z - \bar z) / \sigma(z)` (``std`` with
    N − 1, plus 1e-7, as the authors' code):

    .. math:: p_t = \mathrm{softmax}(\mathcal{Z}(z_t) / T), \quad
              p_s = \mathrm{softmax}(\mathcal{Z}(z_s) / T)

    ``T`` is then a *base* temperature: row *i* is softened at :math:`T\,\sigma(z_i)`, its
    own logits' spread, so the student need only match the teacher's logits up to a shift
    and a scale, and one T suits a sharp teacher and a flat one alike. The same T is
    not comparable with and without standardisation (z-scored logits of 10 classes span
    about ±3, so at T = 20 both distributions are nearly uniform). The T²
    factor and the hard term (on the raw logits) stay as above. The teacher's logits are
    needed only up to a per-row shift and positive scale, so the stored
    ``log_softmax(z_t / T_cache)`` gives :math:`\mathcal{Z}(z_t)` exactly, at any cache
    temperature.

    ``alpha`` outside [0, 1] and ``temperature`` outside [0.01, 1000] (or not finite) are
    refused with the messages the command line gives (:mod:`kdpipe.base.checks`): a weight
    above 1 would make the soft term count negatively, T = 0 divides by zero.
    """
    check_alpha(alpha)
    check_temperature(temperature)
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
    if standardize:
        student_logits = standardized(student_logits)
        teacher_logprobs = F.log_softmax(standardized(teacher_logprobs) / temperature, dim=-1)
    student_logprobs = F.log_softmax(student_logits / temperature, dim=-1)
    soft = F.kl_div(student_logprobs, teacher_logprobs, reduction="batchmean", log_target=True)
    loss = (1.0 - alpha) * temperature**2 * soft
    if alpha > 0:
        loss = alpha * terms["hard"] + loss
    return {"loss": loss, **terms, "soft": soft}


def standardized(logits: torch.Tensor) -> torch.Tensor:
    """Each row z-scored: its mean subtracted, divided by its standard deviation (N − 1)
    plus 1e-7, as Sun et al.'s ``normalize``; unchanged by a per-row shift or positive scale."""
    mean = logits.mean(dim=-1, keepdim=True)
    return (logits - mean) / (logits.std(dim=-1, keepdim=True) + 1e-7)


FEATURE_LOSSES = ("hint", "cosine", "attention")


def hint_loss(projected: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    r"""Romero et al. (2015), "FitNets: Hints for Thin Deep Nets": the regressor's output
    on the student's guided layer against the teacher's hint layer,

    .. math:: L_{HT} = \frac{1}{N |S|} \sum_i \lVert r(s_i) - t_i \rVert_2^2

    the mean squared error over the batch and every element of the hint (FitNets write
    ½‖·‖², summed; the mean keeps β independent of the layer's size). ``projected`` is
    :math:`r(s)`, the learned projector applied to the student's layer.
    """
    return F.mse_loss(projected.float(), teacher.float())


def cosine_feature_loss(projected: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    r"""One minus the cosine similarity of the projected student layer and the teacher's,
    each flattened per sample, averaged over the batch:

    .. math:: L = \frac{1}{N} \sum_i \Big(1 - \frac{r(s_i) \cdot t_i}
              {\lVert r(s_i) \rVert_2 \, \lVert t_i \rVert_2}\Big)

    Scale-free, unlike the hint: only the direction of the features is matched.
    """
    similarity = F.cosine_similarity(projected.float().flatten(1), teacher.float().flatten(1))
    return (1.0 - similarity).mean()


def attention_transfer_loss(student_map: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
    r"""Zagoruyko & Komodakis (2017), "Paying More Attention to Attention" (attention
    transfer): with :math:`Q = \mathrm{vec}(\frac{1}{C}\sum_c A_c^2)` the flattened
    spatial attention map of a layer (:func:`kdpipe.views.features.attention_map`),

    .. math:: L_{AT} = \frac{1}{N\,HW} \sum_i \Big\lVert \frac{Q_s^i}{\lVert Q_s^i \rVert_2}
              - \frac{Q_t^i}{\lVert Q_t^i \rVert_2} \Big\rVert_2^2

    the mean squared difference of the L2-normalised maps, as in the authors' code
    (``(at(x) - at(y)).pow(2).mean()``; they weight it by β = 10³). The maps are
    normalised here again, so unnormalised maps give the same loss.
    """
    student = F.normalize(student_map.float().flatten(1), dim=1)
    teacher = F.normalize(teacher_map.float().flatten(1), dim=1)
    return (student - teacher).pow(2).mean()


def feature_loss(kind: str, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The feature term named by ``--feature-loss``."""
    losses = {"hint": hint_loss, "cosine": cosine_feature_loss,
              "attention": attention_transfer_loss}  # fmt: skip
    if kind not in losses:
        raise ValueError(f"feature loss {kind!r} is not one of {', '.join(FEATURE_LOSSES)}")
    return losses[kind](student, teacher)
