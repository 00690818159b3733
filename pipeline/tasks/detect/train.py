"""Stage two for detection: a YOLO student trained over batches of :class:`DetectBatch`.

:func:`fit_student` is the loop, whichever source makes the batches (a cache's reader,
:class:`~kdpipe.tasks.detect.sources.OnlineBatches`, or
:class:`~kdpipe.tasks.detect.sources.ViewBatches` for hard labels): for each epoch, each
batch through the student in training mode, :class:`~kdpipe.tasks.detect.loss.StudentLoss`,
one optimizer step, and the step folded into an exponential moving average of the weights
(Ultralytics' ``ModelEMA``, which is what its own trainer validates and saves: a student's
saved weights are the average's); a row of ``metrics.csv`` per epoch (its time and the mean
of each loss part). The optimizer, its warm-up and the average follow Ultralytics' trainer
(:func:`optimizer_choice`, :func:`warmup`), except that a student steps after every batch
(Ultralytics accumulates gradients to a nominal batch of 64). Ultralytics' own augmentation
(mosaic, its random perspective, HSV, flips) is never applied: the stored views are the
augmentation, rendered by kdpipe's renderer, so a cached,
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
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from kdpipe.base.checks import memory_problem
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

OPTIMIZERS = ("auto", "sgd", "adamw")
DEFAULT_SIZE = 160
# Ultralytics' trainer defaults (ultralytics/cfg/default.yaml) a student shares with it
NOMINAL_BATCH = 64  # nbs: "auto" counts iterations in batches of at least this size
WARMUP_BIAS_LR = 0.1  # an SGD run's biases start here and fall to lr (auto: from 0)
WARMUP_MOMENTUM = 0.8
EMA_TAU = 2000.0  # ModelEMA's ramp: decay * (1 - exp(-updates / tau))


@dataclass(frozen=True, kw_only=True)
class DetectStudentConfig:
    """A detection student run: hard labels (neither ``teacher`` nor ``cache``), online
    distillation from ``teacher``, or distillation from a detection ``cache``."""

    model: str  # an Ultralytics model YAML: yolo11n.yaml, yolo26n.yaml, ...
    data: str  # a data YAML
    out: str
    teacher: str | None = None  # a detection run directory, run on every batch
    cache: str | None = None  # a detection cache of the data's train split (cache-teacher)
    cache_memory: int | None = None  # bytes of the cache's decoded chunks kept (None: all)
    epochs: int = 10
    image_size: int | None = None  # None: the teacher's or the cache's, else DEFAULT_SIZE
    batch_size: int = 16
    views: int = 4  # views per image; view 0 the plain letterbox (a cache: its own)
    view_seed: int | None = None  # the seed the views are drawn from (None: seed; a cache: its own)
    opt: str = "auto"  # Ultralytics' rule: AdamW at a fitted lr for short runs (optimizer_choice)
    lr: float | None = None  # lr0 for sgd / adamw [0.01]; auto chooses its own
    final_lr: float = 0.01  # as a fraction of lr, reached linearly at the last epoch (lrf)
    momentum: float | None = None  # sgd / adamw [0.937]; auto chooses its own
    weight_decay: float = 5e-4
    warmup_epochs: float = 3.0  # linear warm-up, in epochs counted in batches (0: none)
    ema_decay: float = 0.9999  # the weights' moving average (0: none, the last weights saved)
    ema_tau: float = EMA_TAU  # its ramp, in updates: ~tau updates before it averages much
    alpha: float = DistillSettings.alpha  # the distillation term's defaults are its own
    beta: float = DistillSettings.beta
    temperature: float = DistillSettings.temperature
    positive: float = DistillSettings.positive
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
        if problem := memory_problem(self.cache_memory):
            raise UsageError(problem)
        if self.opt == "auto" and (self.lr is not None or self.momentum is not None):
            raise UsageError("--lr and --momentum need --opt sgd or --opt adamw: --opt auto "
                             "(a detection student's default) chooses both, as Ultralytics' "
                             "trainer does")  # fmt: skip
        if self.warmup_epochs < 0 or not 0 <= self.ema_decay < 1 or not self.ema_tau > 0:
            raise UsageError(f"--warmup-epochs must be >= 0, --ema-decay in [0, 1) and --ema-tau "
                             f"> 0, not {self.warmup_epochs}, {self.ema_decay} and "
                             f"{self.ema_tau}")  # fmt: skip
        if self.view_seed is not None and (self.cache is not None or self.view_seed < 0):
            raise UsageError("--view-seed is a seed (>= 0) for a hard-label or online student; "
                             "a cached student replays its cache's views")  # fmt: skip
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


def optimizer_choice(
    config: DetectStudentConfig, num_classes: int, rows: int
) -> tuple[str, float, float]:
    """The optimizer, lr0 and momentum: ``--opt auto`` is Ultralytics' rule (its
    ``build_optimizer``): AdamW at lr 0.002 * 5 / (4 + nc), beta1 0.9, for a run of at most
    10,000 iterations counted in batches of at least 64, else SGD at 0.01 (Ultralytics
    would take its MuSGD there; kdpipe takes its SGD). Otherwise the options, 0.01 and 0.937
    where not given."""
    if config.opt != "auto":
        lr = config.lr if config.lr is not None else 0.01
        return config.opt, lr, config.momentum if config.momentum is not None else 0.937
    iterations = math.ceil(rows / max(config.batch_size, NOMINAL_BATCH)) * config.epochs
    if iterations > 10_000:
        return "sgd", 0.01, 0.9
    return "adamw", round(0.002 * 5 / (4 + num_classes), 6), 0.9


def optimizer_for(model: torch.nn.Module, opt: str, lr: float, momentum: float,
                  weight_decay: float) -> torch.optim.Optimizer:  # fmt: skip
    """SGD (Nesterov) or AdamW in Ultralytics' three groups: weights with decay, then
    normalisation weights and biases without (the biases are the group :func:`warmup`
    starts high)."""
    groups: dict[str, list] = {"weight": [], "norm": [], "bias": []}
    norms = tuple(v for k, v in vars(torch.nn).items() if "Norm" in k and isinstance(v, type))
    for module in model.modules():
        for name, parameter in module.named_parameters(recurse=False):
            if not parameter.requires_grad:
                continue
            key = "bias" if name == "bias" else "norm" if isinstance(module, norms) else "weight"
            groups[key].append(parameter)
    params = [{"params": groups["weight"], "weight_decay": weight_decay, "group": "weight"},
              {"params": groups["norm"], "weight_decay": 0.0, "group": "norm"},
              {"params": groups["bias"], "weight_decay": 0.0, "group": "bias"}]  # fmt: skip
    if opt == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(momentum, 0.999))
    return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=True)


def warmup(optimizer: torch.optim.Optimizer, step: int, steps: int, lr: float, momentum: float,
           bias_lr: float) -> None:  # fmt: skip
    """Ultralytics' warm-up at batch ``step`` (0-based, ``steps`` of them): every lr rises
    linearly from 0 to this epoch's ``lr``, the biases' falls from ``bias_lr`` to it, and
    SGD's momentum rises from 0.8 to ``momentum``; at ``step == steps`` all sit on their
    targets, where they stay."""
    for group in optimizer.param_groups:
        start = bias_lr if group.get("group") == "bias" else 0.0
        group["lr"] = float(np.interp(step, [0, steps], [start, lr]))
        if "momentum" in group:
            group["momentum"] = float(np.interp(step, [0, steps], [WARMUP_MOMENTUM, momentum]))


@dataclass(frozen=True)
class Schedule:
    """What the loop needs besides the config: the optimizer's lr0 and momentum, the batches
    in an epoch and the warm-up's length in batches (Ultralytics': its epochs times the
    batches, leaving at least the last epoch out of it)."""

    lr: float
    momentum: float
    batches: int
    warmup_steps: int
    bias_lr: float

    @classmethod
    def of(cls, config: DetectStudentConfig, lr: float, momentum: float, batches: int) -> Schedule:
        epochs = min(config.warmup_epochs, max(config.epochs - 1, 0))
        bias_lr = 0.0 if config.opt == "auto" else WARMUP_BIAS_LR
        return cls(lr, momentum, batches, round(epochs * batches), bias_lr)


def fit_student(
    model: torch.nn.Module,
    batches: Callable[[int], Iterable[DetectBatch]],
    config: DetectStudentConfig,
    run_dir: Path,
    log: Callable[[str], None] = quiet,
    resume: bool = False,
    *,
    rows_per_epoch: int,
) -> torch.nn.Module:
    """Train ``model`` for ``config.epochs`` epochs over ``batches(epoch)`` (1-based, of
    ``rows_per_epoch`` images), one ``metrics.csv`` row per epoch in ``run_dir``: epoch,
    seconds, lr, batches, the mean loss and the mean of each part; then a checkpoint (the
    weights, their average, the optimizer). With ``resume``, from the last one: the sources
    draw each epoch from its number and the seed, so nothing else is needed. Returns the
    model to save: the average of the weights, or the weights where ``ema_decay`` is 0."""
    device = resolve_device(config.device)
    model = with_loss_settings(model).to(device)
    model.args.epochs = config.epochs  # an end-to-end head's one-to-many schedule reads it
    loss_of = StudentLoss(model, config.settings() if config.distilled else None)
    opt, lr, momentum = optimizer_choice(config, int(model.model[-1].nc), rows_per_epoch)
    optimizer = optimizer_for(model, opt, lr, momentum, config.weight_decay)
    schedule = Schedule.of(config, lr, momentum, math.ceil(rows_per_epoch / config.batch_size))
    ema = average_of(model, config.ema_decay, config.ema_tau)
    state = model if ema is None else torch.nn.ModuleDict({"model": model, "ema": ema.ema})
    generator = torch.Generator().manual_seed(config.seed)  # the checkpoint's format keeps one
    rows: list[dict] = []
    done = 0
    if resume:
        done, rows = load_checkpoint(run_dir, state, optimizer, generator)
        for _ in range(done):  # replay the per-epoch loss schedule (YOLO26's one-to-many)
            loss_of.end_epoch()
        if ema is not None:
            ema.updates = sum(int(row["batches"]) for row in rows)
        _write_metrics(run_dir / METRICS_FILE, rows)  # drops a row written after the checkpoint
        log(f"resuming {run_dir} after epoch {done} of {config.epochs}")
    else:
        log(f"{opt} at lr {lr:g}, momentum {momentum:g}; warm-up {schedule.warmup_steps} "
            f"batches; " + ("no weight average" if ema is None else
                            f"weight average at decay {config.ema_decay:g}, ramp "
                            f"{config.ema_tau:g} updates"))  # fmt: skip
    for epoch in range(done + 1, config.epochs + 1):
        row = _epoch(model, optimizer, loss_of, batches(epoch), config, epoch, device, schedule,
                     ema)  # fmt: skip
        rows.append(row)
        _write_metrics(run_dir / METRICS_FILE, rows)
        save_checkpoint(run_dir, epoch, state, optimizer, generator, rows)
        kill_point("epochs", epoch)  # tests only (KDPIPE_TEST_KILL_AFTER)
        log(f"epoch {epoch}/{config.epochs}: loss {row.get('loss', float('nan')):.4f} "
            f"({row['seconds']:.1f} s)")  # fmt: skip
    return model if ema is None else ema.ema


def average_of(model: torch.nn.Module, decay: float, tau: float = EMA_TAU):
    """Ultralytics' ``ModelEMA`` of ``model`` (the detection room's own import), or None.
    Its decay after ``n`` updates is ``decay * (1 - exp(-n / tau))``: at Ultralytics' tau of
    2000 a run of a few hundred updates averages almost nothing (0.22 after 500)."""
    if decay == 0:
        return None
    from ultralytics.utils.torch_utils import ModelEMA

    return ModelEMA(model, decay=decay, tau=tau)


def _epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_of: StudentLoss,
           batches: Iterable[DetectBatch], config: DetectStudentConfig, epoch: int,
           device: torch.device, schedule: Schedule, ema) -> dict:  # fmt: skip
    """One epoch at Ultralytics' linear lr schedule, warmed up over its first batches; its
    ``metrics.csv`` row."""
    fraction = (epoch - 1) / max(config.epochs - 1, 1)
    lr = schedule.lr * (1 - fraction * (1 - config.final_lr))
    for group in optimizer.param_groups:
        group["lr"] = lr
    model.train()
    started, sums, count = time.perf_counter(), {}, 0
    for batch in batches:
        step = (epoch - 1) * schedule.batches + count
        if schedule.warmup_steps and step <= schedule.warmup_steps:
            warmup(optimizer, step, schedule.warmup_steps, lr, schedule.momentum,
                   schedule.bias_lr)  # fmt: skip
        batch = _on(batch, device)
        loss, parts = loss_of(model(batch.images), batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=10.0)  # as Ultralytics
        optimizer.step()
        if ema is not None:
            ema.update(model)
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
        cache = DetectionCache(config.cache, train, memory=config.cache_memory)
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
    # the seed that drew the views' parameters: the cache's, else told, else the run's own
    view_seed = (cache.manifest.seed if cache is not None
                 else config.seed if config.view_seed is None else config.view_seed)  # fmt: skip
    if cache is not None:
        source = CachedBatches(cache, config.batch_size, config.seed)
    else:
        source = ViewBatches(
            train, size, config.batch_size, config.views, config.seed, view_seed=view_seed
        )
        if teacher is not None:
            source = OnlineBatches(source, teacher.to(device), device)
    rows = len(cache) if cache is not None else len(train)
    model = fit_student(model, source.epoch, config, out, log, resume=resume, rows_per_epoch=rows)
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
              "seed": config.seed, "views": views, "view_seed": view_seed}  # fmt: skip
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
    saved = {**BEFORE_EMA, **saved}  # a run started before the warm-up and average resumes so
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


# a config.json saved before warm-up, the weights' average and --opt auto: the recipe it ran
BEFORE_EMA = {"warmup_epochs": 0.0, "ema_decay": 0.0, "opt": "sgd", "lr": 0.01,
              "momentum": 0.937}  # fmt: skip

# the training commands' options a detection student takes, by their config field
OPTION_FIELDS = {"model": "model", "data": "data", "out": "out", "epochs": "epochs",
                 "image_size": "image_size", "batch_size": "batch_size", "opt": "opt",
                 "lr": "lr", "momentum": "momentum", "weight_decay": "weight_decay",
                 "seed": "seed", "device": "device", "overwrite": "overwrite",
                 "teacher": "teacher", "cache": "cache", "alpha": "alpha",
                 "temperature": "temperature", "views": "views", "view_seed": "view_seed",
                 "box_weight": "beta",
                 "positive_score": "positive", "warmup_epochs": "warmup_epochs",
                 "ema_decay": "ema_decay", "ema_tau": "ema_tau",
                 "cache_memory": "cache_memory"}  # fmt: skip
DISTILLATION = ("alpha", "temperature", "box_weight", "positive_score", "cache", "cache_memory")


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
               or (cached and k in ("views", "view_seed"))]  # fmt: skip
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
