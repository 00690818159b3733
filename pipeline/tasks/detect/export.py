"""ONNX files of detection runs: float32, and int8 by ONNX Runtime's static quantization.

The file's input is the letterboxed RGB batch ``(N, 3, S, S)`` float in [0, 1] (dynamic
batch), its output Ultralytics' decoded head output ``(N, 4 + nc, A)``: boxes as cx cy w h
in canvas pixels, then each class's score, before non-maximum suppression (which
:mod:`kdpipe.tasks.detect.evaluate` applies as Ultralytics' validator does, to PyTorch and
ONNX alike). The metadata entry ``kdpipe`` (as classification's exports) holds a JSON
record with ``"task": "detect"``: classes, image size, strides, reg_max, the run's weights
hash, its training data and lineage, the quantization and the check against PyTorch.

int8: QDQ, int8 weights per output channel (7 bits, as classification's PTQ), uint8
activations, calibrated on training images only (a few rows of the train split drawn by
the seed, in view 0) through :func:`kdpipe.export.quantize.quantize_static_int8`, the
quantizer classification uses. A file is built in a temporary folder beside ``--out``,
checked, stamped, then moved into place: a failed export leaves ``--out`` as it was.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from kdpipe.base.errors import ExportError, UsageError
from kdpipe.base.outputs import ONNX_FILE, guard_output
from kdpipe.base.runtime import software_versions
from kdpipe.data.yolo import load_detection_split, read_data_yaml
from kdpipe.export.onnx import METADATA_KEY, onnx_session, to_onnx
from kdpipe.export.quantize import CalibrationSet, quantize_static_int8
from kdpipe.tasks.detect.runs import DetectionCard, load_detection_run
from kdpipe.tasks.detect.sources import plain_views

TASK = "detect"
FP32_TOLERANCE = 1e-2  # canvas pixels and scores: float32 ONNX Runtime against PyTorch
CALIBRATION_ROWS = 32


class DecodedHead(torch.nn.Module):
    """The eval-mode model with only its decoded output (the raw head outputs are left)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        # Detect caches its anchors for the last input shape it saw; a batch of that shape
        # would trace them as constants and pin the batch size (Ultralytics' own exporter
        # sets the same flag): recompute them on every call
        model.model[-1].dynamic = True

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)[0]


@dataclass(frozen=True)
class DetectExport:
    path: Path
    record: dict
    size_bytes: int


def _record(card: DetectionCard, run_dir: Path, fmt: str, quantization: dict | None,
            check: dict) -> dict:  # fmt: skip
    import onnx
    import onnxruntime

    return {"task": TASK, "format": fmt, "architecture": card.architecture, "kind": card.kind,
            "run_dir": str(run_dir), "classes": list(card.classes),
            "image_size": card.image_size, "strides": list(card.strides),
            "reg_max": card.reg_max, "weights_sha256": card.weights_sha256,
            "input": "(N, 3, S, S) float32 RGB in [0, 1], Ultralytics' letterbox (pad 114)",
            "output": "(N, 4 + nc, anchors): cx cy w h in pixels, class scores; before NMS",
            "dataset": card.dataset, "lineage": card.lineage, "quantization": quantization,
            "check": check, "software": {**software_versions(), "onnx": onnx.__version__,
                                         "onnxruntime": onnxruntime.__version__}}  # fmt: skip


def read_detection_onnx_card(path: str | Path, strict: bool = True) -> dict | None:
    """The ``kdpipe`` record of a detection export; None (or, ``strict``, an error) for a
    file that is not one."""
    import onnx

    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
        record = json.loads({p.key: p.value for p in model.metadata_props}[METADATA_KEY])
    except Exception:  # not a file, not ONNX, no or bad kdpipe metadata
        record = None
    if isinstance(record, dict) and record.get("task") == TASK:
        return record
    if strict:
        raise ExportError(f"{path} is not a detection model kdpipe exported (no kdpipe "
                          "metadata with \"task\": \"detect\")")  # fmt: skip
    return None


def onnx_detector(path: Path) -> tuple[Callable[[torch.Tensor], torch.Tensor], dict]:
    """A predict function over ONNX Runtime's CPU session, and what evaluation reports."""
    record = read_detection_onnx_card(path)
    session = onnx_session(path)
    name = session.get_inputs()[0].name

    def predict(images: torch.Tensor) -> torch.Tensor:
        batch = images.contiguous().numpy().astype(np.float32)
        return torch.from_numpy(session.run(None, {name: batch})[0])

    info = {"format": f"onnx-{record['format']}", "architecture": record["architecture"],
            "kind": record["kind"], "classes": record["classes"],
            "image_size": record["image_size"],
            "runtime": "onnxruntime CPUExecutionProvider"}  # fmt: skip
    return predict, info


