"""One training loop for teachers, hard-label baselines and distilled students.

A student never loads its teacher: its soft targets come from the cache, read
into memory once, indexed by the same sample ids as the images.
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import MISSING, asdict, dataclass, fields, replace
from pathlib import Path

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from pipeline.cache import SoftLabels
from pipeline.cache.store import utc_now
from pipeline.cache.stream import (
    StreamedRows,
    StreamedSoftLabels,
    chunk_plan,
    open_soft_labels,
    windowed_order,
)
from pipeline.checkpoint import (
    load_best,
    load_checkpoint,
    remove_checkpoint,
    save_best,
    save_checkpoint,
)
from pipeline.data import (
    ImageSet,
    describe_mismatch,
    load_dataset,
    select_rows,
    validation_rows,
)
from pipeline.distributed import SINGLE, World, current_world
from pipeline.errors import (
    CacheMismatchError,
    DatasetError,
    ManifestError,
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
    load_model,
    read_config,
    save_model,
    write_json,
)
from pipeline.runtime import (
    PRECISIONS,
    autocast,
    predict_logits,
    prepare_output,
    resolve_device,
    software_versions,
)
from pipeline.views import (
    CROP_SCALE,
    PLAIN,
    ViewPolicy,
    sample_views,
    view_input,
    view_schedule,
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
    "val_accuracy",
    "val_errors",
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
    eval_every: int = 1  # test-set evaluation every N epochs (and after the last)
    val_fraction: float | None = None  # hold out these rows of train (validation_rows)
    early_stopping: int | None = None  # stop after N evaluations without a better val score
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
    subset: float | None = None  # train on these rows (select_rows), not with a cache
    subset_seed: int = 0
    augment: str = "none"  # fresh random views each step (not from a cache)
    mix: str = "none"
    mix_alpha: float = 1.0
    crop_scale: tuple[float, float] = CROP_SCALE
    device: str = "auto"
    precision: str = "auto"  # bf16 autocast on CUDA, float32 on the CPU (runtime.autocast)
    workers: int = 0  # DataLoader worker processes that build batches ahead
    overwrite: bool = False
    # distillation: from a cache (train-student) or online from a teacher (distill-online)
    cache: str | None = None
    cache_memory: int | None = None  # bytes: a larger cache is streamed (cache.stream)
    teacher: str | None = None
    alpha: float = 1.0
    temperature: float | None = None

    def validate(self) -> None:
        checks = (
            (self.epochs >= 1, f"--epochs must be >= 1, not {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, not {self.batch_size}"),
            (self.eval_every >= 1, f"--eval-every must be >= 1, not {self.eval_every}"),
            (self.lr > 0, f"--lr must be > 0, not {self.lr}"),
            (0.0 <= self.alpha <= 1.0, f"--alpha must be in [0, 1], not {self.alpha}"),
            (
                self.temperature is None or self.temperature > 0,
                f"--temperature must be > 0, not {self.temperature}",
            ),
            (0.0 <= self.drop_rate < 1.0, f"--dropout must be in [0, 1), not {self.drop_rate}"),
            (self.jitter >= 0, f"--jitter must be >= 0, not {self.jitter}"),
            (self.workers >= 0, f"--workers must be >= 0, not {self.workers}"),
            (
                self.cache_memory is None or self.cache_memory > 0,
                f"--cache-memory must be > 0, not {self.cache_memory}",
            ),
            (
                self.precision in PRECISIONS,
                f"--precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}",
            ),
            (self.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, not {self.warmup_epochs}"),
            (
                self.val_fraction is None or 0.0 < self.val_fraction < 1.0,
                f"--val-fraction must be in (0, 1), not {self.val_fraction}",
            ),
            (
                self.early_stopping is None or self.early_stopping >= 1,
                f"--early-stopping must be >= 1, not {self.early_stopping}",
            ),
            (
                self.early_stopping is None or self.val_fraction is not None,
                "--early-stopping watches the validation rows: give --val-fraction too",
            ),
        )
        for ok, message in checks:
            if not ok:
                raise UsageError(message)
        self.policy.validate()
        if self.jitter and not self.policy.is_identity:
            raise UsageError("--jitter and --augment/--mix both augment: choose one")

    @property
    def policy(self) -> ViewPolicy:
        return ViewPolicy(self.augment, self.mix, self.mix_alpha, self.crop_scale)

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


def random_shift(
    images: torch.Tensor,
    max_shift: int,
    generator: torch.Generator,
    *,
    size: int | None = None,
    share: slice = slice(None),
) -> torch.Tensor:
    """Translate each image by up to ±max_shift pixels, filling with zeros.

    Hinton et al. (2015) trained their MNIST teacher with input jitter of up
    to two pixels; this is that augmentation, on uint8 images before normalising.
    ``images`` may be the ``share`` of a batch of ``size``: shifts are drawn for
    all ``size`` images and the share's are applied.
    """
    if max_shift == 0:
        return images
    n, _, height, width = images.shape
    size = n if size is None else size
    padded = torch.nn.functional.pad(images, (max_shift,) * 4)
    dy = torch.randint(0, 2 * max_shift + 1, (size,), generator=generator)[share]
    dx = torch.randint(0, 2 * max_shift + 1, (size,), generator=generator)[share]
    rows = (dy[:, None] + torch.arange(height))[:, :, None]  # (n, H, 1)
    cols = (dx[:, None] + torch.arange(width))[:, None, :]  # (n, 1, W)
    shifted = padded[torch.arange(n)[:, None, None], :, rows, cols]  # (n, H, W, C)
    return shifted.permute(0, 3, 1, 2).contiguous()


def _quiet(line: str) -> None:
    """The default logger: libraries print nothing unless asked to."""


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(-1) == labels).float().mean()) if len(labels) else float("nan")


def _load_test_set(config: TrainConfig, classes: tuple[str, ...]) -> ImageSet | None:
    """The test split to report on each epoch; an image folder may have none, or none
    with labels (then there is nothing to score)."""
    try:
        test_set = config.load("test")
    except DatasetError:
        if config.data in ("fashion-mnist", "synthetic"):
            raise
        return None
    if not test_set.labeled:
        return None
    if test_set.classes != tuple(classes):
        raise DatasetError(
            f"{config.data}: the test split's classes differ from the model's "
            f"({', '.join(test_set.classes)} != {', '.join(classes)})"
        )
    return test_set


@dataclass(frozen=True)
class TrainData:
    """What one epoch iterates over: rows of a dataset, with their soft targets and views.

    Row ``r`` is dataset sample ``rows[r]``. With stored ``views`` (a cache's),
    row r uses view ``view_schedule(...)[r]`` in each epoch, its soft target is
    the teacher's output for exactly that view; without them, ``policy`` draws
    fresh views for every batch (or none, for the plain images).
    """

    images: torch.Tensor  # uint8 (N, C, H, W): the whole dataset
    dataset_labels: torch.Tensor  # (N,): partners' labels come from here
    rows: torch.Tensor  # (R,) int64 dataset indices
    labels: torch.Tensor  # (R,) int64, -1 where unknown
    # per-view arrays: tensors, or StreamedRows read chunk by chunk from a large cache
    targets: torch.Tensor | StreamedRows | None = None  # (R, V, C) teacher log-probabilities
    views: torch.Tensor | StreamedRows | None = None  # (R, V, 10) stored view parameters
    partners: torch.Tensor | StreamedRows | None = None  # (R, V) dataset indices, -1: no mix
    policy: ViewPolicy = PLAIN

    @classmethod
    def plain(cls, dataset: ImageSet, policy: ViewPolicy = PLAIN) -> TrainData:
        rows = torch.arange(len(dataset))
        return cls(dataset.images, dataset.labels, rows, dataset.labels, policy=policy)

    def __len__(self) -> int:
        return len(self.rows)

    def epoch_order(self, generator: torch.Generator, seed: int, epoch: int) -> torch.Tensor:
        """The order of the epoch's rows: a permutation drawn from the loop's generator, or,
        for a streamed cache, chunks in a random order and rows shuffled within windows
        of chunks (:func:`windowed_order`), so that reads stay whole chunks."""
        streamed = next(
            (a for a in (self.targets, self.views) if isinstance(a, StreamedRows)), None
        )
        if streamed is None:
            return torch.randperm(len(self), generator=generator)
        reader = streamed.reader
        order = windowed_order(streamed.rows, reader.chunk_size, reader.window, seed, epoch)
        reader.plan = chunk_plan(streamed.rows, order, reader.chunk_size)  # read ahead in it
        return order

    def on_device(self, device: torch.device, jitter: int) -> TrainData | None:
        """This data moved whole onto a GPU, or None where that does not pay or cannot be.

        On CUDA a small model's step is bound by the host: per-batch gathers, pinning
        and copies cost more than the step itself. Plain images and their soft targets
        (a fixed-teacher cache, hard labels) are then moved once and gathered on the
        GPU. Stored or fresh views and jitter are drawn and rendered from host-side
        parameters and keep the host path (pinned, non-blocking copies), as do caches
        that are streamed or would take more than a quarter of the free GPU memory.
        """
        tensors = (self.images, self.dataset_labels, self.rows, self.labels, self.targets)
        if (
            device.type != "cuda"
            or self.views is not None
            or not self.policy.is_identity
            or jitter
            or not all(t is None or isinstance(t, torch.Tensor) for t in tensors)
        ):
            return None
        size = sum(t.element_size() * t.nelement() for t in tensors if t is not None)
        free, _ = torch.cuda.mem_get_info(device)
        if size > free // 4:
            return None

        def moved(values: torch.Tensor | None) -> torch.Tensor | None:
            return None if values is None else values.to(device)

        return replace(
            self,
            images=moved(self.images),
            dataset_labels=moved(self.dataset_labels),
            rows=moved(self.rows),
            labels=moved(self.labels),
            targets=moved(self.targets),
        )

    def without(self, held_out: torch.Tensor) -> TrainData:
        """These rows minus the dataset indices ``held_out`` (a validation split)."""
        keep = ~torch.isin(self.rows, held_out)

        def kept(values: torch.Tensor | None) -> torch.Tensor | None:
            return None if values is None else values[keep]

        return replace(
            self,
            rows=self.rows[keep],
            labels=self.labels[keep],
            targets=kept(self.targets),
            views=kept(self.views),
            partners=kept(self.partners),
        )

    def batch(
        self,
        positions: torch.Tensor,
        epoch: int,
        batch_index: int,
        seed: int,
        data_config: DataConfig,
        device: torch.device,
        jitter: int = 0,
        generator: torch.Generator | None = None,
        share: slice = slice(None),
    ) -> dict[str, torch.Tensor | None]:
        """Model input, labels, mix and soft targets for training rows ``positions``:
        :meth:`gather`, then :meth:`to_model`."""
        gathered = self.gather(positions, epoch, batch_index, seed, share)
        return self.to_model(gathered, data_config, device, jitter, generator)

    def gather(
        self,
        positions: torch.Tensor,
        epoch: int,
        batch_index: int,
        seed: int,
        share: slice = slice(None),
    ) -> dict[str, torch.Tensor | None]:
        """CPU tensors of one batch: uint8 images, view parameters, partners, labels, soft
        targets; ``share`` picks this process's rows of it (under torchrun).

        Everything is a function of (seed, epoch, rows): the same call returns
        the same batch in another process, after a resume, in a DataLoader
        worker, so workers can build batches ahead of the training step.
        """
        params = partners = targets = None
        if self.views is not None:
            chosen = view_schedule(len(self), self.views.shape[1], seed, epoch)[positions]
            params = self.views[positions, chosen]
            partners = self.partners[positions, chosen]
            if self.targets is not None:
                targets = self.targets[positions, chosen]
        else:
            if self.targets is not None:
                targets = self.targets[positions, 0]
            if not self.policy.is_identity:
                fresh, fresh_partners = sample_views(
                    len(positions),
                    1,
                    self.policy,
                    image_size=tuple(self.images.shape[-2:]),
                    partner_pool=self.rows.numpy(),
                    seed=[seed, epoch, batch_index],
                )
                params = torch.from_numpy(fresh[:, 0])
                partners = torch.from_numpy(fresh_partners[:, 0])
        size = len(positions)
        positions = positions[share]
        params = None if params is None else params[share]
        partners = None if partners is None else partners[share]
        mixed = partners is not None and bool((partners >= 0).any())
        return {
            "images": self.images[self.rows[positions]],
            "params": params,
            "partner_images": self.images[partners.clamp_min(0)] if mixed else None,
            "labels": self.labels[positions],
            "partner_labels": self.dataset_labels[partners.clamp_min(0)] if mixed else None,
            "lam": params[:, 5].contiguous() if mixed else None,
            "targets": None if targets is None else targets[share],
            "size": torch.tensor(size),  # the whole batch's: jitter is drawn for all of it
            "share": torch.tensor([share.start or 0, share.step or 1]),
        }

    @staticmethod
    def to_model(
        gathered: dict[str, torch.Tensor | None],
        data_config: DataConfig,
        device: torch.device,
        jitter: int = 0,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor | None]:
        """The model's input and the loss's tensors on ``device`` (non-blocking copies, from
        pinned memory when a DataLoader pinned them). ``jitter`` (plain images only)
        shifts the images with ``generator``, the training loop's, as Hinton et al.'s
        input jitter: drawn for the whole batch, so that every process's generator
        stays in step."""
        images, params = gathered["images"], gathered["params"]
        if jitter and params is None:
            start, step = (int(v) for v in gathered["share"])
            images = random_shift(
                images,
                jitter,
                generator,
                size=int(gathered["size"]),
                share=slice(start, None, step),
            )

        def moved(name: str) -> torch.Tensor | None:
            value = gathered[name]
            return None if value is None else value.to(device, non_blocking=True)

        return {
            "inputs": view_input(images, params, gathered["partner_images"], data_config, device),
            "labels": moved("labels"),
            "partner_labels": moved("partner_labels"),
            "lam": moved("lam"),
            "targets": moved("targets"),
        }


def fit(
    model: nn.Module,
    config: TrainConfig,
    data: TrainData,
    test_set: ImageSet | None,
    data_config: DataConfig,
    device: torch.device,
    run_dir: Path,
    temperature: float = 1.0,
    log: Callable[[str], None] = _quiet,
    resume: bool = False,
    online_teacher: nn.Module | None = None,
    validation: ImageSet | None = None,
    world: World = SINGLE,
) -> list[dict]:
    """Train ``model`` in place; one metrics row and one checkpoint per epoch in ``run_dir``.

    Soft targets come from ``data.targets`` (a cache), from ``online_teacher``
    through timm's ``LogitDistillationTask`` (the online reference), or not at
    all (hard labels). ``validation`` rows are scored with the test set; with
    ``config.early_stopping`` training stops once that many evaluations in a row
    did not beat the best, and ``model`` ends with the best epoch's weights.
    With ``resume``, training continues after the last checkpoint and ends
    exactly where an uninterrupted run would.

    Under torchrun (``world``), the model is wrapped in DistributedDataParallel
    and kdpipe's own sampler shares out each batch: every rank draws the same
    permutation (one seed), takes every ``world.size``-th row of each batch of
    ``config.batch_size``, and weights its loss by its share, so the averaged
    gradient is the whole batch's. Order, views and batches are then those of a
    single process; only batch statistics (BatchNorm) and dropout masks differ.
    Rank 0 evaluates and writes every file.
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
    amp = autocast(device, config.precision)
    resident = data.on_device(device, config.jitter)
    alpha = config.alpha if data.targets is not None or online_teacher is not None else 1.0
    task = None
    if online_teacher is not None:
        task = _online_task(model, online_teacher, alpha, temperature, device)
    done, rows = load_checkpoint(run_dir, model, optimizer, generator) if resume else (0, [])
    trainer = model
    if world.active:
        device_ids = None
        if device.type == "cuda":  # "cuda" is this rank's GPU: current_world made it current
            device_ids = [device.index if device.index is not None else torch.cuda.current_device()]
        trainer = DistributedDataParallel(model, device_ids=device_ids)
    metrics_path = run_dir / METRICS_FILE
    if world.is_main:
        with metrics_path.open("w", newline="") as f:  # rewritten: rows past the checkpoint go
            writer = csv.DictWriter(f, fieldnames=METRIC_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
    if done:
        log(f"{run_dir}: resuming after epoch {done}")

    patience = config.early_stopping

    def end_epoch(epoch: int, lr: float, sums: dict, started: float) -> dict:
        """Score the epoch, append its metrics row, save the checkpoint (rank 0's work)."""
        test_accuracy, test_errors = float("nan"), None
        scored = epoch % config.eval_every == 0 or epoch == config.epochs
        if test_set is not None and scored:
            test_accuracy, test_errors = _score(model, test_set, data_config, device)
        val_accuracy, val_errors = float("nan"), None
        if validation is not None and scored:
            val_accuracy, val_errors = _score(model, validation, data_config, device)
        n = len(data)
        row = {
            "epoch": epoch,
            "lr": lr,
            "loss": sums["loss"] / n,
            "hard_loss": sums["hard"] / n,
            "soft_loss": sums["soft"] / n,
            "train_accuracy": sums["correct"] / sums["labeled"] if sums["labeled"] else math.nan,
            "test_accuracy": test_accuracy,
            "test_errors": test_errors,
            "val_accuracy": val_accuracy,
            "val_errors": val_errors,
            "seconds": round(time.perf_counter() - started, 3),
        }
        rows.append(row)
        with (run_dir / METRICS_FILE).open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=METRIC_COLUMNS).writerow(row)
        if patience is not None and early_stop(rows, patience)[0] == epoch:
            save_best(run_dir, model)  # before the checkpoint that counts on it
        save_checkpoint(run_dir, epoch, model, optimizer, generator, rows)
        validated = f"  val acc {val_accuracy:.4f}" if validation is not None else ""
        log(
            f"epoch {epoch}/{config.epochs}: loss {row['loss']:.4f}  "
            f"train acc {row['train_accuracy']:.4f}  test acc {test_accuracy:.4f}{validated}  "
            f"({row['seconds']:.1f}s)"
        )
        return row

    for epoch in range(done + 1, config.epochs + 1):
        if patience is not None:  # also stops a resumed run that had already stopped
            best_epoch, stop = early_stop(rows, patience)
            if stop:
                log(f"early stopping after epoch {epoch - 1}: the best validation score was "
                    f"epoch {best_epoch}'s, {patience} evaluation(s) ago or more")  # fmt: skip
                break
        started = time.perf_counter()
        model.train()
        if task is not None:
            task.train()
        order = data.epoch_order(generator, config.seed, epoch)
        sums = torch.zeros(len(SUM_KEYS), dtype=torch.float64, device=device)
        nan = torch.tensor(math.nan, dtype=torch.float64, device=device)
        first_bad = torch.tensor([-1.0, 0.0], dtype=torch.float64, device=device)
        lr = optimizer.param_groups[0]["lr"]
        if resident is not None:
            order = order.to(device)  # batches are then sliced and gathered on the GPU
        batches = EpochBatches(
            resident if resident is not None else data,
            order,
            config.batch_size,
            epoch,
            config.seed,
            world,
        )
        for batch_index, gathered in enumerate(
            tqdm(
                batches.load(
                    config.workers if resident is None else 0,
                    pin_memory=device.type == "cuda" and resident is None,
                ),
                total=len(batches),
                desc=f"epoch {epoch}/{config.epochs}",
                disable=None if world.is_main else True,
                leave=False,
            )
        ):
            weight = float(gathered["weight"])
            batch = data.to_model(gathered, data_config, device, config.jitter, generator)
            labels = batch["labels"]
            if task is not None:
                with amp:
                    output = task(batch["inputs"], _soft_one_hot(batch, model.num_classes))
                logits = output["output"].float()
                terms = {"loss": output["loss"].float(), "hard": output["task_loss"].float(),
                         "soft": output["kd_loss"].float() / temperature**2}  # fmt: skip
            else:
                with amp:
                    logits = trainer(batch["inputs"])
                logits = logits.float()  # the loss in float32, whatever the forward's precision
                terms = distillation_loss(
                    logits,
                    labels,
                    batch["targets"],
                    alpha=alpha,
                    temperature=temperature,
                    partner_labels=batch["partner_labels"],
                    lam=batch["lam"],
                )
            optimizer.zero_grad(set_to_none=True)
            (terms["loss"] * weight if world.active else terms["loss"]).backward()
            optimizer.step()
            # accounted on the device, read once per epoch: a .item() per step would make
            # the host wait for every step before it prepares the next batch
            size = len(labels) if weight else 0
            known = (labels >= 0) & (weight > 0)
            loss = terms["loss"].detach().double()
            sums += torch.stack([
                loss * size,
                terms["hard"].detach().double() * size if "hard" in terms else nan,
                terms["soft"].detach().double() * size if "soft" in terms else nan,
                ((logits.argmax(-1) == labels) & known).sum().double(),
                known.sum().double(),
            ])  # fmt: skip
            first_bad = torch.where(  # the first batch whose loss is not finite, and that loss
                (first_bad[0] < 0) & ~torch.isfinite(loss),
                torch.stack([torch.zeros_like(loss) + batch_index, loss]),
                first_bad,
            )
        bad_batch, bad_loss = first_bad.tolist()
        if bad_batch >= 0:
            # a run directory without model.json stays marked unfinished
            raise TrainingDivergedError(
                f"training diverged in epoch {epoch}, batch {int(bad_batch) + 1}: "
                f"the loss is {bad_loss}; lower --lr (now {config.lr:g})"
            )
        sums = dict(zip(SUM_KEYS, world.all_sum(sums).tolist(), strict=True))
        scheduler.step(epoch)
        world.broadcast_buffers(model)  # BatchNorm statistics: rank 0's, as evaluated
        row = world.on_main(end_epoch, epoch, lr, sums, started)
        if not world.is_main:
            rows.append(row)
    if patience is not None and world.is_main:
        load_best(run_dir, model)
    return rows


SUM_KEYS = ("loss", "hard", "soft", "correct", "labeled")


class EpochBatches(torch.utils.data.Dataset):
    """One epoch's batches, in order: batch ``i`` is rows ``order[i*B:(i+1)*B]`` (this
    process's share of them, and the weight of its loss), gathered on the CPU.

    A map-style dataset of whole batches, so that DataLoader workers can build
    them ahead of the training step (``TrainData.gather`` is a pure function of
    its arguments) and its pin-memory thread can pin them for non-blocking copies.
    """

    def __init__(
        self,
        data: TrainData,
        order: torch.Tensor,
        batch_size: int,
        epoch: int,
        seed: int,
        world: World,
    ) -> None:
        self.data, self.order, self.batch_size = data, order, batch_size
        self.epoch, self.seed, self.world = epoch, seed, world

    def __len__(self) -> int:
        return -(-len(self.order) // self.batch_size)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | None]:
        positions = self.order[index * self.batch_size : (index + 1) * self.batch_size]
        share, weight = _share(len(positions), self.world)
        gathered = self.data.gather(positions, self.epoch, index, self.seed, share)
        gathered["weight"] = torch.tensor(weight)
        return gathered

    def load(self, workers: int, pin_memory: bool) -> Iterable[dict[str, torch.Tensor | None]]:
        if workers == 0 and not pin_memory:
            return (self[index] for index in range(len(self)))
        return torch.utils.data.DataLoader(
            self,
            batch_size=None,  # items are batches already
            num_workers=workers,
            pin_memory=pin_memory,
            prefetch_factor=4 if workers else None,
        )


def _share(size: int, world: World) -> tuple[slice, float]:
    """This rank's rows of a batch of ``size`` and the weight of its mean loss, so that
    the gradient averaged over ranks is the whole batch's mean. A rank left without a
    row (a last batch smaller than the world) steps on one row at weight 0."""
    if not world.active:
        return slice(None), 1.0
    mine = len(range(world.rank, size, world.size))
    if not mine:
        return slice(0, 1), 0.0
    return slice(world.rank, None, world.size), mine * world.size / size


def early_stop(rows: list[dict], patience: int) -> tuple[int | None, bool]:
    """Replay the early-stopping rule over metrics rows: (the epoch with the fewest
    validation errors, first one on ties; whether ``patience`` later evaluations in a row
    failed to beat it). One rule, used live and on resume."""
    best_epoch, best, waited = None, math.inf, 0
    for row in rows:
        errors = row.get("val_errors")
        if errors is None or errors == "" or (isinstance(errors, float) and math.isnan(errors)):
            continue
        if int(errors) < best:
            best_epoch, best, waited = int(row["epoch"]), int(errors), 0
        else:
            waited += 1
    return best_epoch, waited >= patience


def _score(
    model: nn.Module, split: ImageSet, data_config: DataConfig, device: torch.device
) -> tuple[float, int]:
    logits = predict_logits(model, split.images, data_config, device=device)
    return accuracy(logits, split.labels), int((logits.argmax(-1) != split.labels).sum())


def _online_task(
    student: nn.Module, teacher: nn.Module, alpha: float, temperature: float, device: torch.device
) -> nn.Module:
    """timm's own online distillation (``timm.task.LogitDistillationTask``): the reference
    that cached distillation is measured against. Hard targets go in as (mixed) one-hot
    distributions, so one criterion serves plain and mixed batches."""
    from timm.loss import SoftTargetCrossEntropy
    from timm.task import LogitDistillationTask
    from timm.task.distillation import DistillationTeacher

    return LogitDistillationTask(
        student,
        DistillationTeacher(teacher, device=device),
        criterion=SoftTargetCrossEntropy(),
        task_loss_weight=alpha,
        temperature=temperature,
        device=device,
        verbose=False,
    )


def _soft_one_hot(batch: dict, num_classes: int) -> torch.Tensor:
    target = torch.nn.functional.one_hot(batch["labels"], num_classes).float()
    if batch["lam"] is None:
        return target
    lam = batch["lam"][:, None]
    partner = torch.nn.functional.one_hot(batch["partner_labels"], num_classes).float()
    return lam * target + (1 - lam) * partner


def _run(
    config: TrainConfig,
    kind: str,
    soft_labels: SoftLabels | StreamedSoftLabels | None,
    log: Callable[[str], None],
    resume: bool = False,
) -> ModelCard:
    """Shared body of train_teacher, train_student, distill_online and resume."""
    world = current_world()
    if not world.is_main:
        log = _quiet
    if world.active and config.teacher is not None:
        raise UsageError("distill-online runs in one process (it is the reference, not a "
                         "scaled path); start it without torchrun")  # fmt: skip
    out = Path(config.out)
    device = resolve_device(config.device)
    train_set = config.load("train")
    temperature = config.temperature or 1.0
    lineage = None
    classes = train_set.classes
    data = TrainData.plain(train_set, config.policy)
    if config.subset is not None:
        if soft_labels is not None:
            raise UsageError(
                f"{soft_labels.path} defines the training rows: --subset is for training "
                "without a cache (cache-teacher --subset picks a cache's rows)"
            )
        rows = torch.from_numpy(
            select_rows(
                train_set.labels,
                subset=config.subset,
                num_classes=train_set.num_classes,
                seed=config.subset_seed,
            )
        )
        data = replace(data, rows=rows, labels=train_set.labels[rows])
    online_teacher = None
    alpha = config.alpha
    if soft_labels is not None:
        data, classes, alpha = _cache_data(config, soft_labels, train_set, log)
        manifest = soft_labels.manifest
        temperature = config.temperature or manifest.temperature
        lineage = {
            "cache_id": manifest.cache_id,
            "teacher_id": manifest.teacher_id,
            "cache_path": str(soft_labels.path),
            "teacher_runs": [member.run_dir for member in manifest.teachers],
            "cache_temperature": manifest.temperature,
            "temperature": temperature,
            "alpha": alpha,
            "views": manifest.num_views,
            "rows": manifest.num_samples,
        }
    elif config.teacher is not None:
        online_teacher, teacher_card = load_model(Path(config.teacher), device)
        if teacher_card.classes != list(train_set.classes):
            raise CacheMismatchError(
                f"teacher {config.teacher} was trained on other classes than {config.data}"
            )
        if not train_set.labeled:
            raise UsageError("distill-online needs labels (timm's task always has a CE term)")
        lineage = {
            "online_teacher": config.teacher,
            "teacher_weights_sha256": teacher_card.weights_sha256,
            "temperature": temperature,
            "alpha": alpha,
        }
    elif not train_set.labeled:
        raise DatasetError(f"{config.data} train has no labels: a teacher needs labels to learn")
    validation = None
    if config.val_fraction is not None:
        data, validation = _hold_out(data, train_set, config, soft_labels)
    test_set = _load_test_set(config, classes)
    mean, std = train_set.pixel_stats()
    data_config = DataConfig(input_size=train_set.input_size, mean=mean, std=std)
    torch.manual_seed(config.seed)
    model = create_model(
        config.model,
        num_classes=len(classes),
        data_config=data_config,
        drop_rate=config.drop_rate,
        model_kwargs=config.model_kwargs(),
    )
    if online_teacher is not None and teacher_card.data.input_size != data_config.input_size:
        raise UsageError(
            f"timm's LogitDistillationTask feeds the teacher the student's input: the teacher "
            f"takes {teacher_card.data.input_size}, the data is {data_config.input_size}"
        )

    if not resume:

        def start() -> None:
            prepare_output(out, config.overwrite)  # inputs are valid: only now touch the output
            out.mkdir(parents=True)
            resolved = {"device": str(device), "temperature": temperature, "alpha": alpha,
                        "processes": world.size}  # fmt: skip
            write_json(out / CONFIG_FILE, {**asdict(config), "kind": kind, "resolved": resolved})

        world.on_main(start)
    rows = fit(
        model,
        replace(config, alpha=alpha),
        data,
        test_set,
        data_config,
        device,
        out,
        temperature=temperature,
        log=log,
        resume=resume,
        online_teacher=online_teacher,
        validation=validation,
        world=world,
    )
    return world.on_main(
        _finish, out, model, config, kind, rows, classes, data_config, train_set, data,
        validation, lineage,
    )  # fmt: skip


def _finish(
    out: Path,
    model: nn.Module,
    config: TrainConfig,
    kind: str,
    rows: list[dict],
    classes: tuple[str, ...],
    data_config: DataConfig,
    train_set: ImageSet,
    data: TrainData,
    validation: ImageSet | None,
    lineage: dict | None,
) -> ModelCard:
    """The model card and weights that mark a run complete; its resume state goes."""
    selection = None
    if config.early_stopping is not None:
        epochs_run = int(rows[-1]["epoch"])
        selection = {
            "rule": "fewest validation errors",
            "kept_epoch": early_stop(rows, config.early_stopping)[0],
            "epochs_run": epochs_run,
            "stopped_early": epochs_run < config.epochs,
        }
    model = model.cpu().to(memory_format=torch.contiguous_format)
    card = ModelCard(
        format_version=RUN_FORMAT_VERSION,
        kind=kind,
        architecture=config.model,
        model_kwargs=resolve_model_kwargs(config.model, data_config, config.model_kwargs()),
        num_classes=len(classes),
        in_chans=data_config.input_size[0],
        classes=list(classes),
        data_config=data_config.to_dict(),
        weights_sha256=weights_sha256(model),
        param_count=param_count(model),
        dataset={
            "name": train_set.name,
            "split": "train",
            "fingerprint": train_set.fingerprint(),
            "rows": len(data),
            "validation_rows": 0 if validation is None else len(validation),
        },
        lineage=lineage,
        selection=selection,
        created=utc_now(),
        software=software_versions(),
    )
    save_model(out, model, card)
    remove_checkpoint(out)
    return card


def _hold_out(
    data: TrainData, train_set: ImageSet, config: TrainConfig, soft: SoftLabels | None
) -> tuple[TrainData, ImageSet]:
    """Training rows without the validation split, and the split itself (with its labels)."""
    if not train_set.labeled or (soft is not None and not soft.manifest.labeled):
        raise UsageError("--val-fraction scores held-out rows against their labels: "
                         "this transfer set has none")  # fmt: skip
    held_out = torch.from_numpy(validation_rows(len(train_set), config.val_fraction))
    kept = data.without(held_out)
    if not len(kept):
        raise UsageError(
            f"--val-fraction {config.val_fraction} holds out every training row of this "
            "transfer set"
        )
    validation = ImageSet(
        train_set.name,
        "validation",
        train_set.images[held_out],
        train_set.labels[held_out],
        train_set.classes,
    )
    return kept, validation


def _cache_data(
    config: TrainConfig,
    soft: SoftLabels | StreamedSoftLabels,
    train_set: ImageSet,
    log: Callable[[str], None],
) -> tuple[TrainData, tuple[str, ...], float]:
    """The training rows of a cache, checked against the dataset: (data, classes, alpha)."""
    manifest = soft.manifest
    expected = manifest.dataset["fingerprint"]
    if expected != train_set.fingerprint() or manifest.dataset["split"] != "train":
        raise CacheMismatchError(
            f"{soft.path} was made from another dataset than {config.data} train: "
            + describe_mismatch(expected, train_set.fingerprint())
        )
    indices = soft.indices
    if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= len(train_set)):
        raise CacheMismatchError(
            f"{soft.path}: row indices outside the dataset's 0..{len(train_set) - 1}"
        )
    if manifest.labeled and not torch.equal(soft.labels, train_set.labels[indices]):
        raise CacheMismatchError(
            f"{soft.path}: stored labels differ from the dataset's at its rows"
        )
    if soft.has_views and (not config.policy.is_identity or config.jitter):
        raise UsageError(
            f"{soft.path} holds augmented views ({manifest.views['augment']}, mix "
            f"{manifest.views['mix']}): the student replays them, so --augment, --mix and "
            "--jitter must stay off"
        )
    if not soft.has_views and not config.policy.is_identity and config.alpha < 1:
        log(
            f"note: {soft.path} holds the teacher's outputs for the plain images: with --augment "
            "or --mix the student sees views the teacher never labelled (inconsistent teaching, "
            "Beyer et al. 2022); cache-teacher --views N --augment ... makes consistent ones"
        )
    alpha = config.alpha
    if not manifest.labeled and alpha != 0.0:
        log(
            f"note: {soft.path} has no labels (an unlabeled transfer set): --alpha {alpha:g} "
            "becomes 0, the student learns from the teacher alone"
        )
        alpha = 0.0
    data = TrainData(
        images=train_set.images,
        dataset_labels=train_set.labels,
        rows=indices,
        labels=soft.labels,
        targets=soft.log_probs(config.temperature) if alpha < 1 else None,
        views=soft.views if soft.has_views else None,
        partners=soft.partners if soft.has_views else None,
        policy=config.policy,
    )
    return data, tuple(manifest.classes), alpha


def train_teacher(config: TrainConfig, log: Callable[[str], None] = _quiet) -> ModelCard:
    """Train a model on hard labels and save it as a teacher run directory."""
    config.validate()
    if config.cache is not None or config.teacher is not None:
        raise UsageError("train-teacher learns from labels; --cache is for train-student")
    return _run(config, "teacher", None, log)


def train_student(config: TrainConfig, log: Callable[[str], None] = _quiet) -> ModelCard:
    """Train a student from a cache: α·CE + (1−α)·T²·KL, never loading the teacher."""
    config.validate()
    if config.cache is None:
        raise UsageError("train-student needs --cache (a cache written by cache-teacher)")
    soft_labels = open_soft_labels(config.cache, config.cache_memory, log)
    return _run(config, "student", soft_labels, log)


def distill_online(config: TrainConfig, log: Callable[[str], None] = _quiet) -> ModelCard:
    """Online distillation through timm's ``LogitDistillationTask``: the teacher runs on
    every batch. The reference that a cache is compared with, not kdpipe's way."""
    config.validate()
    if config.teacher is None or config.cache is not None:
        raise UsageError("distill-online needs --teacher (a run directory) and no --cache")
    return _run(config, "online-student", None, log)


def resume_training(run_dir: Path, log: Callable[[str], None] = _quiet) -> ModelCard:
    """Continue an unfinished run from its last epoch checkpoint, with its saved config."""
    run_dir = Path(run_dir)
    if (run_dir / CARD_FILE).is_file():
        raise UsageError(f"{run_dir} is finished (it has {CARD_FILE}): nothing to resume")
    saved = read_config(run_dir)
    kind = saved.pop("kind", None)
    saved.pop("resolved", None)
    names = {f.name for f in fields(TrainConfig)}
    # a run started before an option existed resumes with that option's default
    optional = {f.name for f in fields(TrainConfig) if f.default is not MISSING}
    if (
        kind not in ("teacher", "student", "online-student")
        or set(saved) - names
        or names - set(saved) - optional
    ):
        raise ManifestError(f"{run_dir / CONFIG_FILE} is not a kdpipe training configuration")
    # JSON has no tuples: the tuple fields (hidden_sizes, crop_scale) come back as lists
    saved = {name: tuple(v) if isinstance(v, list) else v for name, v in saved.items()}
    config = TrainConfig(**saved)
    config.validate()
    soft_labels = (
        open_soft_labels(config.cache, config.cache_memory, log) if kind == "student" else None
    )
    return _run(config, kind, soft_labels, log, resume=True)
