"""Run directories: what training writes and what cache-teacher and evaluate read.

A run directory holds

- ``config.json``: the resolved training configuration (written first),
- ``metrics.csv``: one row per epoch (appended as training goes),
- ``model.safetensors``: the weights,
- ``model.json``: the model card (architecture, data config, weights hash,
  dataset fingerprint, lineage). Written last: a directory without it is an
  unfinished run.

No pickle anywhere: weights are safetensors, metadata is JSON.
"""

from __future__ import annotations

import errno
import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdpipe.base.errors import ManifestError, RunDirError, UsageError
from kdpipe.base.runtime import prepare_output, software_versions
from kdpipe.base.spec import check_keys, check_object
from kdpipe.cache import utc_now
from kdpipe.data.datasets import class_mismatch
from kdpipe.models.pretrained import (
    Pretrained,
    create_pretrained,
    read_class_names,
    read_data_config,
)
from kdpipe.views.inputs import CROP_MODES, INTERPOLATIONS, DataConfig

if TYPE_CHECKING:  # for annotations: imported where they are used, so that a command
    # that reads records only loads no deep-learning library
    import torch
    from torch import nn

RUN_FORMAT_VERSION = 1
CARD_FILE = "model.json"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.csv"
KINDS = ("teacher", "student", "online-student", "qat-student")
EVAL_FIELDS = ("interpolation", "crop_pct", "crop_mode")  # optional: a pretrained model's


@dataclass(frozen=True, kw_only=True)
class ModelCard:
    """``model.json``: enough to rebuild the model and to know where it came from."""

    format_version: int
    kind: str
    architecture: str
    model_kwargs: dict
    num_classes: int
    in_chans: int
    classes: list
    data_config: dict
    weights_sha256: str
    param_count: int
    dataset: dict  # name, split, fingerprint
    lineage: dict | None  # students: cache_id, teacher_id, cache path; qat: qat_from too
    created: str
    software: dict
    selection: dict | None = None  # early stopping: kept_epoch, epochs_run, stopped_early
    # a pretrained teacher (import-teacher, train-teacher --pretrained): the SOURCE, its
    # pretrained_cfg, the weights file and its SHA-256 (pretrained.Pretrained.source)
    source: dict | None = None
    # the test result of the weights kept (epoch, test_accuracy, test_errors), as the run
    # recorded it on finishing: what ``report`` shows, whatever became of metrics.csv
    result: dict | None = None

    def to_dict(self) -> dict:
        data = asdict(self)
        for name in ("source", "result"):  # absent, not null: older cards keep their digests
            if data[name] is None:
                del data[name]
        return data

    @classmethod
    def from_dict(cls, data: Any, where: str) -> ModelCard:
        check_object(data, where)
        check_keys(data, cls, where)
        if data["format_version"] != RUN_FORMAT_VERSION:
            raise ManifestError(
                f"{where}: format_version {data['format_version']!r} is not supported"
            )
        if data["kind"] not in KINDS:
            raise ManifestError(f"{where}: kind {data['kind']!r} is not one of {', '.join(KINDS)}")
        for name, kind in (
            ("architecture", str),
            ("weights_sha256", str),
            ("num_classes", int),
            ("in_chans", int),
            ("model_kwargs", dict),
            ("data_config", dict),
            ("dataset", dict),
        ):
            if not isinstance(data[name], kind) or isinstance(data[name], bool):
                raise ManifestError(f"{where}: field {name!r} has type {type(data[name]).__name__}")
        _check_data_config(data["data_config"], data["in_chans"], where)
        return cls(**data)

    @property
    def data(self) -> DataConfig:
        return DataConfig.from_dict(self.data_config)


