"""Detection metrics of a run directory or of an ``.onnx`` file exported from one.

mAP50-95 and mAP50 on a split of the data YAML, by Ultralytics' own validator machinery:
each image in view 0 (the letterbox at the model's image size, as Ultralytics' validator
letterboxes), its predictions through the validator's ``postprocess`` (its
``non_max_suppression`` at its defaults: conf 0.001, IoU 0.7, 300 detections), matched to the
ground truth at IoU 0.50:0.95 by its ``match_predictions``, scored by ``DetMetrics``
(``ap_per_class``). Boxes are compared on the letterboxed canvas, where the ground truth is
the rendered view's. A PyTorch run and its ONNX files take the same path, so their numbers
compare; plus batch-1 latency (:func:`kdpipe.check.timing.stable_latency`) and size.

A model with an NMS-free one-to-one head beside its one-to-many head (YOLO26) is scored
through the one-to-many head with NMS by default, as Ultralytics 8.4's validator does unless
``nms=False``; ``head="one2one"`` scores the one-to-one head instead, its top detections
taken as they are (Ultralytics' ``nms=False``), the head such a model is deployed with.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from kdpipe.base.errors import DatasetError, UsageError
from kdpipe.base.flags import DETECT_HEADS
from kdpipe.check.timing import stable_latency
from kdpipe.data.yolo import load_detection_split, read_data_yaml
from kdpipe.models.runs import WEIGHTS_FILE, is_detection_run
from kdpipe.tasks.detect.sources import plain_views
from kdpipe.tasks.detect.yolo import ultralytics


def is_detection(target: str | Path) -> bool:
    """Whether ``target`` is a detection run directory or a detection ``.onnx`` export."""
    target = Path(target)
    if target.suffix == ".onnx":
        from kdpipe.tasks.detect.export import read_detection_onnx_card

        return read_detection_onnx_card(target, strict=False) is not None
    return is_detection_run(target)


def mean_average_precision(
    predict: Callable[[torch.Tensor], torch.Tensor],
    data: str | Path,
    split: str,
    image_size: int,
    classes: list[str],
    batch_size: int = 16,
    end2end: bool = False,
) -> dict:
    """``map50_95``, ``map50``, ``precision``, ``recall`` of ``predict`` (a float image batch
    in [0, 1] to the decoded ``(B, 4 + nc, A)`` output of Ultralytics' head, or with
    ``end2end`` a one-to-one head's ``(B, max_det, 6)`` detections) on ``split``."""
    ultralytics()
    from ultralytics.models.yolo.detect import DetectionValidator
    from ultralytics.utils.metrics import DetMetrics
    from ultralytics.utils.ops import xywh2xyxy

    detection = read_data_yaml(data)
    if list(detection.names) != list(classes):
        raise DatasetError(f"{detection.yaml_file} names {list(detection.names)} but the model "
                           f"predicts {list(classes)}")  # fmt: skip
    images = load_detection_split(detection, split)
    with tempfile.TemporaryDirectory(prefix="kdpipe-val-") as work:
        validator = DetectionValidator(save_dir=Path(work), args={"plots": False})
    validator.end2end, validator.nc = end2end, len(classes)
    metrics = DetMetrics(names=dict(enumerate(classes)))
    for start in range(0, len(images), batch_size):
        rows = np.arange(start, min(start + batch_size, len(images)))
        batch = plain_views(images, rows, image_size)
        with torch.no_grad():
            outputs = validator.postprocess(predict(batch.images))
        for i, (row, pred) in enumerate(zip(rows, outputs, strict=True)):
            inside = batch.batch_idx == i
            cls = batch.cls[inside, 0]
            truth = {"cls": cls, "bboxes": xywh2xyxy(batch.bboxes[inside]) * image_size}
            matched = validator._process_batch(pred, truth)
            none = pred["cls"].shape[0] == 0
            metrics.update_stats({**matched, "target_cls": cls.numpy(),
                                  "target_img": np.unique(cls.numpy()),
                                  "conf": np.zeros(0) if none else pred["conf"].numpy(),
                                  "pred_cls": np.zeros(0) if none else pred["cls"].numpy(),
                                  "im_name": Path(images.paths[row]).name})  # fmt: skip
    metrics.process()
    precision, recall, map50, map50_95 = metrics.mean_results()
    return {"map50_95": round(float(map50_95), 6), "map50": round(float(map50), 6),
            "precision": round(float(precision), 6), "recall": round(float(recall), 6),
            "images": len(images), "objects": int(sum(len(b) for b in images.boxes))}  # fmt: skip


def head_predictor(
    model: torch.nn.Module, head: str = "one2many"
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``model`` (a ``DetectionModel``) on CPU in eval mode, as a predict function over the
    decoded output of ``head``: what :func:`mean_average_precision` scores (with ``end2end``
    for the one-to-one head)."""
    model = model.cpu().eval()
    model.end2end = head == "one2one"  # Ultralytics' switch between a YOLO26's two heads

    def predict(images: torch.Tensor) -> torch.Tensor:
        return model(images)[0]

    return predict


def evaluate_detection(
    target: str | Path,
    data: str | Path,
    *,
    split: str = "val",
    latency: bool = True,
    head: str = "one2many",
) -> pd.DataFrame:
    """One row for a detection run directory or ``.onnx`` file on ``split`` of ``data``:
    mAP50-95, mAP50, precision, recall, size and (``latency``) batch-1 CPU latency, through
    ``head`` (see the module docstring)."""
    target = Path(target)
    if head not in DETECT_HEADS:
        raise UsageError(f"--head is one of {', '.join(DETECT_HEADS)}, not {head!r}")
    if target.suffix == ".onnx":
        if head != "one2many":
            raise UsageError(f"{target} is an ONNX export, which holds the one-to-many head's "
                             "output: --head one2one scores a run directory")  # fmt: skip
        from kdpipe.tasks.detect.export import onnx_detector

        predict, info = onnx_detector(target)
        size_bytes = target.stat().st_size
    else:
        from kdpipe.tasks.detect.runs import load_detection_run

        model, card = load_detection_run(target)
        if head == "one2one" and not card.end2end:
            raise UsageError(f"{target} ({card.architecture}) has no one-to-one head: --head "
                             "one2one is for end-to-end (NMS-free) heads, as YOLO26's")  # fmt: skip
        predict = head_predictor(model, head)
        info = {"format": "pytorch", "architecture": card.architecture, "kind": card.kind,
                "classes": card.classes, "image_size": card.image_size,
                "runtime": "pytorch eager"}  # fmt: skip
        size_bytes = (target / WEIGHTS_FILE).stat().st_size
    if split not in ("train", "val", "test"):
        raise UsageError(f"--split for detection is train, val or test, not {split!r}")
    size = info["image_size"]
    row = {"run": str(target), "kind": info["kind"], "format": info["format"],
           "architecture": info["architecture"], "data": str(data), "split": split,
           "image_size": size, "head": head,
           **mean_average_precision(predict, data, split, size, list(info["classes"]),
                                    end2end=head == "one2one"),
           "size_mb": round(size_bytes / 2**20, 4), "runtime": info["runtime"],
           "threads": torch.get_num_threads()}  # fmt: skip
    if latency:
        single = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            row.update(stable_latency(lambda: predict(single)))
    return pd.DataFrame([row])
