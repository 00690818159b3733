"""Detection run directories: a YOLO teacher trained by Ultralytics' own trainer, or an
Ultralytics checkpoint people already have, as a kdpipe run directory.

The directory is the classification one's shape: ``model.safetensors`` (the weights, with
their content hash and the card's hash in its metadata) and ``model.json``, the card, with
``"task": "detect"``: the architecture and its full YAML (so the model rebuilds offline
without the file), classes, strides, reg_max, the image size, the weights' content hash,
where the weights came from and, for a trained teacher, the data it was trained on.
A trained teacher also keeps Ultralytics' own record of its training (``ultralytics/``:
``results.csv`` and ``args.yaml``); its checkpoints are not kept (the safetensors file is
the one copy of the weights).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import safetensors.torch
import torch
from kdpipe.base.errors import DatasetError, ModelError, RunDirError, UsageError
from kdpipe.base.runtime import prepare_output, resolve_device
from kdpipe.data.imagefolder import file_digest
from kdpipe.data.yolo import DetectionData, load_detection_split, read_data_yaml
from kdpipe.models.registry import weights_sha256
from kdpipe.models.runs import (
    CARD_FILE,
    WEIGHTS_FILE,
    write_json,
    write_safetensors,
)
from kdpipe.tasks.detect.yolo import (
    create_detector,
    describe,
    load_checkpoint,
    rebuild,
    ultralytics,
    with_loss_settings,
)

CARD_FORMAT = 1
TRAINER_FOLDER = "ultralytics"


@dataclass(frozen=True, kw_only=True)
class DetectionCard:
    """model.json of a detection run (see the module docstring)."""

    task: str = "detect"
    format: int = CARD_FORMAT
    kind: str  # teacher (trained here or imported) or student
    architecture: str
    yaml: dict
    num_classes: int
    classes: list[str]
    strides: list[int]
    reg_max: int
    end2end: bool
    image_size: int
    weights_sha256: str
    source: dict
    dataset: dict | None = None
    lineage: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _versions() -> dict:
    package = ultralytics()
    return {"ultralytics": package.__version__, "torch": torch.__version__}


def _card_digest(card: DetectionCard) -> str:
    text = json.dumps(card.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _json_yaml(yaml: dict) -> dict:
    """The model's YAML dict as JSON keeps it (Ultralytics' dict holds only plain values)."""
    return json.loads(json.dumps(yaml, default=str))


def card_for(model: torch.nn.Module, *, kind: str, classes: list[str], image_size: int,
             source: dict, dataset: dict | None = None, lineage: dict | None = None,
             ) -> DetectionCard:  # fmt: skip
    info = describe(model)
    if len(classes) != info.num_classes:
        raise ModelError(f"the model's head has {info.num_classes} classes but "
                         f"{len(classes)} class names were given")  # fmt: skip
    return DetectionCard(kind=kind, architecture=info.architecture, yaml=_json_yaml(model.yaml),
                         num_classes=info.num_classes, classes=list(classes),
                         strides=list(info.strides), reg_max=info.reg_max, end2end=info.end2end,
                         image_size=int(image_size), weights_sha256=weights_sha256(model),
                         source=source, dataset=dataset, lineage=lineage or {},
                         versions=_versions())  # fmt: skip


def save_detection_run(run_dir: Path, model: torch.nn.Module, card: DetectionCard) -> None:
    """Weights first, then the card that marks the run complete (as ``runs.save_model``)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {"weights_sha256": card.weights_sha256, "card_sha256": _card_digest(card)}
    write_safetensors(run_dir / WEIGHTS_FILE, state, metadata)
    write_json(run_dir / CARD_FILE, card.to_dict())


def read_detection_card(run_dir: Path) -> DetectionCard:
    path = Path(run_dir) / CARD_FILE
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise RunDirError(f"{run_dir} is not a kdpipe run directory (no {CARD_FILE})") from None
    except (OSError, ValueError) as exc:
        raise RunDirError(f"cannot read {path}: {exc}") from None
    if not isinstance(record, dict) or record.get("task") != "detect":
        raise RunDirError(f"{run_dir} is a classification run, not a detection model "
                          "(model.json has no \"task\": \"detect\")")  # fmt: skip
    try:
        return DetectionCard(**record)
    except TypeError as exc:
        raise RunDirError(f"{path} does not follow the detection card's schema: {exc}") from None


