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
rows) and deterministic on the CPU: the same seed gives the same weights. Every epoch ends
with a checkpoint (:mod:`kdpipe.train.checkpoint`, no pickle), so a killed run continues
with :func:`resume_detection_student` (``train-student --resume RUN_DIR``) to the weights it
would have reached uninterrupted.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from kdpipe.base.errors import ManifestError, UsageError
from kdpipe.base.runtime import kill_point, prepare_output, quiet, resolve_device
from kdpipe.data.datasets import class_mismatch
from kdpipe.data.yolo import load_detection_split, read_data_yaml
from kdpipe.models.runs import CONFIG_FILE, METRICS_FILE, write_json
from kdpipe.tasks.detect.cache import DetectionCache
from kdpipe.tasks.detect.loss import DistillSettings, StudentLoss, anchors_of
from kdpipe.tasks.detect.runs import (
    card_for,
    check_image_size,
    load_detection_run,
    save_detection_run,
)
from kdpipe.tasks.detect.sources import CachedBatches, OnlineBatches, ViewBatches
from kdpipe.tasks.detect.targets import DetectBatch
from kdpipe.tasks.detect.yolo import create_detector, with_loss_settings
from kdpipe.train.checkpoint import (
    load_checkpoint,
    refuse_finished,
    remove_checkpoint,
    save_checkpoint,
)

OPTIMIZERS = ("sgd", "adamw")
DEFAULT_SIZE = 160


@dataclass(frozen=True, kw_only=True)
class DetectStudentConfig:
    """A detection student run: hard labels (neither ``teacher`` nor ``cache``), online
    distillation from ``teacher``, or distillation from a detection ``cache``."""

    model: str  # an Ultralytics model YAML: yolo11n.yaml, yolo26n.yaml, ...
    data: str  # a data YAML
    out: str
    teacher: str | None = None  # a detection run directory, run on every batch
    cache: str | None = None  # a detection cache of the data's train split (cache-teacher)
    epochs: int = 10
    image_size: int | None = None  # None: the teacher's or the cache's, else DEFAULT_SIZE
    batch_size: int = 16
    views: int = 4  # views per image; view 0 the plain letterbox (a cache: its own)
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
        if self.image_size is not None:
            check_image_size(self.image_size)
        if self.opt not in OPTIMIZERS:
            raise UsageError(f"--opt for a detection student is one of {', '.join(OPTIMIZERS)}, "
                             f"not {self.opt!r}")  # fmt: skip
        if self.views < 1 or self.batch_size < 1:
            raise UsageError("--views and --batch-size must be >= 1")
        if self.teacher is not None and self.cache is not None:
            raise UsageError("a detection student learns from --teacher (online) or from "
                             "--cache, not both")  # fmt: skip
        if self.distilled:
            self.settings().validate()

    def settings(self) -> DistillSettings:
        return DistillSettings(alpha=self.alpha, beta=self.beta, temperature=self.temperature,
                               positive=self.positive)  # fmt: skip

    @property
    def distilled(self) -> bool:
        return self.teacher is not None or self.cache is not None

    @property
    def kind(self) -> str:
        return "online-student" if self.teacher is not None else "student"


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
    resume: bool = False,
) -> list[dict]:
    """Train ``model`` for ``config.epochs`` epochs over ``batches(epoch)`` (1-based), one
    ``metrics.csv`` row per epoch in ``run_dir``: epoch, seconds, lr, batches, the mean
    loss and the mean of each part; then a checkpoint. With ``resume``, from the last one:
    the sources draw each epoch from its number and the seed, so nothing else is needed."""
    device = resolve_device(config.device)
    model = with_loss_settings(model).to(device)
    model.args.epochs = config.epochs  # an end-to-end head's one-to-many schedule reads it
    loss_of = StudentLoss(model, config.settings() if config.distilled else None)
    optimizer = optimizer_for(model, config.opt, config.lr, config.momentum, config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)  # the checkpoint's format keeps one
    rows: list[dict] = []
    done = 0
    if resume:
        done, rows = load_checkpoint(run_dir, model, optimizer, generator)
        for _ in range(done):  # replay the per-epoch loss schedule (YOLO26's one-to-many)
            loss_of.end_epoch()
        _write_metrics(run_dir / METRICS_FILE, rows)  # drops a row written after the checkpoint
        log(f"resuming {run_dir} after epoch {done} of {config.epochs}")
    for epoch in range(done + 1, config.epochs + 1):
        row = _epoch(model, optimizer, loss_of, batches(epoch), config, epoch, device)
        rows.append(row)
        _write_metrics(run_dir / METRICS_FILE, rows)
        save_checkpoint(run_dir, epoch, model, optimizer, generator, rows)
        kill_point("epochs", epoch)  # tests only (KDPIPE_TEST_KILL_AFTER)
        log(f"epoch {epoch}/{config.epochs}: loss {row.get('loss', float('nan')):.4f} "
            f"({row['seconds']:.1f} s)")  # fmt: skip
    return rows


