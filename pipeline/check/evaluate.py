"""Metrics and reports for a trained run: quality, agreement, calibration, size, speed."""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch
from kdpipe.base.errors import CacheMismatchError, UsageError
from kdpipe.base.runtime import resolve_device
from kdpipe.cache import load_soft_labels
from kdpipe.check.timing import stable_latency
from kdpipe.data.datasets import ImageSet, check_classes, check_same_dataset
from kdpipe.models.runs import WEIGHTS_FILE, load_model
from kdpipe.models.teacher import load_teacher, predict_logits
from kdpipe.views.inputs import check_channels, prepare_input


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """ECE (Guo et al. 2017): confidence-vs-accuracy gap, averaged over equal-width
    confidence bins weighted by how many samples fall in each."""
    confidence, predicted = torch.softmax(logits.float(), dim=-1).max(dim=-1)
    correct = (predicted == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    ece = torch.zeros(())
    for low, high in itertools.pairwise(edges):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            gap = (confidence[inside].mean() - correct[inside].mean()).abs()
            ece += gap * inside.float().mean()
    return float(ece)


@torch.inference_mode()
def quality_columns(
    logits: torch.Tensor, labels: torch.Tensor, teacher_predicted: torch.Tensor | None
) -> dict:
    """Accuracy, errors, agreement with the teacher and ECE: the columns every evaluated
    model (a run in PyTorch, an .onnx file in ONNX Runtime) reports alike."""
    predicted = logits.argmax(-1)
    return {
        "accuracy": round(float((predicted == labels).float().mean()), 6),
        "errors": int((predicted != labels).sum()),
        "teacher_agreement": (
            round(float((predicted == teacher_predicted).float().mean()), 6)
            if teacher_predicted is not None
            else None
        ),
        "ece": round(expected_calibration_error(logits, labels), 6),
    }


def cpu_speed(
    model: torch.nn.Module, dataset: ImageSet, data_config, batch_size: int = 256
) -> dict:
    """Latency of one image (median and p95 of a stable window of 200 calls, its spread and
    the load: :func:`kdpipe.check.timing.stable_latency`) and throughput of batches of 64
    and of ``batch_size``, on the CPU (the columns :mod:`kdpipe.check.evaluate_onnx` reports)."""
    model = model.cpu().eval().to(memory_format=torch.channels_last)
    device = torch.device("cpu")
    single = prepare_input(dataset.images[:1], data_config, device)
    timed = stable_latency(lambda: model(single))
    rates = {}
    for size, rounds in ((64, 20), (batch_size, 5)):
        batch = prepare_input(dataset.images[:size], data_config, device)
        model(batch)
        started = time.perf_counter()
        for _ in range(rounds):
            model(batch)
        rates[size] = int(rounds * len(batch) / (time.perf_counter() - started))
    return {**timed, "throughput_b64_img_s": rates[64], "throughput_img_s": rates[batch_size]}


def per_class_accuracy(
    predicted: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> dict[str, float | None]:
    """``class_<i>_accuracy`` for each class id: the share of the split's samples of class
    i predicted as i (its recall), None where the split has none. A transfer set that left
    a class out is judged on that class, against students that saw it."""
    columns: dict[str, float | None] = {}
    for index in range(num_classes):
        inside = labels == index
        hits = (predicted[inside] == index).float().mean() if bool(inside.any()) else None
        columns[f"class_{index}_accuracy"] = None if hits is None else round(float(hits), 6)
    return columns


def evaluate_run(
    run_dir: Path,
    dataset: ImageSet,
    *,
    teachers: Sequence[Path] = (),
    cache: str | Path | None = None,
    device: str = "auto",
    per_class: bool = False,
) -> pd.DataFrame:
    """One row of metrics for ``run_dir`` on ``dataset``.

    Agreement with the teacher needs the teacher's predictions on the same
    split: from a cache of that split (``cache``), or by running ``teachers``.
    An exported ``.onnx`` file is evaluated on ONNX Runtime instead
    (:func:`kdpipe.check.evaluate_onnx.evaluate_onnx`), with the same columns.
    With ``per_class`` the row also has each class's accuracy (:func:`per_class_accuracy`,
    class ids in the order of the model card's ``classes``).
    """
    if Path(run_dir).suffix == ".onnx":
        from kdpipe.check.evaluate_onnx import evaluate_onnx

        return evaluate_onnx(Path(run_dir), dataset, teachers=teachers, cache=cache)
    if teachers and cache is not None:
        raise UsageError(
            "give the teacher either as --teacher run directories or as --cache, not both"
        )
    torch_device = resolve_device(device)
    model, card = load_model(run_dir, torch_device)
    check_channels(str(run_dir), card.data, dataset.images)
    if card.num_classes != dataset.num_classes:
        raise CacheMismatchError(
            f"{run_dir} predicts {card.num_classes} classes but {dataset.name} has "
            f"{dataset.num_classes}"
        )
    if card.classes and dataset.classes:
        check_classes(card.classes, dataset.classes, str(run_dir),
                      f"{dataset.name} ({dataset.split})")  # fmt: skip
    logits = predict_logits(model, dataset.images, card.data, device=torch_device,
                            progress=f"evaluating {run_dir}")  # fmt: skip
    predicted = logits.argmax(-1)
    labels = dataset.labels
    teacher_predicted = _teacher_predictions(dataset, teachers, cache, torch_device)
    row = {
        "run": str(run_dir),
        "kind": card.kind,
        "architecture": card.architecture,
        "dataset": dataset.name,
        "split": dataset.split,
        "samples": len(dataset),
        **quality_columns(logits, labels, teacher_predicted),
        "params": card.param_count,
        "size_mb": round((Path(run_dir) / WEIGHTS_FILE).stat().st_size / 2**20, 4),
        "runtime": "pytorch eager",
        "threads": torch.get_num_threads(),
        **cpu_speed(model, dataset, card.data),
        "cache_id": (card.lineage or {}).get("cache_id"),
        "teacher_id": (card.lineage or {}).get("teacher_id"),
    }
    if per_class:
        row.update(per_class_accuracy(predicted, labels, card.num_classes))
    return pd.DataFrame([row])


def _teacher_predictions(
    dataset: ImageSet, teachers: Sequence[Path], cache: str | Path | None, device: torch.device
) -> torch.Tensor | None:
    if cache is not None:
        soft_labels = load_soft_labels(cache)
        check_same_dataset(soft_labels.manifest.dataset, dataset, str(cache))
        manifest = soft_labels.manifest
        if manifest.num_samples != len(dataset) or soft_labels.has_views:
            raise UsageError(
                f"{cache} holds {manifest.num_samples} row(s) with views "
                f"{manifest.views['augment']}/{manifest.views['mix']}: agreement needs a cache "
                f"of every plain image of {dataset.name} {dataset.split} (no --subset or --augment)"
            )
        return soft_labels.log_probs()[:, 0, :].argmax(-1)
    if not teachers:
        return None
    teacher = load_teacher(teachers, device)
    teacher.check(dataset)
    return teacher.log_probs(dataset.images, 1.0, "mean-probs", device=device).argmax(-1)
