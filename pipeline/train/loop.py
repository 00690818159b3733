"""The training loop: one screen, read top to bottom (nanoGPT's shape).

Per epoch: stop early? → the epoch's order → for each batch: input → task (forward
and loss) → backward → step → scheduler (per update) → account → check the loss →
scheduler (per epoch) → score, log, checkpoint. What the run trains on and with which α
and T was decided by the plan (:mod:`kdpipe.train.plan`); the step is a task
(:mod:`kdpipe.train.step`); ``--clip-grad`` clips the gradient between backward and
step (timm's ``dispatch_clip_grad``). The schedule counts updates or epochs (``sched_on``):
timm's ``step_update`` and ``step`` are both called, and each ignores the other's.
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from kdpipe.base.distributed import SINGLE, World
from kdpipe.base.errors import TrainingDivergedError
from kdpipe.base.runtime import kill_point, quiet
from kdpipe.data.datasets import ImageSet
from kdpipe.models.runs import METRICS_FILE
from kdpipe.models.teacher import predict_logits
from kdpipe.train.batches import EpochBatches
from kdpipe.train.checkpoint import load_best, load_checkpoint, save_best, save_checkpoint
from kdpipe.train.config import TrainConfig
from kdpipe.train.plan import RunPlan
from kdpipe.train.step import CachedDistillation, FeatureTerm, OnlineDistillation, Trainee
from kdpipe.train.watch import Watch, open_watch
from kdpipe.views.inputs import autocast
from timm.optim import create_optimizer_v2
from timm.utils import dispatch_clip_grad
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

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
SUM_KEYS = ("loss", "hard", "soft", "correct", "labeled", "exploded")
# A batch loss this many times the run's first-epoch loss (or, in epoch 1, its first
# batch's; never under EXPLODED_FLOOR) has diverged though it is still finite: a
# student that goes there sticks at chance (measured: the README's path on 180 images
# went from 7.6 to 4718 in epoch 2, then stayed at chance to the end, exit 0).
EXPLODED_FACTOR = 100.0
EXPLODED_FLOOR = 100.0


def fit(
    model: nn.Module,
    plan: RunPlan,
    run_dir: Path,
    *,
    resume: bool = False,
    log: Callable[[str], None] = quiet,
    world: World = SINGLE,
    feature: FeatureTerm | None = None,
) -> list[dict]:
    """Train ``model`` in place; one metrics row and one checkpoint per epoch in ``run_dir``.

    With ``plan.config.early_stopping`` training stops once that many evaluations in a
    row did not beat the best validation score, and ``model`` ends with the best
    epoch's weights. With ``resume``, training continues after the last checkpoint and
    ends exactly where an uninterrupted run would.

    Under torchrun (``world``), the model is wrapped in DistributedDataParallel and
    kdpipe's own sampler shares out each batch: every rank draws the same permutation
    (one seed), takes every ``world.size``-th row of each batch, and weights its loss by
    its share, so the averaged gradient is the whole batch's. Order, views and batches
    are then those of a single process; only batch statistics (BatchNorm) and dropout
    masks differ. Rank 0 evaluates and writes every file.

    ``feature`` (``--feature-loss``, :func:`feature_term`) adds its term to the loss; its
    projector trains with ``model`` and is kept in the checkpoints, never in ``model``.
    """
    config, device, data = plan.config, plan.device, plan.data
    model.to(device).to(memory_format=torch.channels_last)
    # what the optimizer and the checkpoints hold: the model, with the term's projector
    trained = model if feature is None else Trainee(model, feature.to(device))
    optimizer = create_optimizer_v2(
        trained,
        opt=config.opt,
        lr=config.lr,
        weight_decay=config.weight_decay,
        momentum=config.momentum,
    )
    updates = plan.updates_per_epoch
    scheduler = config.create_scheduler(optimizer, updates)  # per update or per epoch
    generator = torch.Generator().manual_seed(config.seed)
    resident = data.on_device(device, config.jitter)  # the data moved whole onto a GPU, or None
    done, rows = load_checkpoint(run_dir, trained, optimizer, generator) if resume else (0, [])
    task = _task(model, plan, world, feature)
    watch = open_watch(plan, run_dir, resume) if world.is_main else Watch()  # --log
    evaluation = Evaluation(plan, run_dir, model, optimizer, generator, rows, log, watch, trained)
    if world.is_main:
        evaluation.rewrite_metrics()  # rows past the checkpoint go
    if done:
        log(f"{run_dir}: resuming after epoch {done}")
    for epoch in range(done + 1, config.epochs + 1):
        if evaluation.should_stop(epoch):  # also stops a resumed run that had already stopped
            break
        started = time.perf_counter()
        task.train()
        order = data.epoch_order(generator, config.seed, epoch)
        if resident is not None:
            order = order.to(device)  # batches are then sliced and gathered on the GPU
        batches = EpochBatches(data if resident is None else resident, order, config.batch_size,
                               epoch, config.seed, world)  # fmt: skip
        sums = EpochSums(device, rows[0]["loss"] if rows else None)
        lr = optimizer.param_groups[0]["lr"]
        loaded = _progress(batches, config, device, resident is not None, world)
        for batch_index, gathered in enumerate(loaded):
            weight = float(gathered["weight"])
            batch = data.to_model(gathered, plan.data_config, device, config.jitter, generator)
            output = task(batch)
            optimizer.zero_grad(set_to_none=True)
            (output["loss"] * weight if world.active else output["loss"]).backward()
            if config.clip_grad is not None:  # the whole batch's gradient (DDP has reduced it)
                dispatch_clip_grad(trained.parameters(), config.clip_grad, mode=config.clip_mode)
            optimizer.step()
            scheduler.step_update((epoch - 1) * updates + batch_index + 1)  # sched_on="update"
            sums.add(output, batch["labels"], weight, batch_index)
        sums.raise_if_diverged(epoch, config.lr)  # a run without model.json stays unfinished
        totals = dict(zip(SUM_KEYS, world.all_sum(sums.sums).tolist(), strict=True))
        sums.raise_if_exploded(epoch, config, totals["exploded"])  # every rank, the same sum
        scheduler.step(epoch)  # sched_on="epoch"
        world.broadcast_buffers(model)  # BatchNorm statistics: rank 0's, as evaluated
        row = world.on_main(evaluation.end_epoch, epoch, lr, totals, started)
        if not world.is_main:
            rows.append(row)
    watch.close()
    if config.early_stopping is not None and world.is_main:
        load_best(run_dir, trained)
    return rows


def feature_term(model: nn.Module, plan: RunPlan) -> FeatureTerm | None:
    """The feature term of ``--feature-loss`` for ``model`` (None without one), built
    before the run directory is: a student layer that does not fit is refused first."""
    if plan.teacher_layer is None:
        return None
    return FeatureTerm.build(model, plan.config, plan.teacher_layer)


def _task(
    model: nn.Module, plan: RunPlan, world: World, feature: FeatureTerm | None = None
) -> CachedDistillation | OnlineDistillation:
    """The step's task: online through timm's task, else against the cache (or labels)."""
    amp = autocast(plan.device, plan.config.precision)
    if plan.online_teacher is not None:
        return OnlineDistillation(model, plan.online_teacher, alpha=plan.alpha,
                                  temperature=plan.temperature, device=plan.device,
                                  amp=amp, feature=feature)  # fmt: skip
    trainer = model
    if world.active:
        device_ids = None
        if plan.device.type == "cuda":  # "cuda" is this rank's GPU: current_world made it current
            device = plan.device
            device_ids = [device.index if device.index is not None else torch.cuda.current_device()]
        trainer = DistributedDataParallel(model, device_ids=device_ids)
    return CachedDistillation(trainer, alpha=plan.alpha, temperature=plan.temperature, amp=amp,
                              feature=feature,
                              standardize=plan.config.logit_standardize)  # fmt: skip


def _progress(
    batches: EpochBatches, config: TrainConfig, device: torch.device, resident: bool, world: World
) -> Iterable[dict]:
    """The epoch's batches (built ahead by DataLoader workers when asked, pinned for
    non-blocking copies to a GPU), with a progress bar on rank 0 at a terminal."""
    return tqdm(
        batches.load(0 if resident else config.workers,
                     pin_memory=device.type == "cuda" and not resident),
        total=len(batches),
        desc=f"epoch {batches.epoch}/{config.epochs}",
        disable=None if world.is_main else True,
        leave=False,
    )  # fmt: skip


class EpochSums:
    """The epoch's loss terms and accuracy, summed on the device and read once per epoch:
    a ``.item()`` per step would make the host wait for every step before it prepares
    the next batch. Remembers the first batch whose loss is not finite, and counts the
    batches whose loss exploded (``EXPLODED_FACTOR`` times ``reference``, the run's
    first-epoch loss; in epoch 1 the first batch's)."""

    def __init__(self, device: torch.device, reference: float | None = None) -> None:
        self.sums = torch.zeros(len(SUM_KEYS), dtype=torch.float64, device=device)
        self.nan = torch.tensor(math.nan, dtype=torch.float64, device=device)
        self.first_bad = torch.tensor([-1.0, 0.0], dtype=torch.float64, device=device)
        self.first_exploded = self.first_bad.clone()
        self.reference = (
            None if reference is None or not math.isfinite(reference)
            else torch.tensor(reference, dtype=torch.float64, device=device)
        )  # fmt: skip

    def add(self, output: dict, labels: torch.Tensor, weight: float, batch_index: int) -> None:
        size = len(labels) if weight else 0
        known = (labels >= 0) & (weight > 0)
        loss = output["loss"].detach().double()
        hard, soft = output["task_loss"], output["kd_loss"]
        if self.reference is None:
            self.reference = loss.clone()  # epoch 1's first batch: the loss at initialisation
        limit = torch.clamp(self.reference * EXPLODED_FACTOR, min=EXPLODED_FLOOR)
        exploded = torch.isfinite(loss) & (loss > limit) & (weight > 0)
        self.sums += torch.stack([
            loss * size,
            hard.detach().double() * size if hard is not None else self.nan,
            soft.detach().double() * size if soft is not None else self.nan,
            ((output["output"].argmax(-1) == labels) & known).sum().double(),
            known.sum().double(),
            exploded.double(),
        ])  # fmt: skip
        seen = torch.stack([torch.zeros_like(loss) + batch_index, loss])
        self.first_bad = _first(self.first_bad, ~torch.isfinite(loss), seen)
        self.first_exploded = _first(self.first_exploded, exploded, seen)

    def raise_if_diverged(self, epoch: int, lr: float) -> None:
        bad_batch, bad_loss = self.first_bad.tolist()
        if bad_batch >= 0:
            raise TrainingDivergedError(
                f"training diverged in epoch {epoch}, batch {int(bad_batch) + 1}: "
                f"the loss is {bad_loss}; lower --lr (now {lr:g})"
            )

    def raise_if_exploded(self, epoch: int, config: TrainConfig, exploded: float) -> None:
        """Raise when a batch's loss exploded (on any rank: ``exploded`` is the sum over
        the ranks, so that all of them stop together). A finite loss that grew a hundred
        times has left the basin: the run would go on at chance and exit 0."""
        if not exploded:
            return
        batch, loss = self.first_exploded.tolist()
        reference = float(self.reference) if self.reference is not None else math.nan
        seen = (f"batch {int(batch) + 1}: the loss is {loss:.4g}," if batch >= 0
                else "on another rank: the loss is")  # fmt: skip
        clip = ("clip the gradient (--clip-grad 1)" if config.clip_grad is None
                else f"clip harder (--clip-grad now {config.clip_grad:g})")  # fmt: skip
        raise TrainingDivergedError(
            f"training diverged in epoch {epoch}, {seen} over {EXPLODED_FACTOR:g} times "
            f"its start ({reference:.4g}), in {int(exploded)} batch(es); "
            f"{clip} or lower --lr (now {config.lr:g})"
        )


def _first(kept: torch.Tensor, hit: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """``[batch, loss]`` of the first batch that ``hit`` (``kept`` is ``[-1, 0]`` until
    one does), on the device: no host sync per step."""
    return torch.where((kept[0] < 0) & hit, seen, kept)


@dataclass
class Evaluation:
    """The end of each epoch, rank 0's work: score the test and validation splits, append
    the metrics row (and send it to ``watch``), keep the best weights for early stopping,
    save the checkpoint."""

    plan: RunPlan
    run_dir: Path
    model: nn.Module
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    rows: list[dict]
    log: Callable[[str], None]
    watch: Watch
    state: nn.Module | None = None  # what checkpoints hold, when more than the model

    def rewrite_metrics(self) -> None:
        with (self.run_dir / METRICS_FILE).open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=METRIC_COLUMNS)
            writer.writeheader()
            writer.writerows(self.rows)

    def should_stop(self, epoch: int) -> bool:
        patience = self.plan.config.early_stopping
        if patience is None:
            return False
        best_epoch, stop = early_stop(self.rows, patience)
        if stop:
            self.log(f"early stopping after epoch {epoch - 1}: the best validation score was "
                     f"epoch {best_epoch}'s, {patience} evaluation(s) ago or more")  # fmt: skip
        return stop

    def end_epoch(self, epoch: int, lr: float, sums: dict, started: float) -> dict:
        config, plan = self.plan.config, self.plan
        scored = epoch % config.eval_every == 0 or epoch == config.epochs
        test_accuracy, test_errors = _score(self.model, plan.test_set, plan, scored)
        val_accuracy, val_errors = _score(self.model, plan.validation, plan, scored)
        n = len(plan.data)
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
        self.rows.append(row)
        with (self.run_dir / METRICS_FILE).open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=METRIC_COLUMNS).writerow(row)
        self.watch.epoch(row)  # the same row to TensorBoard or MLflow
        patience = config.early_stopping
        state = self.state if self.state is not None else self.model
        if patience is not None and early_stop(self.rows, patience)[0] == epoch:
            save_best(self.run_dir, state)  # before the checkpoint that counts on it
        save_checkpoint(self.run_dir, epoch, state, self.optimizer, self.generator, self.rows)
        kill_point("epochs", epoch)  # tests only (KDPIPE_TEST_KILL_AFTER)
        validated = f"  val acc {val_accuracy:.4f}" if plan.validation is not None else ""
        self.log(
            f"epoch {epoch}/{config.epochs}: loss {row['loss']:.4f}  "
            f"train acc {row['train_accuracy']:.4f}  test acc {test_accuracy:.4f}{validated}  "
            f"({row['seconds']:.1f}s)"
        )
        return row


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


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(-1) == labels).float().mean()) if len(labels) else float("nan")


def _score(
    model: nn.Module, split: ImageSet | None, plan: RunPlan, scored: bool
) -> tuple[float, int | None]:
    """Accuracy and errors on ``split`` in an epoch that is scored (NaN and None otherwise)."""
    if split is None or not scored:
        return float("nan"), None
    logits = predict_logits(model, split.images, plan.data_config, device=plan.device)
    return accuracy(logits, split.labels), int((logits.argmax(-1) != split.labels).sum())