def _epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_of: StudentLoss,
           batches: Iterable[DetectBatch], config: DetectStudentConfig, epoch: int,
           device: torch.device) -> dict:  # fmt: skip
    """One epoch at Ultralytics' linear lr schedule; its ``metrics.csv`` row."""
    fraction = (epoch - 1) / max(config.epochs - 1, 1)
    lr = config.lr * (1 - fraction * (1 - config.final_lr))
    for group in optimizer.param_groups:
        group["lr"] = lr
    model.train()
    started, sums, count = time.perf_counter(), {}, 0
    for batch in batches:
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
    means = {k: round(v / max(count, 1), 6) for k, v in sums.items()}
    seconds = round(time.perf_counter() - started, 3)
    return {"epoch": epoch, "seconds": seconds, "lr": lr, "batches": count, **means}


def _on(batch: DetectBatch, device: torch.device) -> DetectBatch:
    if device.type == "cpu":
        return batch
    teacher = batch.teacher.to(device) if batch.teacher is not None else None
    return DetectBatch(batch.images.to(device), batch.batch_idx, batch.cls, batch.bboxes,
                       teacher)  # fmt: skip


def _write_metrics(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["epoch"])
        writer.writeheader()
        writer.writerows(rows)


def train_detection_student(
    config: DetectStudentConfig, log: Callable[[str], None] = quiet, resume: bool = False
) -> Path:
    """Train a detection student on a data YAML's train split, from its hard labels,
    distilled online from ``config.teacher`` or from ``config.cache``, and write its run
    directory. Everything is checked before anything is written: the teacher's (or the
    cache's) classes against the data's, its grid against the student's, a cache's data
    fingerprint against the data on disk."""
    config.validate()
    data = read_data_yaml(config.data)
    train = load_detection_split(data, "train")
    teacher = teacher_card = cache = None
    if config.teacher is not None:
        teacher, teacher_card = load_detection_run(Path(config.teacher))
        grid = Grid(f"the teacher {config.teacher}", teacher_card.strides, teacher_card.image_size,
                    teacher_card.reg_max, list(teacher_card.classes))  # fmt: skip
    elif config.cache is not None:
        cache = DetectionCache(config.cache, train)
        m = cache.manifest
        grid = Grid(f"the cache {config.cache}", m.strides, m.image_size, m.reg_max,
                    list(m.classes))  # fmt: skip
    else:
        grid = None
    if grid is not None and (mismatch := class_mismatch(grid.classes, data.names, grid.name,
                                                        str(data.yaml_file))):  # fmt: skip
        raise UsageError(mismatch)
    size = config.image_size or (grid.image_size if grid else DEFAULT_SIZE)
    torch.manual_seed(config.seed)  # the student's initial weights
    model = create_detector(config.model, len(data.names))
    if grid is not None:
        _check_grid(model, grid, size, config)
    out = Path(config.out)
    views = cache.num_views if cache is not None else config.views
    if not resume:
        prepare_output(out, config.overwrite, [config.data, data.root, config.teacher,
                                               config.cache])  # fmt: skip
        out.mkdir(parents=True)
        write_json(out / CONFIG_FILE, {"kind": config.kind, "task": "detect", **asdict(config),
                                       "image_size": size, "views": views})  # fmt: skip
    device = resolve_device(config.device)
    if cache is not None:
        source = CachedBatches(cache, config.batch_size, config.seed)
    else:
        source = ViewBatches(train, size, config.batch_size, config.views, config.seed)
        if teacher is not None:
            source = OnlineBatches(source, teacher.to(device), device)
    fit_student(model, source.epoch, config, out, log, resume=resume)
    lineage = {}
    if teacher_card is not None:
        lineage = {"teacher_run": str(config.teacher),
                   "teacher_weights_sha256": teacher_card.weights_sha256}  # fmt: skip
    elif cache is not None:
        lineage = {"cache": str(config.cache), "cache_id": cache.manifest.cache_id,
                   "teacher_id": cache.manifest.teacher_id,
                   "teacher_weights_sha256": cache.manifest.teacher["weights_sha256"]}  # fmt: skip
    kind = "online" if teacher is not None else "cache" if cache is not None else "hard-labels"
    record = {"kind": kind, "architecture": config.model, "epochs": config.epochs,
              "seed": config.seed, "views": views}  # fmt: skip
    dataset = {"data_yaml": str(data.yaml_file), "split": "train",
               "fingerprint": train.fingerprint}  # fmt: skip
    card = card_for(model.cpu().eval(), kind="student", classes=list(data.names),
                    image_size=size, source=record, dataset=dataset, lineage=lineage)  # fmt: skip
    save_detection_run(out, model, card)
    remove_checkpoint(out)  # a finished run keeps its model, not its resume state
    return out