def _check_data_config(config: dict, in_chans: int, where: str) -> None:
    """input_size (channels, height, width) of positive integers, and a mean and a positive
    std per channel: what every model input is made with."""
    size, mean, std = (config.get(key) for key in ("input_size", "mean", "std"))

    def numbers(values: object, count: int) -> bool:
        return (
            isinstance(values, list)
            and len(values) == count
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        )

    if not (numbers(size, 3) and all(isinstance(v, int) and v >= 1 for v in size)):
        raise ManifestError(f"{where}: data_config input_size {size!r} is not [C, H, W] >= 1")
    if size[0] != in_chans:
        raise ManifestError(f"{where}: data_config has {size[0]} channel(s), in_chans {in_chans}")
    if not numbers(mean, in_chans) or not numbers(std, in_chans) or min(std) <= 0:
        raise ManifestError(
            f"{where}: data_config mean {mean!r} and std {std!r} need one value per channel "
            "(std > 0)"
        )
    interpolation, crop_pct, crop_mode = (config.get(k) for k in EVAL_FIELDS)
    if interpolation is not None and interpolation not in INTERPOLATIONS:
        raise ManifestError(f"{where}: data_config interpolation {interpolation!r} is not one "
                            f"of {', '.join(INTERPOLATIONS)}")  # fmt: skip
    if crop_pct is not None and not (numbers([crop_pct], 1) and 0 < crop_pct <= 4):
        raise ManifestError(f"{where}: data_config crop_pct {crop_pct!r} is not in (0, 4]")
    if crop_mode is not None and crop_mode not in CROP_MODES:
        raise ManifestError(f"{where}: data_config crop_mode {crop_mode!r} is not one of "
                            f"{', '.join(CROP_MODES)}")  # fmt: skip


