"""A logit bias for classes a student never saw, chosen on held-out rows (Hinton et al. 2015).

A student distilled from a transfer set without class c still learns about c
from the teacher's soft targets, but its bias for c is too low. Hinton et al.
raised it by 3.5 and got 98.6 % of the omitted 3s right. Here the bias is
chosen on the run's own validation split (the rows ``--val-fraction`` held out
of training), never on the test set. The test split is then scored once
before and once after the bias, and both results go to ``bias.json`` in the
run directory.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from kdpipe.base.errors import UsageError
from kdpipe.base.outputs import BIAS_RESULT, guard_output
from kdpipe.base.runtime import resolve_device
from kdpipe.data.datasets import ImageSet, check_same_dataset, validation_rows
from kdpipe.models.runs import load_model, read_config, write_json
from kdpipe.views.inputs import check_channels

if TYPE_CHECKING:  # for annotations: imported where they are used, so that a command
    # that reads records only loads no deep-learning library
    import torch

BIAS_FILE = "bias.json"


def bias_grid(limit: float, step: float) -> np.ndarray:
    """Candidate biases from −limit to +limit; 0 (no change) is always one of them."""
    if not (0 < limit < math.inf and 0 < step < math.inf):
        raise UsageError(
            f"--max-bias and --step must be finite numbers > 0, not {limit:g} and {step:g}"
        )
    count = round(limit / step)
    if count > 100_000:
        raise UsageError(
            f"--max-bias {limit:g} with --step {step:g} is {2 * count + 1:,} biases to try: "
            "at most 200,001; raise --step or lower --max-bias"
        )
    half = np.arange(1, count + 1) * step
    return np.concatenate([-half[::-1], [0.0], half])


def best_bias(logits: torch.Tensor, labels: torch.Tensor, classes: Sequence[int],
              grid: np.ndarray) -> tuple[float, int]:  # fmt: skip
    """The grid value that, added to ``classes``' logits, leaves the fewest errors
    (ties: the smallest change), and that error count."""
    import torch

    shift = torch.zeros(logits.shape[1], dtype=logits.dtype)
    shift[list(classes)] = 1.0
    errors = [int(((logits + b * shift).argmax(-1) != labels).sum()) for b in grid]
    order = sorted(range(len(grid)), key=lambda i: (errors[i], abs(grid[i])))
    return round(float(grid[order[0]]), 9), errors[order[0]]  # 2.3, not 2.3000000000000003


def _scores(logits: torch.Tensor, labels: torch.Tensor, classes: Sequence[int]) -> dict:
    import torch

    predicted = logits.argmax(-1)
    inside = torch.isin(labels, torch.tensor(list(classes)))
    return {
        "errors": int((predicted != labels).sum()),
        "accuracy": round(float((predicted == labels).float().mean()), 6),
        "class_samples": int(inside.sum()),
        "class_accuracy": round(float((predicted[inside] == labels[inside]).float().mean()), 6)
        if bool(inside.any())
        else None,
    }


def tune_bias(
    run_dir: Path,
    classes: Sequence[int],
    train_set: ImageSet,
    test_set: ImageSet,
    *,
    limit: float = 10.0,
    step: float = 0.1,
    device: str = "auto",
) -> dict:
    """Choose one bias for ``classes`` on the run's validation rows; score the test split
    before and after; write and return ``bias.json``."""
    import torch
    from kdpipe.models.teacher import predict_logits

    run_dir = Path(run_dir)
    if not classes:
        raise UsageError("give the classes to bias with --classes, e.g. --classes 3")
    grid = bias_grid(limit, step)
    torch_device = resolve_device(device)
    model, card = load_model(run_dir, torch_device)
    bad = [c for c in classes if not 0 <= c < card.num_classes]
    if bad:
        raise UsageError(
            f"--classes {','.join(map(str, bad))}: {run_dir} has classes 0..{card.num_classes - 1}"
        )
    fraction = read_config(run_dir).get("val_fraction")
    if fraction is None:
        raise UsageError(
            f"{run_dir} trained on every training row: a bias chosen on rows it learned from "
            "would be optimistic; train it with --val-fraction F"
        )
    check_same_dataset(card.dataset, train_set, str(run_dir))
    # rerun, it replaces its own result; never a file of that name that it did not write
    guard_output(run_dir / BIAS_FILE, BIAS_RESULT, overwrite=True, option="tune-bias's")
    if not test_set.labeled:
        raise UsageError(f"{test_set.name} test has no labels: nothing to score")
    for split in (train_set, test_set):
        check_channels(str(run_dir), card.data, split.images)
    held_out = torch.from_numpy(validation_rows(len(train_set), fraction))
    val_labels = train_set.labels[held_out]
    val_logits = predict_logits(model, train_set.images, card.data, device=torch_device,
                                rows=held_out.numpy())  # fmt: skip
    test_logits = predict_logits(model, test_set.images, card.data, device=torch_device)  # on CPU
    bias, _ = best_bias(val_logits, val_labels, classes, grid)
    shift = torch.zeros(card.num_classes)
    shift[list(classes)] = bias
    result = {
        "classes": [int(c) for c in classes],
        "class_names": [card.classes[c] for c in classes],
        "bias": bias,
        "grid": {"min": float(grid[0]), "max": float(grid[-1]), "step": step},
        "chosen_on": {"split": "validation", "val_fraction": fraction, "rows": len(held_out)},
        "validation": {
            "before": _scores(val_logits, val_labels, classes),
            "after": _scores(val_logits + shift, val_labels, classes),
        },
        "test": {
            "before": _scores(test_logits, test_set.labels, classes),
            "after": _scores(test_logits + shift, test_set.labels, classes),
        },
    }
    write_json(run_dir / BIAS_FILE, result)  # guarded in tune_bias before any work
    return result
