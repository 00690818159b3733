"""Shipping a student: ONNX export, int8 quantization, quantization-aware distillation.

- :func:`export_run` writes a run as one ``.onnx`` file (float32, or int8 through
  ONNX Runtime's static quantization calibrated on training rows), checked against
  PyTorch on test rows before it is written, with its preprocessing, classes and
  lineage in the file's metadata (:func:`read_onnx_card`).
- :func:`qat_distill` fine-tunes a trained student with fake-quantized weights and
  activations (torchao's PT2E QAT) against a cache's soft labels, never loading the
  teacher, and writes the converted int8 model as the same kind of file.
"""

from kdpipe.export.onnx import (
    METADATA_KEY,
    ExportResult,
    OnnxCard,
    export_run,
    file_size_bytes,
    onnx_logits,
    onnx_session,
    read_onnx_card,
)
from kdpipe.export.qat import INT8_FILE, QatConfig, qat_distill
from kdpipe.export.quantize import CalibrationSet, calibration_set, quantize_static_int8

__all__ = [
    "INT8_FILE",
    "METADATA_KEY",
    "CalibrationSet",
    "ExportResult",
    "OnnxCard",
    "QatConfig",
    "calibration_set",
    "export_run",
    "file_size_bytes",
    "onnx_logits",
    "onnx_session",
    "qat_distill",
    "quantize_static_int8",
    "read_onnx_card",
]
