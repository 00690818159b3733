"""The distillation loss against golden values and an independent numpy version."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from kdpipe.tasks.classify.loss import distillation_loss

STUDENT = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]])
TEACHER_LOGITS = torch.tensor([[3.0, 2.0, 1.0], [1.0, 1.0, 4.0]])
LABELS = torch.tensor([2, 0])


def numpy_reference(alpha: float, temperature: float) -> tuple[float, float, float]:
    """Written from the formula, without torch's loss functions."""
    s = STUDENT.numpy().astype(np.float64)
    t = TEACHER_LOGITS.numpy().astype(np.float64)

    def log_softmax(z: np.ndarray) -> np.ndarray:
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    hard = -log_softmax(s)[np.arange(2), LABELS.numpy()].mean()
    p_t = np.exp(log_softmax(t / temperature))
    kl = (p_t * (log_softmax(t / temperature) - log_softmax(s / temperature))).sum(axis=1).mean()
    return alpha * hard + (1 - alpha) * temperature**2 * kl, hard, kl


@pytest.mark.parametrize("alpha,temperature", [(0.5, 2.0), (0.1, 20.0), (0.0, 1.0), (1.0, 4.0)])
def test_matches_the_formula(alpha: float, temperature: float) -> None:
    teacher = F.log_softmax(TEACHER_LOGITS / temperature, dim=-1)
    terms = distillation_loss(STUDENT, LABELS, teacher, alpha=alpha, temperature=temperature)
    loss, hard, soft = numpy_reference(alpha, temperature)
    assert terms["loss"].item() == pytest.approx(loss, rel=1e-5)
    assert terms["hard"].item() == pytest.approx(hard, rel=1e-5)
    assert terms["soft"].item() == pytest.approx(soft, rel=1e-5, abs=1e-7)


def test_golden_values() -> None:
    # Checked by hand: CE rows 0.40761 and 1.74130; KL rows 0.3202 and 0.0432
    # (teacher and student logits at T = 2). A change in reduction, in the T²
    # factor or in the direction of the KL moves these numbers.
    teacher = F.log_softmax(TEACHER_LOGITS / 2.0, dim=-1)
    terms = distillation_loss(STUDENT, LABELS, teacher, alpha=0.5, temperature=2.0)
    assert terms["hard"].item() == pytest.approx(1.0744586, abs=1e-6)
    assert terms["soft"].item() == pytest.approx(0.1817203, abs=1e-6)
    assert terms["loss"].item() == pytest.approx(0.9006700, abs=1e-6)


def test_identical_distributions_have_zero_soft_loss() -> None:
    teacher = F.log_softmax(STUDENT / 3.0, dim=-1)
    terms = distillation_loss(STUDENT, LABELS, teacher, alpha=0.0, temperature=3.0)
    assert terms["soft"].item() == pytest.approx(0.0, abs=1e-7)
    assert terms["loss"].item() == pytest.approx(0.0, abs=1e-6)


def test_alpha_one_is_plain_cross_entropy_without_a_teacher() -> None:
    terms = distillation_loss(STUDENT, LABELS, None, alpha=1.0, temperature=4.0)
    assert terms["loss"].item() == pytest.approx(F.cross_entropy(STUDENT, LABELS).item())
    with pytest.raises(ValueError, match="teacher_logprobs are required"):
        distillation_loss(STUDENT, LABELS, None, alpha=0.5, temperature=4.0)


def test_t_squared_keeps_soft_gradients_comparable_across_temperatures() -> None:
    """Hinton et al.: soft-target gradients scale as 1/T², hence the T² factor.
    For large T the scaled gradient tends to (z_s − z_t) / C (zero-mean logits)."""
    student = torch.tensor([[0.3, -0.2, -0.1]], requires_grad=True)
    teacher_logits = torch.tensor([[0.1, 0.2, -0.3]])
    grads = []
    for temperature in (10.0, 100.0):
        teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
        loss = distillation_loss(
            student, torch.tensor([0]), teacher, alpha=0.0, temperature=temperature
        )["loss"]
        (grad,) = torch.autograd.grad(loss, student)
        grads.append(grad)
    expected = (student.detach() - teacher_logits) / 3
    assert torch.allclose(grads[1], expected, atol=1e-3)
    assert math.isclose(grads[0].norm().item(), grads[1].norm().item(), rel_tol=0.05)