def _calibration(card: DetectionCard, data: str, rows: int, seed: int) -> CalibrationSet:
    train = load_detection_split(read_data_yaml(data), "train")
    chosen = np.sort(np.random.default_rng(seed).permutation(len(train))[:rows])
    inputs = plain_views(train, chosen, card.image_size).images
    return CalibrationSet(inputs=inputs, rows=torch.from_numpy(chosen), split="train",
                          dataset=str(data), cache_id=None, cache_path=None,
                          views="view 0 (the letterbox)")  # fmt: skip


def export_detection(
    run_dir: str | Path, out: str | Path, *, data: str | None = None, int8: bool = False,
    calibration_rows: int = CALIBRATION_ROWS, calibration_method: str = "minmax",
    check_rows: int = 8, seed: int = 0, overwrite: bool = False,
) -> DetectExport:  # fmt: skip
    """Export a detection run to ONNX (float32, or int8 with ``int8``), checked on test
    images (view 0) against PyTorch before it is written."""
    run_dir, out = Path(run_dir), Path(out)
    model, card = load_detection_run(run_dir)
    data = data or (card.dataset or {}).get("data_yaml")
    if data is None:
        raise UsageError(f"{run_dir} records no data YAML (an imported teacher): give --data")
    detection = read_data_yaml(data)
    check_split = "test" if "test" in detection.splits else "val"
    checked = load_detection_split(detection, check_split)
    inputs = plain_views(checked, np.arange(min(check_rows, len(checked))), card.image_size).images
    calibration = _calibration(card, data, calibration_rows, seed) if int8 else None
    head = DecodedHead(model.cpu().eval())
    with torch.no_grad():
        reference = head(inputs)
    guard_output(out, ONNX_FILE, overwrite=overwrite, inputs=[run_dir])
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as work:
        fp32 = Path(work) / "fp32.onnx"
        to_onnx(head, inputs[:2], fp32, f"{card.architecture} ({run_dir})")
        check = _check(fp32, inputs, reference, FP32_TOLERANCE, check_split)
        final, fmt, quantization = fp32, "fp32", None
        if calibration is not None:
            final, fmt = Path(work) / "int8.onnx", "int8-ptq"
            # convolutions only: quantizing every operator also put the decoded output (box
            # corners in pixels, 0-128, concatenated with class scores in [0, 1]) on one
            # uint8 scale of about 0.5, so every score read as 0 or 0.5: mAP50-95 0.00 against
            # 4.26 for its fp32 file in make detect; the decoding stays float32
            quantization = quantize_static_int8(
                fp32,
                final,
                calibration,
                calibration_method,
                skip_symbolic_shape=True,
                op_types=["Conv"],
            )
            quantization["fp32_check"] = check
            check = _check(final, inputs, reference, None, check_split)
        _stamp(final, _record(card, run_dir, fmt, quantization, check))
        os.replace(final, out)
    return DetectExport(out, read_detection_onnx_card(out), out.stat().st_size)


def _check(path: Path, inputs: torch.Tensor, reference: torch.Tensor, tolerance: float | None,
           split: str) -> dict:  # fmt: skip
    """ONNX Runtime's decoded outputs against PyTorch's: the largest difference, an error
    beyond ``tolerance`` (int8 is only recorded: its boxes move by design; NaN fails)."""
    session = onnx_session(path)
    got = session.run(None, {session.get_inputs()[0].name: inputs.numpy()})[0]
    difference = float(np.abs(got - reference.numpy()).max())
    if not np.isfinite(difference) or (tolerance is not None and difference > tolerance):
        raise ExportError(f"the ONNX model differs from PyTorch by {difference:.3g} on "
                          f"{len(inputs)} {split} images (tolerance {tolerance}): "
                          "not written")  # fmt: skip
    return {"against": "PyTorch float32", "rows": len(inputs), "split": split,
            "max_abs_difference": difference, "tolerance": tolerance}  # fmt: skip


def _stamp(path: Path, record: dict) -> None:
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    model.metadata_props.add(key=METADATA_KEY, value=json.dumps(record))
    model.producer_name = "kdpipe"
    model.doc_string = (f"kdpipe {record['format']} export of detection model "
                        f"{record['architecture']} ({record['run_dir']})")  # fmt: skip
    onnx.save(model, str(path))
