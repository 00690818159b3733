"""One training loop for teachers, hard-label baselines and distilled students.

A student never loads its teacher: its soft targets come from the cache, read
into memory once, indexed by the same sample ids as the images.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn
from tqdm.auto import tqdm

from pipeline.cache import SoftLabels, load_soft_labels
from pipeline.cache.store import utc_now
from pipeline.checkpoint import load_checkpoint, remove_checkpoint, save_checkpoint
from pipeline.data import ImageSet, describe_mismatch, load_dataset
from pipeline.errors import (
    CacheMismatchError,
    DatasetError,
    ManifestError,
    RunDirError,
    TrainingDivergedError,
    UsageError,
)
from pipeline.losses import distillation_loss
from pipeline.models import (
    DataConfig,
    create_model,
    param_count,
    resolve_model_kwargs,
    weights_sha256,
)
from pipeline.runs import (
    CARD_FILE,
    CONFIG_FILE,
    METRICS_FILE,
    RUN_FORMAT_VERSION,
    ModelCard,
    save_model,
    write_json,
)
from pipeline.runtime import (
    predict_logits,
    prepare_input,
    prepare_output,
    resolve_device,
    software_versions,
)

METRIC_COLUMNS = (
    "epoch",
    "lr",
    "loss",
    "hard_loss",
    "soft_loss",
    "train_accuracy",
    "test_accuracy",
    "test_errors",
    "seconds",
)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything a training run depends on; saved as ``config.json``."""

    model: str
    data: str
    out: str
    epochs: int
    data_root: str = "data"
    image_size: int | None = None
    channels: int | None = None
    batch_size: int = 128
    opt: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    sched: str = "cosine"
    warmup_epochs: int = 0
    seed: int = 0
    drop_rate: float = 0.0
    jitter: int = 0
    hidden_sizes: tuple[int, ...] | None = None
    device: str = "auto"
    overwrite: bool = False
    # distillation (train-student only)
    cache: str | None = None
    alpha: float = 1.0
    temperature: float | None = None

    def validate(self) -> None:
        checks = (
            (self.epochs >= 1, f"--epochs must be >= 1, not {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, not {self.batch_size}"),
            (self.lr > 0, f"--lr must be > 0, not {self.lr}"),
            (0.0 <= self.alpha <= 1.0, f"--alpha must be in [0, 1], not {self.alpha}"),
            (
                self.temperature is None or self.temperature > 0,
                f"--temperature must be > 0, not {self.temperature}",
            ),
            (0.0 <= self.drop_rate < 1.0, f"--dropout must be in [0, 1), not {self.drop_rate}"),
            (self.jitter >= 0, f"--jitter must be >= 0, not {self.jitter}"),
            (self.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, not {self.warmup_epochs}"),
        )
        for ok, message in checks:
            if not ok:
                raise UsageError(message)

    def load(self, split: str) -> ImageSet:
        return load_dataset(
            self.data,
            split,
            data_root=Path(self.data_root),
            image_size=self.image_size,
            channels=self.channels,
        )

    def model_kwargs(self) -> dict:
        return {"hidden_sizes": list(self.hidden_sizes)} if self.hidden_sizes else {}


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ±max_shift pixels, filling with zeros.

    Hinton et al. (2015) trained their MNIST teacher with input jitter of up
    to two pixels; this is that augmentation, on uint8 images before normalising.
    """
    if max_shift == 0:
        return images
    n, _, height, width = images.shape
    padded = torch.nn.functional.pad(images, (max_shift,) * 4)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(height))[:, :, None]  # (n, H, 1)
    cols = (dx[:, None] + torch.arange(width))[:, None, :]  # (n, 1, W)
    shifted = padded[torch.arange(n)[:, None, None], :, rows, cols]  # (n, H, W, C)
    return shifted.permute(0, 3, 1, 2).contiguous()


def _quiet(line: str) -> None:
    """The default logger: libraries print nothing unless asked to."""


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(-1) == labels).float().mean()) if len(labels) else float("nan")


def _load_test_set(config: TrainConfig, train_set: ImageSet) -> ImageSet | None:
    """The test split to report on each epoch; an image folder may have none."""
    try:
        test_set = config.load("test")
    except DatasetError:
        if config.data in ("fashion-mnist", "synthetic"):
            raise
        return None
    if test_set.classes != train_set.classes:
        raise DatasetError(f"{config.data}: train and test splits have different classes")
    return test_set


def fit(
    model: nn.Module,
    config: TrainConfig,
    train_set: ImageSet,
    test_set: ImageSet | None,
    data_config: DataConfig,
    device: torch.device,
    run_dir: Path,
    soft_targets: torch.Tensor | None = None,
    temperature: float = 1.0,
    log: Callable[[str], None] = _quiet,
    resume: bool = False,
) -> list[dict]:
    """Train ``model`` in place; one metrics row and one checkpoint per epoch in ``run_dir``.

    ``soft_targets`` are float32 log-probabilities ``(N, C)`` aligned with
    ``train_set`` (row i is sample i), or None for hard labels only. With
    ``resume``, training continues after the last checkpoint and ends exactly
    where an uninterrupted run would.
    """
    model.to(device).to(memory_format=torch.channels_last)
    optimizer = create_optimizer_v2(
        model,
        opt=config.opt,
        lr=config.lr,
        weight_decay=config.weight_decay,
        momentum=config.momentum,
    )
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=config.sched,
        num_epochs=config.epochs,
        warmup_epochs=config.warmup_epochs,
        warmup_lr=config.lr * 0.01,
    )
    generator = torch.Generator().manual_seed(config.seed)
    alpha = config.alpha if soft_targets is not None else 1.0
    done, rows = load_checkpoint(run_dir, model, optimizer, generator) if resume else (0, [])
    metrics_path = run_dir / METRICS_FILE
    with metrics_path.open("w", newline="") as f:  # rewritten: rows past the checkpoint go
        writer = csv.DictWriter(f, fieldnames=METRIC_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    if done:
        log(f"{run_dir}: resuming after epoch {done}")
    for epoch in range(done + 1, config.epochs + 1):
        started = time.perf_counter()
        model.train()
        order = torch.randperm(len(train_set), generator=generator)
        sums = {"loss": 0.0, "hard": 0.0, "soft": 0.0, "correct": 0.0}
        lr = optimizer.param_groups[0]["lr"]
        batches = range(0, len(order), config.batch_size)
        for start in tqdm(
            batches, desc=f"epoch {epoch}/{config.epochs}", disable=None, leave=False
        ):
            index = order[start : start + config.batch_size]
            images = random_shift(train_set.images[index], config.jitter, generator)
            inputs = prepare_input(images, data_config, device)
            labels = train_set.labels[index].to(device, non_blocking=True)
            targets = soft_targets[index].to(device) if soft_targets is not None else None
            logits = model(inputs)
            terms = distillation_loss(logits, labels, targets, alpha=alpha, temperature=temperature)
            optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            optimizer.step()
            # .item() syncs with the device; once per batch is cheap next to the step
            size = len(index)
            loss_value = terms["loss"].item()
            if not math.isfinite(loss_value):
                # stop at once: every later step would only spread the NaN, and a
                # run directory without model.json stays marked unfinished
                raise TrainingDivergedError(
                    f"training diverged in epoch {epoch}, batch {start // config.batch_size + 1}: "
                    f"the loss is {loss_value}; lower --lr (now {config.lr:g})"
                )
            sums["loss"] += loss_value * size
            sums["hard"] += terms["hard"].item() * size
            sums["soft"] += terms["soft"].item() * size if "soft" in terms else float("nan")
            sums["correct"] += (logits.argmax(-1) == labels).sum().item()
        scheduler.step(epoch)
        test_accuracy, test_errors = float("nan"), None
        if test_set is not None:
            logits = predict_logits(model, test_set.images, data_config, device=device)
            test_accuracy = accuracy(logits, test_set.labels)
            test_errors = int((logits.argmax(-1) != test_set.labels).sum())
        n = len(train_set)
        row = {
            "epoch": epoch,
            "lr": lr,
            "loss": sums["loss"] / n,
            "hard_loss": sums["hard"] / n,
            "soft_loss": sums["soft"] / n,
            "train_accuracy": sums["correct"] / n,
            "test_accuracy": test_accuracy,
            "test_errors": test_errors,
            "seconds": round(time.perf_counter() - started, 3),
        }
        rows.append(row)
        with metrics_path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=METRIC_COLUMNS).writerow(row)
        save_checkpoint(run_dir, epoch, model, optimizer, generator, rows)
        log(
            f"epoch {epoch}/{config.epochs}: loss {row['loss']:.4f}  "
            f"train acc {row['train_accuracy']:.4f}  test acc {test_accuracy:.4f}  "
            f"({row['seconds']:.1f}s)"
        )
    return rows


def _run(
    config: TrainConfig,
    kind: str,
    soft_labels: SoftLabels | None,
    log: Callable[[str], None],
    resume: bool = False,
) -> ModelCard:
    """Shared body of train_teacher, train_student and resume, after their own checks."""
    out = Path(config.out)
    device = resolve_device(config.device)
    train_set = config.load("train")
    temperature = 1.0
    lineage = None
    if soft_labels is not None:
        manifest = soft_labels.manifest
        expected = manifest.dataset["fingerprint"]
        if expected != train_set.fingerprint() or manifest.dataset["split"] != "train":
            raise CacheMismatchError(
                f"{soft_labels.path} was made from another dataset than {config.data} train: "
                + describe_mismatch(expected, train_set.fingerprint())
            )
        temperature = config.temperature or manifest.temperature
        lineage = {
            "cache_id": manifest.cache_id,
            "teacher_id": manifest.teacher_id,
            "cache_path": str(soft_labels.path),
            "teacher_runs": [member.run_dir for member in manifest.teachers],
            "cache_temperature": manifest.temperature,
            "temperature": temperature,
            "alpha": config.alpha,
        }
    test_set = _load_test_set(config, train_set)
    mean, std = train_set.pixel_stats()
    data_config = DataConfig(input_size=train_set.input_size, mean=mean, std=std)
    torch.manual_seed(config.seed)
    model = create_model(
        config.model,
        num_classes=train_set.num_classes,
        data_config=data_config,
        drop_rate=config.drop_rate,
        model_kwargs=config.model_kwargs(),
    )

    if not resume:
        prepare_output(out, config.overwrite)  # inputs are valid: only now touch the output
        out.mkdir(parents=True)
        resolved = {"device": str(device), "temperature": temperature}
        write_json(out / CONFIG_FILE, {**asdict(config), "kind": kind, "resolved": resolved})
    soft_targets = None
    if soft_labels is not None:
        soft_targets = soft_labels.log_probs(temperature)[:, 0, :]  # view 0: V = 1 for now
    fit(
        model,
        config,
        train_set,
        test_set,
        data_config,
        device,
        out,
        soft_targets=soft_targets,
        temperature=temperature,
        log=log,
        resume=resume,
    )
    model = model.cpu().to(memory_format=torch.contiguous_format)
    card = ModelCard(
        format_version=RUN_FORMAT_VERSION,
        kind=kind,
        architecture=config.model,
        model_kwargs=resolve_model_kwargs(config.model, data_config, config.model_kwargs()),
        num_classes=train_set.num_classes,
        in_chans=data_config.input_size[0],
        classes=list(train_set.classes),
        data_config=data_config.to_dict(),
        weights_sha256=weights_sha256(model),
        param_count=param_count(model),
        dataset={"name": train_set.name, "split": "train", "fingerprint": train_set.fingerprint()},
        lineage=lineage,
        created=utc_now(),
        software=software_versions(),
    )
    save_model(out, model, card)
    remove_checkpoint(out)
    return card


def train_teacher(config: TrainConfig, log: Callable[[str], None] = _quiet) -> ModelCard:
    """Train a model on hard labels and save it as a teacher run directory."""
    config.validate()
    if config.cache is not None:
        raise UsageError("train-teacher learns from labels; --cache is for train-student")
    return _run(config, "teacher", None, log)


def train_student(config: TrainConfig, log: Callable[[str], None] = _quiet) -> ModelCard:
    """Train a student from a cache: α·CE + (1−α)·T²·KL, never loading the teacher."""
    config.validate()
    if config.cache is None:
        raise UsageError("train-student needs --cache (a cache written by cache-teacher)")
    soft_labels = load_soft_labels(Path(config.cache))
    return _run(config, "student", soft_labels, log)


def resume_training(run_dir: Path, log: Callable[[str], None] = _quiet) -> ModelCard:
    """Continue an unfinished run from its last epoch checkpoint, with its saved config."""
    run_dir = Path(run_dir)
    if (run_dir / CARD_FILE).is_file():
        raise UsageError(f"{run_dir} is finished (it has {CARD_FILE}): nothing to resume")
    try:
        saved = json.loads((run_dir / CONFIG_FILE).read_text())
    except FileNotFoundError:
        raise RunDirError(f"{run_dir} is not a kdpipe run directory (no {CONFIG_FILE})") from None
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{run_dir / CONFIG_FILE} is not valid JSON ({exc})") from None
    kind = saved.pop("kind", None)
    saved.pop("resolved", None)
    names = {f.name for f in fields(TrainConfig)}
    if kind not in ("teacher", "student") or set(saved) != names:
        raise ManifestError(f"{run_dir / CONFIG_FILE} is not a kdpipe training configuration")
    if isinstance(saved["hidden_sizes"], list):
        saved["hidden_sizes"] = tuple(saved["hidden_sizes"])
    config = TrainConfig(**saved)
    config.validate()
    soft_labels = load_soft_labels(Path(config.cache)) if kind == "student" else None
    return _run(config, kind, soft_labels, log, resume=True)