def is_detection_run(path: Path, record_file: str = CARD_FILE) -> bool:
    """Whether ``path`` is a run directory whose ``model.json`` (or ``record_file``: an
    unfinished run has only its ``config.json``) says ``"task": "detect"`` (read as JSON
    only: telling the two tasks apart needs neither torch nor Ultralytics, so the commands
    that only read records stay light)."""
    try:
        record = json.loads((Path(path) / record_file).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("task") == "detect"


def write_json(path: Path, payload: dict) -> None:
    """Write JSON through a temporary file and a rename: never a half-written file."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    partial.replace(path)


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights as contiguous CPU tensors, the form safetensors stores."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def write_safetensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Write tensors through a temporary file and a rename, as write_json does JSON."""
    import safetensors.torch

    partial = path.with_name(f".{path.name}.partial")
    try:
        safetensors.torch.save_file(tensors, str(partial), metadata=metadata)
    except safetensors.SafetensorError as exc:  # e.g. no space left: the old file stays
        partial.unlink(missing_ok=True)
        raise OSError(errno.EIO, f"cannot write the weights ({exc})", str(path)) from None
    partial.replace(path)


def card_sha256(card: ModelCard) -> str:
    """SHA-256 of the card's canonical JSON: the weights file carries it, so that an edited
    model.json (its preprocessing, classes, architecture) is noticed when it is loaded."""
    text = json.dumps(card.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def save_model(run_dir: Path, model: nn.Module, card: ModelCard) -> None:
    """Weights first, then the card that marks the run complete."""
    metadata = {"weights_sha256": card.weights_sha256, "card_sha256": card_sha256(card)}
    write_safetensors(run_dir / WEIGHTS_FILE, cpu_state(model), metadata)
    write_json(run_dir / CARD_FILE, card.to_dict())


def read_config(run_dir: Path) -> dict:
    """A run's ``config.json``: the configuration it was started with."""
    try:
        return json.loads((Path(run_dir) / CONFIG_FILE).read_text())
    except FileNotFoundError:
        raise RunDirError(f"{run_dir} is not a kdpipe run directory (no {CONFIG_FILE})") from None
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{Path(run_dir) / CONFIG_FILE} is not valid JSON ({exc})") from None


def read_card(run_dir: Path) -> ModelCard:
    """The model card of a finished run, or a clear error naming what is wrong."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"run directory {run_dir} does not exist")
    card_path = run_dir / CARD_FILE
    if not card_path.is_file():
        if (run_dir / CONFIG_FILE).is_file():
            raise RunDirError(
                f"{run_dir} is an unfinished run (no {CARD_FILE}): training did not complete"
            )
        raise RunDirError(f"{run_dir} is not a kdpipe run directory (no {CARD_FILE})")
    try:
        data = json.loads(card_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{card_path} is not valid JSON ({exc})") from None
    return ModelCard.from_dict(data, where=str(card_path))


# safetensors' dtype codes as torch names them: the framing weights_sha256 hashes
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                       "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
                       "U8": "uint8", "BOOL": "bool"}  # fmt: skip


def stored_weights_sha256(path: Path) -> tuple[str, dict[str, str]]:
    """:func:`kdpipe.models.registry.weights_sha256` of the model whose state dict a
    safetensors file holds (each tensor's name, dtype, shape and little-endian bytes, in
    name order), read from the file's own framing, and the file's metadata. No torch: the
    commands that check records (``lineage``) re-hash weights without building a model."""
    import struct

    try:
        with open(path, "rb") as file:
            (size,) = struct.unpack("<Q", file.read(8))
            header = json.loads(file.read(size))
            start = 8 + size
            digest = hashlib.sha256()
            for name in sorted(k for k in header if k != "__metadata__"):
                entry = header[name]
                begin, end = entry["data_offsets"]
                dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
                digest.update(f"{name}|torch.{dtype}|{tuple(entry['shape'])}|".encode())
                file.seek(start + begin)
                data = file.read(end - begin)
                if len(data) != end - begin:
                    raise ValueError(f"{name} is cut short")
                digest.update(data)
    except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
        raise RunDirError(f"{path} cannot be read: {exc}") from None
    return digest.hexdigest(), dict(header.get("__metadata__") or {})


def check_weights(run_dir: Path) -> ModelCard:
    """A finished run's card, its weights file re-hashed against it and the card against
    the digest the file carries (what :func:`load_model` checks), without building the
    model."""
    run_dir = Path(run_dir)
    card = read_card(run_dir)
    weights = run_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise RunDirError(f"{run_dir} has {CARD_FILE} but no {WEIGHTS_FILE}")
    actual, metadata = stored_weights_sha256(weights)
    if actual != card.weights_sha256:
        raise RunDirError(
            f"{weights} does not match {CARD_FILE}: weights hash {actual[:16]}… "
            f"!= {card.weights_sha256[:16]}…"
        )
    recorded = metadata.get("card_sha256")
    if recorded is not None and recorded != card_sha256(card):
        raise RunDirError(
            f"{run_dir / CARD_FILE} was edited after training: it no longer matches the card "
            f"digest stored in {WEIGHTS_FILE}"
        )
    return card


def load_model(run_dir: Path, device: torch.device | str = "cpu") -> tuple[nn.Module, ModelCard]:
    """Rebuild a run's model through timm and load its weights, checking their hash."""
    import safetensors.torch
    import torch
    from kdpipe.models.registry import create_model, state_mismatch, weights_sha256

    run_dir = Path(run_dir)
    card = read_card(run_dir)
    weights = run_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise RunDirError(f"{run_dir} has {CARD_FILE} but no {WEIGHTS_FILE}")
    model = create_model(
        card.architecture,
        num_classes=card.num_classes,
        data_config=card.data,
        model_kwargs=_constructor_kwargs(card),
    )
    try:
        state = safetensors.torch.load_file(str(weights))
    except (OSError, safetensors.SafetensorError) as exc:
        raise RunDirError(f"{weights} cannot be read: {exc}") from None
    problem = state_mismatch(model, state)
    if problem:
        raise RunDirError(f"{weights} does not fit {card.architecture}: {problem}")
    model.load_state_dict(state)
    actual = weights_sha256(model)
    if actual != card.weights_sha256:
        raise RunDirError(
            f"{weights} does not match {CARD_FILE}: weights hash {actual[:16]}… "
            f"!= {card.weights_sha256[:16]}…"
        )
    with safetensors.safe_open(str(weights), framework="pt") as opened:
        recorded = (opened.metadata() or {}).get("card_sha256")
    # runs saved before the digest existed have none: their card is taken as it is
    if recorded is not None and recorded != card_sha256(card):
        raise RunDirError(
            f"{run_dir / CARD_FILE} was edited after training: it no longer matches the card "
            f"digest stored in {WEIGHTS_FILE} (its data_config, classes or architecture would "
            "change every output)"
        )
    # channels_last as the inputs (inputs.prepare_input): a convolution given NCHW weights
    # and NHWC inputs converts one of them on every call; MLPs are not affected
    return model.to(device).to(memory_format=torch.channels_last).eval(), card


def _constructor_kwargs(card: ModelCard) -> dict:
    """The card's model_kwargs without num_classes and in_chans, which the card records as
    fields of their own and create_model passes itself (teachers imported from a folder of
    timm's save_for_hf before kdpipe dropped them carry both in model_kwargs)."""
    kwargs = dict(card.model_kwargs)
    for key, value in (("num_classes", card.num_classes), ("in_chans", card.in_chans)):
        if key in kwargs and kwargs.pop(key) != value:
            raise RunDirError(f"{card.architecture}: model_kwargs {key} {kwargs.get(key)!r} "
                              f"is not the card's {key} {value}")  # fmt: skip
    return kwargs


def pretrained_card(pretrained: Pretrained, classes: list[str]) -> ModelCard:
    """The model card of a pretrained teacher: its own preprocessing, its weights' content
    hash, and where it came from (``source``); it was not trained on a dataset of kdpipe's
    (``dataset`` is empty). ``classes`` empty: the head's classes are known by index only."""
    from kdpipe.models.registry import param_count, weights_sha256

    model, data_config = pretrained.model, pretrained.data_config
    return ModelCard(
        format_version=RUN_FORMAT_VERSION,
        kind="teacher",
        architecture=pretrained.architecture,
        model_kwargs=dict(pretrained.model_kwargs),
        num_classes=int(model.num_classes),
        in_chans=data_config.input_size[0],
        classes=list(classes),
        data_config=data_config.to_dict(),
        weights_sha256=weights_sha256(model),
        param_count=param_count(model),
        dataset={"name": None, "split": None, "fingerprint": None},
        lineage=None,
        created=utc_now(),
        software=software_versions(),
        source=dict(pretrained.source),
    )


def open_pretrained(
    source: str,
    *,
    weights: Path | None = None,
    num_classes: int | None = None,
    classes_file: Path | None = None,
    data_config: dict | None = None,
    log: Callable[[str], None] = print,
) -> tuple[nn.Module, ModelCard]:
    """A SOURCE teacher and its card, in memory (cache-teacher imports one on the fly).

    Its class names are ``classes_file``'s, else the config's ``label_names`` (a folder
    of timm's save_for_hf, a hub model), else none (by index); both given must agree.
    ``data_config`` (timm's keys) replaces the pretrained_cfg's preprocessing; warnings
    (a weights file at the tag's preprocessing) go to ``log``."""
    import torch

    names = [] if classes_file is None else read_class_names(classes_file)
    if names and num_classes is not None and len(names) != num_classes:
        raise UsageError(f"{classes_file} names {len(names)} classes, --num-classes says "
                         f"{num_classes}")  # fmt: skip
    pretrained = create_pretrained(source, weights=weights, num_classes=num_classes or
                                   (len(names) or None), data_config=data_config)  # fmt: skip
    labels = list(pretrained.classes)
    if names and labels:
        differ = class_mismatch(names, labels, str(classes_file), f"{source}'s label_names")
        if differ:
            raise UsageError(differ)
    for warning in pretrained.warnings:
        log(warning)
    model = pretrained.model.cpu().to(memory_format=torch.contiguous_format)
    return model, pretrained_card(pretrained, names or labels)


def import_teacher(
    source: str,
    out: Path,
    *,
    weights: Path | None = None,
    num_classes: int | None = None,
    classes_file: Path | None = None,
    data_config: dict | None = None,
    data_config_file: Path | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> ModelCard:
    """``kdpipe import-teacher``: a teacher run directory (the contract of train-teacher's:
    model.safetensors and model.json with the weights' hash) from a pretrained SOURCE.

    The preprocessing is the pretrained_cfg's, with ``data_config_file``'s values (timm's
    data-config keys) and then ``data_config``'s in their place. Everything is read and
    checked before ``out`` is touched: a bad SOURCE, weights file or head size leaves an
    existing ``out`` as it was."""
    given = {} if data_config_file is None else read_data_config(data_config_file)
    given |= {k: v for k, v in (data_config or {}).items() if v is not None}
    model, card = open_pretrained(source, weights=weights, num_classes=num_classes,
                                  classes_file=classes_file, data_config=given,
                                  log=log)  # fmt: skip
    out = Path(out)
    prepare_output(out, overwrite, [weights, classes_file, data_config_file,
                                    *_local_dir(source)])  # fmt: skip
    out.mkdir(parents=True)
    save_model(out, model, card)
    return card


def _local_dir(source: str) -> list[str]:
    """A local-dir: SOURCE's folder, an input that the output may not touch."""
    return [source.split(":", 1)[1]] if source.startswith("local-dir:") else []
