"""Metrics of a deployed model: an exported ``.onnx`` file run by ONNX Runtime's CPU provider.

The same columns as :func:`kdpipe.check.evaluate.evaluate_run` gives a PyTorch run, so
a float32 run, its ONNX file and its int8 files compare side by side: accuracy,
errors, agreement with the teacher, ECE, size on disk, latency p50/p95 at batch 1,
throughput at batch 64 (and 256), and the thread count both runtimes were given.
The preprocessing is the file's own (its kdpipe metadata), not the caller's.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from kdpipe.base.errors import CacheMismatchError
from kdpipe.check.evaluate import _teacher_predictions, quality_columns
from kdpipe.check.timing import stable_latency
from kdpipe.data.datasets import ImageSet, check_classes
from kdpipe.export.onnx import (
    file_size_bytes,
    onnx_logits,
    onnx_session,
    read_onnx_card,
)
from kdpipe.views.inputs import DataConfig, check_channels, model_rows, prepare_input


def onnx_speed(session: Any, dataset: ImageSet, data_config: DataConfig) -> dict:
    """Latency of one image (:func:`kdpipe.check.timing.stable_latency`) and throughput at batch 64
    and 256, after warm-up calls (the first ones allocate and pick kernels)."""
    name = session.get_inputs()[0].name
    cpu = torch.device("cpu")

    def as_input(count: int) -> np.ndarray:
        return prepare_input(dataset.images[:count], data_config, cpu).contiguous().numpy()

    def timed(batch: np.ndarray, calls: int) -> list[float]:
        for _ in range(5):
            session.run(None, {name: batch})
        seconds = []
        for _ in range(calls):
            started = time.perf_counter()
            session.run(None, {name: batch})
            seconds.append(time.perf_counter() - started)
        return seconds

    single = as_input(1)
    return {
        **stable_latency(lambda: session.run(None, {name: single})),
        "throughput_b64_img_s": _rate(timed(as_input(64), 20), 64),
        "throughput_img_s": _rate(timed(as_input(256), 5), 256),
    }


def _rate(seconds: list[float], batch: int) -> int:
    return int(batch * len(seconds) / sum(seconds))


def evaluate_onnx(
    path: Path,
    dataset: ImageSet,
    *,
    teachers: Sequence[Path] = (),
    cache: str | Path | None = None,
    threads: int | None = None,
) -> pd.DataFrame:
    """One row of metrics for an exported file on ``dataset`` (ONNX Runtime, CPU)."""
    path = Path(path)
    card = read_onnx_card(path)  # a file that is not kdpipe's stops here
    data_config = card.data
    check_channels(str(path), data_config, dataset.images)
    if len(card.classes) != dataset.num_classes:
        raise CacheMismatchError(
            f"{path} predicts {len(card.classes)} classes but {dataset.name} has "
            f"{dataset.num_classes}"
        )
    if dataset.classes:
        check_classes(card.classes, dataset.classes, str(path), f"{dataset.name} ({dataset.split})")
    threads = threads or torch.get_num_threads()
    session = onnx_session(path, threads)
    # a batch of images at a time: an image folder is decoded per batch, never whole
    cpu, step = torch.device("cpu"), 256
    images, finish = model_rows(dataset.images, data_config)  # a teacher's: from the files
    logits = torch.cat([
        onnx_logits(session, prepare_input(images[s : s + step], finish, cpu))
        for s in range(0, len(dataset), step)
    ])  # fmt: skip
    labels = dataset.labels
    teacher_predicted = _teacher_predictions(dataset, teachers, cache, torch.device("cpu"))
    lineage = card.lineage or {}
    row = {
        "run": str(path),
        "kind": f"onnx-{card.format}",
        "architecture": card.architecture,
        "dataset": dataset.name,
        "split": dataset.split,
        "samples": len(dataset),
        **quality_columns(logits, labels, teacher_predicted),
        "params": None,
        "size_mb": round(file_size_bytes(path) / 2**20, 4),
        "runtime": "onnxruntime CPUExecutionProvider",
        "threads": threads,
        **onnx_speed(session, dataset, data_config),
        "cache_id": lineage.get("cache_id"),
        "teacher_id": lineage.get("teacher_id"),
    }
    return pd.DataFrame([row])
