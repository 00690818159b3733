"""ONNX files of trained runs: export, the metadata that travels inside them, the check.

An exported file is one self-contained ``.onnx`` (weights inside, no ``.onnx.data``
beside it: kdpipe's students are far below protobuf's 2 GiB limit, and one file is
what gets copied to a device). Its input is the normalised float image batch
``(N, C, H, W)`` with a dynamic batch axis, its output the logits ``(N, classes)``.
How to make the input from uint8 pixels, the class names, the weights hash and the
lineage (run, cache, teacher) are stored as JSON in the model's ``metadata_props``
under the key ``kdpipe``, so a file found on a device says where it came from. The
metadata is bound to the graph it sits in: it records a digest of the graph's own
weights (:func:`graph_weights_digest`, over every initializer, external ``.onnx.data``
included), and every reader (:func:`read_onnx_card`: ``lineage``, ``evaluate``, the
output guard) recomputes it, so a block copied into another graph is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from kdpipe.base.errors import ExportError, UsageError
from kdpipe.base.outputs import ONNX_FILE, guard_output
from kdpipe.base.runtime import software_versions
from kdpipe.cache import utc_now
from kdpipe.data.datasets import ImageSet, class_mismatch, load_dataset
from kdpipe.models.runs import ModelCard, load_model, read_card
from kdpipe.models.teacher import predict_logits
from kdpipe.views.inputs import DataConfig, check_channels, prepare_input
from torch import nn

METADATA_KEY = "kdpipe"
# 2: the metadata carries graph_weights_sha256, the digest of the file's own weights
ONNX_FORMAT_VERSION = 2
FORMATS = ("fp32", "int8-ptq", "int8-qat")
INPUT_NAME, OUTPUT_NAME = "input", "logits"
# float32 ONNX Runtime against PyTorch: both compute the same float32 graph, so only
# summation order differs (about 1e-5 here); 1e-3 leaves room and still catches a wrong op
FP32_TOLERANCE = 1e-3
# int8 against PyTorch float32 (PTQ), or the converted PT2E model (QAT): rounding to 256
# levels moves logits by a few tenths at most on kdpipe's students
INT8_TOLERANCE = 2.0


@dataclass(frozen=True, kw_only=True)
class OnnxCard:
    """The ``kdpipe`` metadata entry of an exported file."""

    format_version: int
    format: str  # fp32, int8-ptq (ONNX Runtime static quantization) or int8-qat (PT2E)
    architecture: str
    run_dir: str
    run_kind: str
    classes: list
    preprocessing: dict  # input_size, channels, mean, std, how pixels become the input
    weights_sha256: str  # the run's weights (model.json), from which this file was made
    graph_weights_sha256: str  # this file's own weights: graph_weights_digest, checked on read
    lineage: dict | None  # the run's: cache_id, teacher_id, cache_path, teacher_runs, qat_from
    dataset: dict  # the run's training set: name, split, fingerprint
    quantization: dict | None  # method, calibration rows and split, or the QAT run
    check: dict  # ONNX Runtime against PyTorch on test rows: max |logit difference|
    created: str
    software: dict

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str) -> OnnxCard:
        if not isinstance(data, dict):
            raise ExportError(f"{where}: the {METADATA_KEY!r} metadata is not a JSON object")
        if data.get("format_version") == 1:
            raise ExportError(
                f"{where} was exported by an earlier kdpipe (metadata format 1, not bound to "
                "the file's weights): export the run again"
            )
        names = {f.name for f in fields(cls)}
        optional = {f.name for f in fields(cls) if f.default is not MISSING}
        unknown, missing = sorted(set(data) - names), sorted(names - set(data) - optional)
        if unknown or missing:
            problems = [f"unknown field(s) {', '.join(unknown)}"] if unknown else []
            problems += [f"missing field(s) {', '.join(missing)}"] if missing else []
            raise ExportError(f"{where}: {'; '.join(problems)}")
        if data["format_version"] != ONNX_FORMAT_VERSION:
            raise ExportError(
                f"{where}: format_version {data['format_version']!r} is not supported"
            )
        if data["format"] not in FORMATS:
            raise ExportError(f"{where}: format {data['format']!r} is not one of {FORMATS}")
        return cls(**data)

    @property
    def data(self) -> DataConfig:
        return DataConfig.from_dict(self.preprocessing)


def preprocessing(data_config: DataConfig) -> dict:
    """What a caller does to uint8 pixels before the model, in words and numbers."""
    return {
        **data_config.to_dict(),
        "channels": data_config.input_size[0],
        "layout": "NCHW float32",
        "recipe": "x = (pixels / 255 - mean) / std per channel, bilinear resize to input_size"
        if not data_config.eval_resize
        else "timm's eval transform: Resize(floor(size / crop_pct), interpolation, antialias), "
        "CenterCrop(size), then x = (pixels / 255 - mean) / std per channel",
    }


def card_for(
    run_card: ModelCard,
    run_dir: Path,
    fmt: str,
    quantization: dict | None,
    check: dict,
    graph_weights_sha256: str,
) -> OnnxCard:
    """The metadata of a file made from ``run_card``'s run, whose graph has the weights
    digest ``graph_weights_sha256``."""
    return OnnxCard(
        format_version=ONNX_FORMAT_VERSION,
        format=fmt,
        architecture=run_card.architecture,
        run_dir=str(run_dir),
        run_kind=run_card.kind,
        classes=list(run_card.classes),
        preprocessing=preprocessing(run_card.data),
        weights_sha256=run_card.weights_sha256,
        graph_weights_sha256=graph_weights_sha256,
        lineage=run_card.lineage,
        dataset={k: run_card.dataset[k] for k in ("name", "split", "fingerprint")},
        quantization=quantization,
        check=check,
        created=utc_now(),
        software={**software_versions(), **_onnx_versions()},
    )


def _onnx_versions() -> dict:
    import onnx
    import onnxruntime

    return {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def _failing_operator(exc: BaseException) -> str | None:
    """The operator the exporter names in its message (``aten.x`` / ``prims.x``), if any."""
    text = str(exc)
    found = re.search(r"op='([\w.]+)'", text) or re.search(r"target=torch\.ops\.([\w.]+)", text)
    return found.group(1).removesuffix(".default") if found else None


def to_onnx(model: nn.Module, example: torch.Tensor, path: Path, name: str) -> None:
    """Export ``model`` with torch's (dynamo) ONNX exporter: dynamic batch, one file."""
    model.cpu()
    model.eval()  # not chained: a PT2E graph's eval returns None
    model.to(memory_format=torch.contiguous_format)
    example = example.cpu().contiguous()
    try:
        with warnings.catch_warnings():
            # a PT2E graph switches its ops, not its ``training`` flag, in eval mode
            warnings.filterwarnings("ignore", message="Exporting a model while it is in training")
            program = torch.onnx.export(
                model,
                (example,),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: "batch"},),
                verbose=False,
            )
        program.save(str(path), external_data=False)
    except Exception as exc:  # the exporter raises many types; each is "will not export"
        operator = _failing_operator(exc)
        what = f"operator {operator} has no ONNX translation" if operator else _first_line(exc)
        raise ExportError(f"{name} cannot be exported to ONNX: {what}") from None


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def onnx_session(path: Path, threads: int | None = None) -> Any:
    """An ONNX Runtime session on the CPU provider with ``threads`` intra-op threads
    (default: torch's, so that both runtimes are timed with the same cores)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # warnings about unused initializers are not the user's
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own exception types are not importable by name
        raise ExportError(f"{path} cannot be loaded by ONNX Runtime: {_first_line(exc)}") from None


def onnx_logits(session: Any, inputs: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """float32 logits of normalised NCHW ``inputs``, batch by batch."""
    name = session.get_inputs()[0].name
    outputs = []
    for start in range(0, len(inputs), batch_size):
        batch = inputs[start : start + batch_size].contiguous().numpy().astype(np.float32)
        outputs.append(torch.from_numpy(session.run(None, {name: batch})[0]))
    return torch.cat(outputs) if outputs else torch.empty(0)


def check_against(
    path: Path, inputs: torch.Tensor, reference: torch.Tensor, tolerance: float, what: str
) -> dict:
    """ONNX Runtime's logits on ``inputs`` against ``reference``'s; an error beyond
    ``tolerance`` (the file is then not written)."""
    logits = onnx_logits(onnx_session(path), inputs)
    difference = float((logits - reference).abs().max()) if len(logits) else 0.0
    agreement = float((logits.argmax(-1) == reference.argmax(-1)).float().mean())
    if not difference <= tolerance:  # NaN fails too
        raise ExportError(
            f"the ONNX model differs from {what} by {difference:.3g} in a logit on "
            f"{len(inputs)} test rows (tolerance {tolerance:g}): not written"
        )
    return {
        "against": what,
        "rows": len(inputs),
        "split": "test",
        "max_abs_logit_difference": difference,
        "top1_agreement": round(agreement, 6),
        "tolerance": tolerance,
    }


def graph_weights_digest(model: Any) -> str:
    """SHA-256 of a graph's weights: every initializer (and every ``Constant`` node's
    value, where an exporter folded a weight into one) of the graph and its subgraphs,
    in order, each framed as a JSON header line (name, data type, dims, byte count)
    and its values' little-endian bytes, so no two sets of weights share a digest.
    External data must be loaded into ``model`` first (:func:`read_onnx_card` does)."""
    from onnx import numpy_helper

    digest = hashlib.sha256()
    for name, tensor in _graph_tensors(model.graph):
        values = numpy_helper.to_array(tensor)
        if values.dtype == object:  # string tensors
            raw = json.dumps([v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
                              for v in values.ravel().tolist()]).encode()  # fmt: skip
        else:
            raw = np.ascontiguousarray(values.astype(values.dtype.newbyteorder("<"))).tobytes()
        header = {"name": name, "type": int(tensor.data_type), "dims": list(tensor.dims),
                  "bytes": len(raw)}  # fmt: skip
        digest.update(json.dumps(header, sort_keys=True).encode() + b"\n")
        digest.update(raw)
    return digest.hexdigest()


def _graph_tensors(graph: Any) -> Any:
    """(name, TensorProto) of a graph's weights, subgraphs (If, Loop, Scan) included."""
    import onnx

    for tensor in graph.initializer:
        yield tensor.name, tensor
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR:
                output = node.output[0] if node.output else ""
                yield f"{node.name}/{output}/{attribute.name}", attribute.t
            elif attribute.type == onnx.AttributeProto.GRAPH:
                yield from _graph_tensors(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for subgraph in attribute.graphs:
                    yield from _graph_tensors(subgraph)


def _load_weights(model: Any, path: Path) -> None:
    """Read the external data (``.onnx.data``) a graph names into ``model``, or one
    line naming the file that cannot be read."""
    from onnx.external_data_helper import load_external_data_for_model, uses_external_data

    tensors = [t for _, t in _graph_tensors(model.graph) if uses_external_data(t)]
    if not tensors:
        return
    names = sorted({e.value for t in tensors for e in t.external_data if e.key == "location"})
    try:
        load_external_data_for_model(model, str(path.parent))
    except Exception as exc:  # FileNotFoundError, onnx's checker errors on a path outside
        where = ", ".join(str(path.parent / n) for n in names) or "its external data"
        raise ExportError(
            f"{path}: its weights in {where} cannot be read ({_first_line(exc)})"
        ) from None


def write_card(path: Path, card: OnnxCard) -> None:
    """Put the card into the file's ``metadata_props`` (replacing an earlier one)."""
    import onnx

    model = onnx.load(str(path))
    kept = [p for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.add(key=METADATA_KEY, value=json.dumps(card.to_dict()))
    model.producer_name = "kdpipe"
    model.doc_string = (
        f"kdpipe {card.format} export of {card.architecture} ({card.run_dir}); "
        f"metadata_props[{METADATA_KEY!r}] holds preprocessing, classes and lineage"
    )
    onnx.save(model, str(path))


def read_onnx_card(path: str | Path) -> OnnxCard:
    """The metadata of a kdpipe export, or a clear error for any other file."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path} does not exist")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ExportError(f"{path} is not an ONNX file ({_first_line(exc)})") from None
    entries = {p.key: p.value for p in model.metadata_props}
    if METADATA_KEY not in entries:
        raise ExportError(
            f"{path} is not a kdpipe export: it has no {METADATA_KEY!r} metadata "
            "(kdpipe export writes it)"
        )
    try:
        data = json.loads(entries[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise ExportError(f"{path}: the {METADATA_KEY!r} metadata is not JSON ({exc})") from None
    card = OnnxCard.from_dict(data, where=str(path))
    _load_weights(model, path)
    found = graph_weights_digest(model)
    if found != card.graph_weights_sha256:
        raise ExportError(
            f"{path}: its {METADATA_KEY!r} metadata was made for other weights (it records "
            f"graph weights {card.graph_weights_sha256[:16]}, this graph has {found[:16]}): "
            "the metadata was copied from another file or the graph was changed after export"
        )
    return card


def file_size_bytes(path: Path) -> int:
    """The model and any external-data file beside it (``.onnx.data``), as deployed."""
    path = Path(path)
    extra = path.with_name(path.name + ".data")
    return path.stat().st_size + (extra.stat().st_size if extra.is_file() else 0)


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote: the file, its card, its size and the float32 file's (the
    size an int8 file is compared with; 0 where no float32 file was made, after QAT)."""

    path: Path
    card: OnnxCard
    size_bytes: int
    fp32_size_bytes: int


def check_inputs(run_card: ModelCard, test_set: ImageSet, rows: int) -> torch.Tensor:
    """The first ``rows`` images of ``test_set`` as the normalised NCHW input of the file."""
    check_channels(run_card.architecture, run_card.data, test_set.images)
    images = test_set.images[:rows]
    return prepare_input(images, run_card.data, torch.device("cpu")).contiguous()


def write_checked(
    out: Path,
    build: Callable[[Path], tuple[Path, str, dict | None, dict, int]],
    run_card: ModelCard,
    run_dir: Path,
    overwrite: bool,
) -> ExportResult:
    """Build the file in a temporary folder beside ``out`` (``build`` exports, quantizes and
    checks it there), stamp the card, then move it into place: a failed export leaves
    ``out`` as it was."""
    import onnx

    out = Path(out)
    if out.is_dir() and not out.is_symlink():
        raise UsageError(f"{out} is a folder: --out names the .onnx file to write")
    # a file of the run's own folder (qat ships model.int8.onnx there) changes no input file
    inside = out.resolve().parent == Path(run_dir).resolve()
    guard_output(out, ONNX_FILE, overwrite=overwrite, inputs=[] if inside else [run_dir])
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as work:
        work = Path(work)
        final, fmt, quantization, check, fp32_size = build(work)
        bound = graph_weights_digest(onnx.load(str(final)))
        write_card(final, card_for(run_card, run_dir, fmt, quantization, check, bound))
        os.replace(final, out)
    card = read_onnx_card(out)
    return ExportResult(out, card, file_size_bytes(out), fp32_size)


def export_run(
    run_dir: Path,
    out: Path,
    *,
    data: str | None = None,
    data_root: Path = Path("data"),
    image_size: int | None = None,
    channels: int | None = None,
    resize: str | None = None,
    int8: bool = False,
    calibration_cache: str | None = None,
    calibration_rows: int = 512,
    calibration_method: str = "minmax",
    check_rows: int = 256,
    tolerance: float | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> ExportResult:
    """Export a finished run to ONNX, checked on test rows against PyTorch on the spot.

    With ``int8``, the float file is quantized statically by ONNX Runtime (QDQ,
    per-channel int8 weights, uint8 activations), calibrated on ``calibration_rows``
    rows of the training split: the transfer rows and stored views of the run's cache
    (or of ``calibration_cache``), never the test split.
    """
    from kdpipe.export.quantize import calibration_set, quantize_static_int8

    run_dir = Path(run_dir)
    run_card = read_card(run_dir)  # an unfinished or foreign run stops here
    if int8 and run_card.kind == "qat-student":
        raise UsageError(
            f"{run_dir} is a QAT run: its int8 file is {run_dir / 'model.int8.onnx'}, "
            "converted from the ranges it learned (kdpipe qat writes it); --int8 would "
            "calibrate it again"
        )
    if check_rows < 1:
        raise UsageError(f"--check-rows must be >= 1, not {check_rows}")
    model, run_card = load_model(run_dir)
    name = data or run_card.dataset["name"]
    if name is None:
        raise UsageError(f"{run_dir} was imported (no training dataset recorded): give --data "
                         "for the rows the export is checked on")  # fmt: skip
    from kdpipe.data.datasets import decode_options

    # decoded as the run's training data was (its card's dataset.decode) unless told
    decode = decode_options(run_card.dataset, str(run_dir), image_size=image_size,
                            channels=channels, resize=resize)  # fmt: skip
    load = {"data_root": Path(data_root), **decode}
    calibration = None
    if int8:  # every input checked before any work is written
        calibration = calibration_set(
            run_card, run_dir, calibration_cache, calibration_rows, seed=seed, **load
        )
    test_set = load_dataset(name, "test", **load)
    if not run_card.classes and run_card.num_classes == test_set.num_classes:
        # an imported teacher knows its classes by index: the file names them as the data does
        run_card = replace(run_card, classes=list(test_set.classes))
    differ = class_mismatch(test_set.classes, run_card.classes, f"{name} (test)", str(run_dir))
    if differ is not None:
        raise UsageError(differ)
    inputs = check_inputs(run_card, test_set, check_rows)
    reference = predict_logits(
        model, test_set.images[:check_rows], run_card.data, device=torch.device("cpu")
    )

    def build(work: Path) -> tuple[Path, str, dict | None, dict, int]:
        fp32 = work / "fp32.onnx"
        to_onnx(model, inputs[:2], fp32, f"{run_card.architecture} ({run_dir})")
        fp32_tolerance = FP32_TOLERANCE if tolerance is None or int8 else tolerance
        check = check_against(fp32, inputs, reference, fp32_tolerance, "PyTorch float32")
        if calibration is None:
            return fp32, "fp32", None, check, fp32.stat().st_size
        int8_path = work / "int8.onnx"
        quantization = quantize_static_int8(fp32, int8_path, calibration, calibration_method)
        quantization["fp32_check"] = check
        int8_tolerance = INT8_TOLERANCE if tolerance is None else tolerance
        check8 = check_against(int8_path, inputs, reference, int8_tolerance, "PyTorch float32")
        return int8_path, "int8-ptq", quantization, check8, fp32.stat().st_size

    return write_checked(out, build, run_card, run_dir, overwrite)