def resume_detection_student(run_dir: Path, log: Callable[[str], None] = quiet) -> Path:
    """Continue the unfinished detection student in ``run_dir`` from its last epoch
    checkpoint, with its saved ``config.json`` (its inputs found by the paths saved there),
    checked again as a new run is (the cache's data against the data on disk)."""
    run_dir = Path(run_dir)
    refuse_finished(run_dir)
    try:
        saved = json.loads((run_dir / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{run_dir / CONFIG_FILE} cannot be read ({exc})") from None
    names = {f.name for f in fields(DetectStudentConfig)}
    if saved.get("task") != "detect" or not {"model", "data", "out"} <= saved.keys():
        raise ManifestError(f"{run_dir / CONFIG_FILE} is not a detection student's "
                            "configuration")  # fmt: skip
    config = DetectStudentConfig(**{**{k: v for k, v in saved.items() if k in names},
                                    "out": str(run_dir), "overwrite": False})  # fmt: skip
    return train_detection_student(config, log, resume=True)


@dataclass(frozen=True)
class Grid:
    """What a student must share with the outputs it learns from (a teacher's or a cache's)."""

    name: str  # "the teacher RUN" or "the cache PATH", for messages
    strides: list
    image_size: int
    reg_max: int
    classes: list


def _check_grid(model: torch.nn.Module, grid: Grid, size: int, config) -> None:
    """The student's anchors must be the teacher's: refused before anything is written."""
    strides = [int(s) for s in model.stride.tolist()]
    ours = anchors_of(strides, size)
    theirs = anchors_of(grid.strides, grid.image_size)
    if strides != list(grid.strides) or size != grid.image_size:
        raise UsageError(
            f"{config.model} at {size} px has {ours} anchors (strides {strides}) but "
            f"{grid.name} gives {theirs} at {grid.image_size} px (strides {grid.strides}): a "
            "student needs the teacher's strides and image size"
        )
    head = model.model[-1]
    if head.reg_max > 1 and head.reg_max != grid.reg_max:
        raise UsageError(f"{config.model} has reg_max {head.reg_max} but {grid.name} has "
                         f"{grid.reg_max}: DFL distributions of different bins cannot be "
                         "compared")  # fmt: skip


# the training commands' options a detection student takes, by their config field
OPTION_FIELDS = {"model": "model", "data": "data", "out": "out", "epochs": "epochs",
                 "image_size": "image_size", "batch_size": "batch_size", "opt": "opt",
                 "lr": "lr", "momentum": "momentum", "weight_decay": "weight_decay",
                 "seed": "seed", "device": "device", "overwrite": "overwrite",
                 "teacher": "teacher", "cache": "cache", "alpha": "alpha",
                 "temperature": "temperature", "views": "views", "box_weight": "beta",
                 "positive_score": "positive"}  # fmt: skip
DISTILLATION = ("alpha", "temperature", "box_weight", "positive_score", "cache")


def student_from_options(command: str, given: dict, log: Callable[[str], None] = quiet):
    """``train-student --cache`` or ``--hard-labels``, or ``distill-online``, on a data YAML:
    the options given on the command line (classification's defaults do not apply to a YOLO student;
    an option that has no meaning here is refused, named), trained, its card returned."""
    from kdpipe.base.flags import flag
    from kdpipe.tasks.detect.runs import read_detection_card

    given = {k: v for k, v in given.items() if k != "hard_labels" or v}
    hard = bool(given.pop("hard_labels", False))
    cached = command == "train-student" and not hard
    if cached and given.get("cache") is None:
        raise UsageError("train-student on a data YAML needs --cache (a detection cache of its "
                         "train split, from cache-teacher) or --hard-labels (the views' ground "
                         "truth alone)")  # fmt: skip
    unknown = [flag(k) for k in given if k not in OPTION_FIELDS or (hard and k in DISTILLATION)
               or (cached and k == "views")]  # fmt: skip
    if unknown:
        what = (
            "a hard-label detection student"
            if hard
            else "a cached detection student (the cache's views are its own)"
            if cached
            else "online detection distillation"
        )
        raise UsageError(f"{', '.join(unknown)} does not apply to {what} (--data is a data "
                         "YAML)")  # fmt: skip
    distilled = ("cache",) if cached else ("teacher",)
    required = ("model", "data", "epochs", "out") + (() if hard else (*distilled, "alpha",
                                                                        "temperature"))  # fmt: skip
    missing = [flag(k) for k in required if given.get(k) is None]
    if missing:
        raise UsageError(f"Missing option {', '.join(missing)} for a detection student")
    config = DetectStudentConfig(**{OPTION_FIELDS[k]: v for k, v in given.items()})
    return read_detection_card(train_detection_student(config, log))