def load_detection_run(run_dir: Path) -> tuple[torch.nn.Module, DetectionCard]:
    """The model of a detection run directory in eval mode, its weights' hash checked
    against the card (an edited card or a swapped weights file is an error)."""
    card = read_detection_card(run_dir)
    weights = Path(run_dir) / WEIGHTS_FILE
    try:
        with safetensors.safe_open(str(weights), "pt") as opened:
            metadata = opened.metadata() or {}
        state = safetensors.torch.load_file(str(weights))
    except (OSError, safetensors.SafetensorError) as exc:
        raise RunDirError(f"cannot read the weights {weights}: {exc}") from None
    if metadata.get("card_sha256") != _card_digest(card):
        raise RunDirError(f"{run_dir}/{CARD_FILE} changed since the weights were written "
                          "(its digest is not the one in model.safetensors)")  # fmt: skip
    model = rebuild(card.yaml, card.num_classes)
    model.load_state_dict(state, strict=True)
    if weights_sha256(model) != card.weights_sha256:
        raise RunDirError(f"the weights of {run_dir} do not match model.json's hash")
    return with_loss_settings(model.float().eval()), card


def _ultralytics_yaml(data: DetectionData, folder: Path) -> Path:
    """A copy of the data YAML with absolute folders, for Ultralytics' trainer (a relative
    ``path:`` would be resolved against its own datasets folder, not the YAML's)."""
    import yaml

    record = {"path": str(data.root.resolve()), "names": dict(enumerate(data.names))}
    for split, images in data.splits.items():
        record[split] = str(images.resolve())
    path = folder / "data.yaml"
    path.write_text(yaml.safe_dump(record, sort_keys=False))
    return path


def check_image_size(size: int, option: str = "--image-size") -> None:
    """A detector's square input must be a multiple of its largest stride (32)."""
    if size < 32 or size % 32:
        raise UsageError(f"{option} must be a multiple of 32 (the largest stride), not {size}")


@dataclass(frozen=True, kw_only=True)
class DetectionTeacherConfig:
    model: str  # an Ultralytics model YAML: yolo11s.yaml, ...
    data: str  # a data YAML
    out: str
    epochs: int = 30
    image_size: int = 160
    batch_size: int = 32
    lr: float | None = None  # None: Ultralytics' own (lr0 0.01, SGD/AdamW by its 'auto')
    workers: int = 0
    seed: int = 0
    device: str = "cpu"
    overwrite: bool = False

    def validate(self) -> None:
        if self.epochs < 1:
            raise UsageError(f"--epochs must be >= 1, not {self.epochs}")
        check_image_size(self.image_size)


def train_detection_teacher(config: DetectionTeacherConfig) -> Path:
    """Train a YOLO teacher with Ultralytics' own trainer on the data YAML's train split
    (validated on its val split), then write it as a kdpipe run directory."""
    config.validate()
    data = read_data_yaml(config.data)
    train = load_detection_split(data, "train")
    if "val" not in data.splits:
        raise DatasetError(f"{data.yaml_file} names no val folder: Ultralytics' trainer "
                           "validates on it")  # fmt: skip
    out = Path(config.out)
    prepare_output(out, config.overwrite, [config.data, data.root])
    package = ultralytics()
    create_detector(config.model, len(data.names))  # a bad architecture fails here, named
    with tempfile.TemporaryDirectory(prefix="kdpipe-yolo-") as work:
        work = Path(work)
        overrides = dict(data=str(_ultralytics_yaml(data, work)), epochs=config.epochs,
                         imgsz=config.image_size, batch=config.batch_size,
                         workers=config.workers, seed=config.seed, deterministic=True,
                         device=config.device, amp=False, plots=False, verbose=False,
                         project=str(work), name="train", exist_ok=True)  # fmt: skip
        if config.lr is not None:
            overrides.update(lr0=config.lr, optimizer="SGD")
        package.YOLO(config.model).train(**overrides)  # its trainer builds nc from the data
        trained = work / "train"
        best = trained / "weights" / "best.pt"
        model, _ = load_checkpoint(best if best.is_file() else trained / "weights" / "last.pt")
        out.mkdir(parents=True)
        (out / TRAINER_FOLDER).mkdir()
        for name in ("results.csv", "args.yaml"):
            if (trained / name).is_file():
                shutil.copy2(trained / name, out / TRAINER_FOLDER / name)
    source = {"kind": "ultralytics-train", "architecture": config.model,
              "epochs": config.epochs, "seed": config.seed}  # fmt: skip
    dataset = {"data_yaml": str(data.yaml_file), "split": "train",
               "fingerprint": train.fingerprint}  # fmt: skip
    card = card_for(model, kind="teacher", classes=list(data.names),
                    image_size=config.image_size, source=source, dataset=dataset)  # fmt: skip
    save_detection_run(out, model, card)
    return out


