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

import json
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from pipeline.errors import ManifestError, RunDirError
from pipeline.models import DataConfig, create_model, weights_sha256

RUN_FORMAT_VERSION = 1
CARD_FILE = "model.json"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.csv"
KINDS = ("teacher", "student", "online-student", "qat-student")


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

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str) -> ModelCard:
        if not isinstance(data, dict):
            raise ManifestError(f"{where}: expected a JSON object")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        optional = {f.name for f in fields(cls) if f.default is not MISSING}
        missing = sorted(names - set(data) - optional)
        if unknown or missing:
            problems = [f"unknown field(s) {', '.join(unknown)}"] if unknown else []
            problems += [f"missing field(s) {', '.join(missing)}"] if missing else []
            raise ManifestError(f"{where}: {'; '.join(problems)}")
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
        return cls(**data)

    @property
    def data(self) -> DataConfig:
        return DataConfig.from_dict(self.data_config)


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
    partial = path.with_name(f".{path.name}.partial")
    safetensors.torch.save_file(tensors, str(partial), metadata=metadata)
    partial.replace(path)


def save_model(run_dir: Path, model: nn.Module, card: ModelCard) -> None:
    """Weights first, then the card that marks the run complete."""
    metadata = {"weights_sha256": card.weights_sha256}
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


def load_model(run_dir: Path, device: torch.device | str = "cpu") -> tuple[nn.Module, ModelCard]:
    """Rebuild a run's model through timm and load its weights, checking their hash."""
    run_dir = Path(run_dir)
    card = read_card(run_dir)
    weights = run_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise RunDirError(f"{run_dir} has {CARD_FILE} but no {WEIGHTS_FILE}")
    model = create_model(
        card.architecture,
        num_classes=card.num_classes,
        data_config=card.data,
        model_kwargs=card.model_kwargs,
    )
    try:
        state = safetensors.torch.load_file(str(weights))
        model.load_state_dict(state)
    except (OSError, RuntimeError, safetensors.SafetensorError) as exc:
        raise RunDirError(f"{weights} cannot be loaded into {card.architecture}: {exc}") from None
    actual = weights_sha256(model)
    if actual != card.weights_sha256:
        raise RunDirError(
            f"{weights} does not match {CARD_FILE}: weights hash {actual[:16]}… "
            f"!= {card.weights_sha256[:16]}…"
        )
    # channels_last as the inputs (runtime.prepare_input): a convolution given NCHW weights
    # and NHWC inputs converts one of them on every call; MLPs are not affected
    return model.to(device).to(memory_format=torch.channels_last).eval(), card
