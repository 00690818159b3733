"""Stage two for detection: a YOLO student trained over batches of :class:`DetectBatch`.

:func:`fit_student` is the loop, whichever source makes the batches (a cache's reader,
:class:`~kdpipe.tasks.detect.sources.OnlineBatches`, or
:class:`~kdpipe.tasks.detect.sources.ViewBatches` for hard labels): for each epoch, each
batch through the student in training mode, :class:`~kdpipe.tasks.detect.loss.StudentLoss`,
one optimizer step; a row of ``metrics.csv`` per epoch (its time and the mean of each loss
part). Ultralytics' own augmentation (mosaic, its random perspective, HSV, flips) is never
applied: the stored views are the augmentation, rendered by kdpipe's renderer, so a cached,
an online and a hard-label student see the same pixels. Ultralytics' trainer is not used
(it would augment and build its own batches); its loss and model are.

:func:`train_detection_student` makes the run directory (``runs.py``'s conventions:
``model.safetensors``, ``model.json`` with ``"kind": "student"``, plus ``config.json`` and
``metrics.csv``). A run is seeded (the student's initial weights, the views, the order of
rows) and deterministic on the CPU: the same seed gives the same weights.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from kdpipe.base.errors import UsageError
from kdpipe.base.runtime import prepare_output, quiet, resolve_device
from kdpipe.data.yolo import load_detection_split, read_data_yaml
from kdpipe.models.runs import CONFIG_FILE, METRICS_FILE, write_json
from kdpipe.tasks.detect.loss import DistillSettings, StudentLoss, anchors_of
from kdpipe.tasks.detect.runs import card_for, load_detection_run, save_detection_run
from kdpipe.tasks.detect.sources import OnlineBatches, ViewBatches
from kdpipe.tasks.detect.targets import DetectBatch
from kdpipe.tasks.detect.yolo import create_detector, with_loss_settings

OPTIMIZERS = ("sgd", "adamw")
DEFAULT_SIZE = 160


@dataclass(frozen=True, kw_only=True)
class DetectStudentConfig:
    """A detection student run: hard labels (``teacher`` None) or online distillation."""

    model: str  # an Ultralytics model YAML: yolo11n.yaml, yolo26n.yaml, ...
    data: str  # a data YAML
    out: str
    teacher: str | None = None  # a detection run directory, run on every batch
    epochs: int = 10
    image_size: int | None = None  # None: the teacher's, else DEFAULT_SIZE
    batch_size: int = 16
    views: int = 4  # views per image; view 0 the plain letterbox
    opt: str = "sgd"
    lr: float = 0.01  # Ultralytics' lr0
    final_lr: float = 0.01  # as a fraction of lr, reached linearly at the last epoch (lrf)
    momentum: float = 0.937
    weight_decay: float = 5e-4
    alpha: float = 0.5
    beta: float = 1.0
    temperature: float = 2.0
    positive: float = 0.5
    seed: int = 0
    device: str = "cpu"
    overwrite: bool = False

    def validate(self) -> None:
        if self.epochs < 1:
            raise UsageError(f"--epochs must be >= 1, not {self.epochs}")
        if self.image_size is not None and (self.image_size < 32 or self.image_size % 32):
            raise UsageError(f"--image-size must be a multiple of 32 (the largest stride), "
                             f"not {self.image_size}")  # fmt: skip
        if self.opt not in OPTIMIZERS:
            raise UsageError(f"--opt for a detection student is one of {', '.join(OPTIMIZERS)}, "
                             f"not {self.opt!r}")  # fmt: skip
        if self.views < 1 or self.batch_size < 1:
            raise UsageError("--views and --batch-size must be >= 1")
        if self.teacher is not None:
            self.settings().validate()

    def settings(self) -> DistillSettings:
        return DistillSettings(alpha=self.alpha, beta=self.beta, temperature=self.temperature,
                               positive=self.positive)  # fmt: skip

    @property
    def kind(self) -> str:
        return "student" if self.teacher is None else "online-student"


def optimizer_for(model: torch.nn.Module, opt: str, lr: float, momentum: float,
                  weight_decay: float) -> torch.optim.Optimizer:  # fmt: skip
    """SGD (Nesterov) or AdamW with weight decay on weights only, as Ultralytics groups them
    (no decay on biases and normalisation parameters)."""
    decayed = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    others = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decayed, "weight_decay": weight_decay},
              {"params": others, "weight_decay": 0.0}]  # fmt: skip
    if opt == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(momentum, 0.999))
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True)


def fit_student(
    model: torch.nn.Module,
    batches: Callable[[int], Iterable[DetectBatch]],
    config: DetectStudentConfig,
    run_dir: Path,
    log: Callable[[str], None] = quiet,
) -> list[dict]:
    """Train ``model`` for ``config.epochs`` epochs over ``batches(epoch)`` (1-based), one
    ``metrics.csv`` row per epoch in ``run_dir``: epoch, seconds, lr, batches, the mean
    loss and the mean of each part."""
    device = resolve_device(config.device)
    model = with_loss_settings(model).to(device)
    model.args.epochs = config.epochs  # an end-to-end head's one-to-many schedule reads it
    loss_of = StudentLoss(model, config.settings() if config.teacher else None)
    optimizer = optimizer_for(model, config.opt, config.lr, config.momentum, config.weight_decay)
    rows: list[dict] = []
    for epoch in range(1, config.epochs + 1):
        fraction = (epoch - 1) / max(config.epochs - 1, 1)  # Ultralytics' linear schedule
        lr = config.lr * (1 - fraction * (1 - config.final_lr))
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        started, sums, count = time.perf_counter(), {}, 0
        for batch in batches(epoch):
            batch = _on(batch, device)
            loss, parts = loss_of(model(batch.images), batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=10.0)  # as Ultralytics
            optimizer.step()
            count += 1
            for key, value in {"loss": float(loss.detach()), **parts}.items():
                sums[key] = sums.get(key, 0.0) + value
        loss_of.end_epoch()
        row = {"epoch": epoch, "seconds": round(time.perf_counter() - started, 3),
               "lr": lr, "batches": count,
               **{k: round(v / max(count, 1), 6) for k, v in sums.items()}}  # fmt: skip
        _append_metrics(run_dir / METRICS_FILE, row, first=epoch == 1)
        log(f"epoch {epoch}/{config.epochs}: loss {row.get('loss', float('nan')):.4f} "
            f"({row['seconds']:.1f} s)")  # fmt: skip
        rows.append(row)
    return rows


def _on(batch: DetectBatch, device: torch.device) -> DetectBatch:
    if device.type == "cpu":
        return batch
    teacher = batch.teacher.to(device) if batch.teacher is not None else None
    return DetectBatch(batch.images.to(device), batch.batch_idx, batch.cls, batch.bboxes,
                       teacher)  # fmt: skip


def _append_metrics(path: Path, row: dict, first: bool) -> None:
    with path.open("w" if first else "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if first:
            writer.writeheader()
        writer.writerow(row)


def train_detection_student(
    config: DetectStudentConfig, log: Callable[[str], None] = quiet
) -> Path:
    """Train a detection student on a data YAML's train split, from its hard labels or
    distilled online from ``config.teacher``, and write its run directory."""
    config.validate()
    data = read_data_yaml(config.data)
    train = load_detection_split(data, "train")
    teacher = teacher_card = None
    if config.teacher is not None:
        teacher, teacher_card = load_detection_run(Path(config.teacher))
        if list(teacher_card.classes) != list(data.names):
            raise UsageError(f"the teacher {config.teacher} predicts {teacher_card.classes} but "
                             f"{data.yaml_file} names {list(data.names)}")  # fmt: skip
    size = config.image_size or (teacher_card.image_size if teacher_card else DEFAULT_SIZE)
    torch.manual_seed(config.seed)  # the student's initial weights
    model = create_detector(config.model, len(data.names))
    if teacher_card is not None:
        _check_grid(model, teacher_card, size, config)
    out = Path(config.out)
    prepare_output(out, config.overwrite, [config.data, data.root, config.teacher])
    out.mkdir(parents=True)
    write_json(out / CONFIG_FILE, {"kind": config.kind, "task": "detect",
                                   **asdict(config), "image_size": size})  # fmt: skip
    views = ViewBatches(train, size, config.batch_size, config.views, config.seed)
    device = resolve_device(config.device)
    source = views if teacher is None else OnlineBatches(views, teacher.to(device), device)
    fit_student(model, source.epoch, config, out, log)
    lineage = {}
    if teacher_card is not None:
        lineage = {"teacher_run": str(config.teacher),
                   "teacher_weights_sha256": teacher_card.weights_sha256}  # fmt: skip
    record = {"kind": "online" if teacher is not None else "hard-labels",
              "architecture": config.model, "epochs": config.epochs, "seed": config.seed,
              "views": config.views}  # fmt: skip
    dataset = {"data_yaml": str(data.yaml_file), "split": "train",
               "fingerprint": train.fingerprint}  # fmt: skip
    card = card_for(model.cpu().eval(), kind="student", classes=list(data.names),
                    image_size=size, source=record, dataset=dataset, lineage=lineage)  # fmt: skip
    save_detection_run(out, model, card)
    return out


def _check_grid(model: torch.nn.Module, teacher_card, size: int, config) -> None:
    """The student's anchors must be the teacher's: refused before anything is written."""
    strides = [int(s) for s in model.stride.tolist()]
    ours = anchors_of(strides, size)
    theirs = anchors_of(teacher_card.strides, teacher_card.image_size)
    if strides != list(teacher_card.strides) or size != teacher_card.image_size:
        raise UsageError(
            f"{config.model} at {size} px has {ours} anchors (strides {strides}) but the "
            f"teacher {config.teacher} gives {theirs} at {teacher_card.image_size} px (strides "
            f"{teacher_card.strides}): a student needs the teacher's strides and image size"
        )
    head = model.model[-1]
    if head.reg_max > 1 and head.reg_max != teacher_card.reg_max:
        raise UsageError(f"{config.model} has reg_max {head.reg_max} but the teacher "
                         f"{config.teacher} has {teacher_card.reg_max}: DFL distributions of "
                         "different bins cannot be compared")  # fmt: skip


# the training commands' options a detection student takes, by their config field
OPTION_FIELDS = {"model": "model", "data": "data", "out": "out", "epochs": "epochs",
                 "image_size": "image_size", "batch_size": "batch_size", "opt": "opt",
                 "lr": "lr", "momentum": "momentum", "weight_decay": "weight_decay",
                 "seed": "seed", "device": "device", "overwrite": "overwrite",
                 "teacher": "teacher", "alpha": "alpha", "temperature": "temperature",
                 "views": "views", "box_weight": "beta",
                 "positive_score": "positive"}  # fmt: skip
DISTILLATION = ("alpha", "temperature", "box_weight", "positive_score")


def student_from_options(command: str, given: dict, log: Callable[[str], None] = quiet):
    """``train-student --hard-labels`` or ``distill-online`` on a data YAML: the options
    given on the command line (classification's defaults do not apply to a YOLO student;
    an option that has no meaning here is refused, named), trained, its card returned."""
    from kdpipe.base.flags import flag
    from kdpipe.tasks.detect.runs import read_detection_card

    given = {k: v for k, v in given.items() if k != "hard_labels" or v}
    hard = bool(given.pop("hard_labels", False))
    if command == "train-student" and not hard:
        raise UsageError("train-student on a data YAML needs --hard-labels (the views' "
                         "ground truth alone): this build has no reader of detection caches "
                         "yet")  # fmt: skip
    unknown = [flag(k) for k in given if k not in OPTION_FIELDS or (hard and k in DISTILLATION)]
    if unknown:
        what = "a hard-label detection student" if hard else "online detection distillation"
        raise UsageError(f"{', '.join(unknown)} does not apply to {what} (--data is a data "
                         "YAML)")  # fmt: skip
    required = ("model", "data", "epochs", "out") + (() if hard else ("teacher", "alpha",
                                                                        "temperature"))  # fmt: skip
    missing = [flag(k) for k in required if given.get(k) is None]
    if missing:
        raise UsageError(f"Missing option {', '.join(missing)} for a detection student")
    config = DetectStudentConfig(**{OPTION_FIELDS[k]: v for k, v in given.items()})
    return read_detection_card(train_detection_student(config, log))