def import_detection_teacher(
    checkpoint: str | Path, out: str | Path, *, image_size: int | None = None,
    overwrite: bool = False,
) -> Path:  # fmt: skip
    """An Ultralytics checkpoint (``best.pt``) as a teacher run directory: its classes
    from the checkpoint's names, its image size from its training arguments unless
    ``image_size`` is given."""
    checkpoint = Path(checkpoint)
    model, others = load_checkpoint(checkpoint)
    names = getattr(model, "names", None) or {}
    classes = [names[i] for i in sorted(names)] if isinstance(names, dict) else list(names)
    trained_at = (others.get("train_args") or {}).get("imgsz")
    size = image_size or (trained_at if isinstance(trained_at, int) else None)
    if size is None:
        raise UsageError(f"{checkpoint} does not record its image size: pass --image-size")
    out = Path(out)
    prepare_output(out, overwrite, [checkpoint])
    source = {"kind": "ultralytics-checkpoint", "checkpoint": str(checkpoint),
              "checkpoint_sha256": file_digest(checkpoint),
              "ultralytics_version": others.get("version")}  # fmt: skip
    card = card_for(model, kind="teacher", classes=classes, image_size=size, source=source)
    out.mkdir(parents=True)
    save_detection_run(out, model, card)
    return out


# train-teacher's options a detection teacher takes, by their config field
TEACHER_OPTIONS = ("model", "data", "out", "epochs", "image_size", "batch_size", "lr", "seed",
                   "device", "overwrite", "workers")  # fmt: skip
ULTRALYTICS_SOURCE = "ultralytics:"


def teacher_from_options(given: dict) -> DetectionCard:
    """``train-teacher --data DATA.yaml``: the options given on the command line (an option
    with no meaning for Ultralytics' trainer is refused, named), trained, its card returned."""
    from kdpipe.base.flags import flag

    unknown = [flag(k) for k, v in given.items() if k not in TEACHER_OPTIONS and v is not None]
    if unknown:
        raise UsageError(f"{', '.join(unknown)} does not apply to a detection teacher (--data "
                         "is a data YAML: Ultralytics' own trainer trains it)")  # fmt: skip
    missing = [flag(k) for k in ("model", "data", "epochs", "out") if given.get(k) is None]
    if missing:
        raise UsageError(f"Missing option {', '.join(missing)} for a detection teacher")
    if not str(given["model"]).endswith((".yaml", ".yml")):
        raise UsageError(f"--model for a detection teacher is an Ultralytics model YAML "
                         f"(yolo11s.yaml, yolo26n.yaml, ...), not {given['model']!r}")  # fmt: skip
    values = {k: v for k, v in given.items() if v is not None}
    if "device" in values:  # Ultralytics names a GPU by its index
        device = resolve_device(values["device"])
        values["device"] = "cpu" if device.type == "cpu" else str(device.index or 0)
    config = DetectionTeacherConfig(**values)
    return read_detection_card(train_detection_teacher(config))


def import_from_source(source: str, out: str | Path, given: dict) -> DetectionCard:
    """``import-teacher ultralytics:PATH.pt``: the checkpoint as a teacher run directory;
    ``given`` are import-teacher's other options, of which only ``input_size`` and
    ``overwrite`` apply (any other given is refused, named)."""
    from kdpipe.base.flags import flag

    path = source[len(ULTRALYTICS_SOURCE) :]
    if not path:
        raise UsageError("ultralytics:PATH needs the checkpoint's path (ultralytics:best.pt)")
    unknown = [flag(k) for k, v in given.items()
               if k not in ("input_size", "overwrite") and v not in (None, False)]  # fmt: skip
    if unknown:
        raise UsageError(f"{', '.join(unknown)} does not apply to an Ultralytics checkpoint "
                         "(its classes, preprocessing and head are its own; --input-size sets "
                         "the image size)")  # fmt: skip
    size = given.get("input_size")
    if size is not None:
        check_image_size(size, "--input-size")
    run = import_detection_teacher(path, out, image_size=size,
                                   overwrite=bool(given.get("overwrite")))  # fmt: skip
    return read_detection_card(run)