def test_feature_losses_against_golden_values() -> None:
    """Worked by hand from each formula (FitNets hint, cosine, attention transfer)."""
    from kdpipe.tasks.classify.loss import (
        attention_transfer_loss,
        cosine_feature_loss,
        feature_loss,
        hint_loss,
    )
    from kdpipe.views.features import attention_map

    projected = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    target = torch.tensor([[1.0, 0.0], [0.0, 4.0]])
    assert hint_loss(projected, target).item() == pytest.approx((0 + 4 + 9 + 0) / 4)
    # cos([1, 0], [1, 1]) = 1/sqrt(2); cos([0, 2], [0, -3]) = -1
    a, b = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[1.0, 1.0], [0.0, -3.0]])
    expected = ((1 - 1 / math.sqrt(2)) + 2) / 2
    assert cosine_feature_loss(a, b).item() == pytest.approx(expected)
    # [3, 4] / 5 - [1, 0] = [-0.4, 0.8]: mean of squares 0.4, whatever the maps' scale
    for scale in (1.0, 2.0):
        loss = attention_transfer_loss(torch.tensor([[3.0, 4.0]]) * scale, torch.eye(2)[:1] * 5)
        assert loss.item() == pytest.approx(0.4)
    assert feature_loss("hint", projected, target).item() == pytest.approx(3.25)
    # channels [1, 2] and [3, 0] at two positions: mean of squares [5, 2], / sqrt(29)
    activations = torch.tensor([[[[1.0, 2.0]], [[3.0, 0.0]]]])  # (1, 2, 1, 2)
    torch.testing.assert_close(
        attention_map(activations), torch.tensor([[5.0, 2.0]]) / math.sqrt(29)
    )
    # the gradient reaches the student through each loss
    student = projected.clone().requires_grad_()
    for kind in ("hint", "cosine", "attention"):
        feature_loss(kind, student, target).backward()
        assert student.grad is not None and student.grad.abs().sum() > 0
        student.grad = None


def sun_kd_loss(student: np.ndarray, teacher: np.ndarray, temperature: float) -> float:
    """Sun et al. (2024)'s logit-standardised KD term, in numpy: z-score each row (std with
    N - 1), soften by T, KL summed over classes and averaged over rows (before T^2)."""

    def zscore(z: np.ndarray) -> np.ndarray:
        return (z - z.mean(1, keepdims=True)) / (z.std(1, ddof=1, keepdims=True) + 1e-7)

    def log_softmax(z: np.ndarray) -> np.ndarray:
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    log_t = log_softmax(zscore(teacher) / temperature)
    log_s = log_softmax(zscore(student) / temperature)
    return float((np.exp(log_t) * (log_t - log_s)).sum(1).mean())


@pytest.mark.parametrize("temperature", [1.0, 4.0, 20.0])
def test_logit_standardize_is_sun_et_als_formula(temperature: float) -> None:
    teacher = F.log_softmax(TEACHER_LOGITS / temperature, dim=-1)
    terms = distillation_loss(STUDENT, LABELS, teacher, alpha=0.1, temperature=temperature,
                              standardize=True)  # fmt: skip
    soft = sun_kd_loss(STUDENT.double().numpy(), TEACHER_LOGITS.double().numpy(), temperature)
    assert terms["soft"].item() == pytest.approx(soft, rel=1e-4, abs=1e-7)
    hard = F.cross_entropy(STUDENT, LABELS)  # the hard term stays on the raw logits
    assert terms["loss"].item() == pytest.approx(
        0.1 * hard.item() + 0.9 * temperature**2 * soft, rel=1e-4
    )


def test_standardised_loss_ignores_a_per_row_affine_change_of_the_teacher() -> None:
    """z -> a_i z + b_i (a_i > 0) per row leaves the standardised loss as it was, also when
    the teacher arrives as log-probabilities at another cache temperature; the plain loss
    changes (so the check can fail)."""
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 10) * 3, torch.randn(6, 10) * 5
    labels = torch.arange(6) % 10
    scale, shift = torch.rand(6, 1) * 4 + 0.25, torch.randn(6, 1) * 10
    changed = scale * teacher + shift

    def loss(z: torch.Tensor, standardize: bool, cached_at: float = 4.0) -> torch.Tensor:
        stored = F.log_softmax(z / cached_at, dim=-1)  # what a cache at T = cached_at holds
        return distillation_loss(student, labels, stored, alpha=0.0, temperature=4.0,
                                 standardize=standardize)["loss"]  # fmt: skip

    torch.testing.assert_close(loss(changed, True), loss(teacher, True), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss(teacher, True, cached_at=20.0), loss(teacher, True),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    assert not torch.allclose(loss(changed, False), loss(teacher, False), rtol=1e-3)
