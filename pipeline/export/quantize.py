"""int8 post-training quantization with ONNX Runtime, calibrated on training rows only.

The activation ranges of a static int8 model are fixed by running it on
calibration inputs. They must come from data the model may see in training:
calibrating on the test split would tune the deployed model to the rows it is
scored on. kdpipe takes them from the run's own transfer set, the rows of the
cache it learned from, in the views stored there (rendered as in training), so the
ranges are those of the inputs the student was distilled on.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from kdpipe.base.errors import ExportError, KdpipeError, UsageError
from kdpipe.cache import load_soft_labels
from kdpipe.data.datasets import class_mismatch, load_dataset
from kdpipe.models.runs import ModelCard

METHODS = ("minmax", "entropy", "percentile")


@dataclass(frozen=True)
class CalibrationSet:
    """Normalised NCHW inputs of training rows, and where they came from."""

    inputs: torch.Tensor
    rows: torch.Tensor  # dataset indices (of the split below), one per input
    split: str
    dataset: str
    cache_id: str
    cache_path: str
    views: str  # which stored view each row used

    def record(self) -> dict:
        return {
            "split": self.split,
            "dataset": self.dataset,
            "rows": len(self.rows),
            "row_indices": self.rows.tolist(),
            "cache_id": self.cache_id,
            "cache_path": self.cache_path,
            "views": self.views,
        }


def calibration_set(
    run_card: ModelCard,
    run_dir: Path,
    cache_path: str | None,
    rows: int,
    *,
    seed: int = 0,
    data_root: Path = Path("data"),
    image_size: int | tuple[int, int] | None = None,
    channels: int | None = None,
    resize: str | None = None,
) -> CalibrationSet:
    """``rows`` random rows of the transfer set in the run's cache (or ``cache_path``),
    each in the stored view that epoch 1 of training replays, as the student's input."""
    from kdpipe.train import TrainConfig, TrainData, cache_data

    if rows < 1:
        raise UsageError(f"--calibration-rows must be >= 1, not {rows}")
    cache_path = cache_path or (run_card.lineage or {}).get("cache_path")
    if cache_path is None:
        raise ExportError(
            f"--int8 needs calibration data: {run_dir} learned from labels alone, so no cache "
            "names its transfer rows; give --calibration-cache CACHE (a cache of the training "
            "split)"
        )
    try:
        soft_labels = load_soft_labels(cache_path)
    except KdpipeError as exc:
        raise ExportError(f"--int8 needs calibration data, and {exc}") from None
    manifest = soft_labels.manifest
    split = manifest.dataset["split"]
    if split != "train":
        raise ExportError(
            f"{cache_path} is a cache of the {split} split: calibration uses training rows only"
        )
    differ = class_mismatch(manifest.classes, run_card.classes, str(cache_path), str(run_dir))
    if differ is not None:
        raise ExportError(differ)
    from kdpipe.data.datasets import decode_options

    decode = decode_options(manifest.dataset, cache_path, image_size=image_size,
                            channels=channels, resize=resize)  # fmt: skip
    train_set = load_dataset(manifest.dataset["name"], "train", data_root=Path(data_root),
                             **decode)  # fmt: skip
    # the training room's own reader of a cache's rows and views (alpha 1: no soft labels)
    config = TrainConfig(model=run_card.architecture, data=manifest.dataset["name"], out="",
                         epochs=1, alpha=1.0)  # fmt: skip
    data, _, _ = cache_data(config, soft_labels, train_set, lambda _line: None)
    chosen = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:rows]
    chosen = chosen.sort().values
    batches = []
    for start in range(0, len(chosen), 256):
        positions = chosen[start : start + 256]
        gathered = data.gather(positions, 1, start // 256, seed)
        batch = TrainData.to_model(gathered, run_card.data, torch.device("cpu"))
        batches.append(batch["inputs"].contiguous())
    return CalibrationSet(
        inputs=torch.cat(batches),
        rows=data.rows[chosen],
        split="train",
        dataset=manifest.dataset["name"],
        cache_id=manifest.cache_id,
        cache_path=str(cache_path),
        views="stored view of epoch 1's schedule" if data.views is not None else "plain image",
    )


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over a tensor of inputs."""

    def __init__(self, input_name: str, inputs: torch.Tensor, batch_size: int = 64) -> None:
        self.input_name, self.inputs, self.batch_size = input_name, inputs, batch_size
        self._batches: Iterator[torch.Tensor] | None = None

    def get_next(self) -> dict | None:
        if self._batches is None:
            self._batches = iter(self.inputs.split(self.batch_size))
        batch = next(self._batches, None)
        return None if batch is None else {self.input_name: batch.numpy()}

    def rewind(self) -> None:
        self._batches = None


def quantize_static_int8(
    fp32_path: Path, out_path: Path, calibration: CalibrationSet, method: str = "minmax",
    skip_symbolic_shape: bool = False, op_types: list[str] | None = None,
) -> dict:  # fmt: skip
    """ONNX Runtime static quantization: QDQ nodes, int8 weights per output channel,
    uint8 activations with ranges from ``calibration``. Returns what was done.
    ``skip_symbolic_shape``: ONNX's own shape inference only, for graphs ONNX Runtime's
    symbolic inference cannot finish (a YOLO head's anchors). ``op_types``: quantize only
    these operators (None: every one ONNX Runtime can), the rest stay float32."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    if method not in methods:
        raise UsageError(f"unknown calibration method {method!r}: choose one of {METHODS}")
    prepared = out_path.with_name(out_path.stem + ".pre.onnx")
    # shape inference and graph fusions first (conv+bn and friends), as ORT recommends
    quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=skip_symbolic_shape)
    import onnx

    input_name = onnx.load(str(prepared), load_external_data=False).graph.input[0].name
    try:
        quantize_static(
            str(prepared),
            str(out_path),
            _Reader(input_name, calibration.inputs),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            # 7-bit weights, as the QAT file has (kdpipe.export.qat.WEIGHT_RANGE): a CPU
            # without VNNI adds uint8 x int8 products in a saturating int16, so 8-bit
            # weights make the file compute other logits there than on a VNNI CPU
            reduce_range=True,
            calibrate_method=methods[method],
            op_types_to_quantize=op_types,
        )
    except Exception as exc:  # onnxruntime raises plain exceptions of many kinds
        raise ExportError(f"ONNX Runtime could not quantize {fp32_path.name}: {exc}") from None
    finally:
        prepared.unlink(missing_ok=True)
    return {
        "method": "onnxruntime.quantization.quantize_static",
        "format": "QDQ",
        "weights": "int8 in 7 bits (reduce_range: no int16 saturation on CPUs without VNNI), "
        "symmetric, per output channel",
        "activations": "uint8, per tensor",
        "calibration_method": method,
        "calibration": calibration.record(),
        "operators": op_types or "every operator ONNX Runtime quantizes",
    }
