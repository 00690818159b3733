"""What a training run depends on: :class:`TrainConfig`, saved as ``config.json``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kdpipe.base.checks import alpha_problem, memory_problem, temperature_problem
from kdpipe.base.errors import UsageError
from kdpipe.base.flags import CLIP_MODES, SCHED_ON
from kdpipe.data.datasets import ImageSet, load_dataset
from kdpipe.train.watch import require
from kdpipe.views.inputs import PRECISION_CHOICES
from kdpipe.views.policy import CROP_SCALE, ViewPolicy

if TYPE_CHECKING:  # for annotations: imported where they are used, so that a command
    # that reads records only loads no deep-learning library
    import torch
    from timm.scheduler.scheduler import Scheduler

# the value a config.json written before a field existed meant: resume and report use it
# (resize: before it, a file of another size was squashed to the decode size)
LEGACY_DEFAULTS = {"sched_on": "epoch", "resize": "squash"}


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything a training run depends on; saved as ``config.json``."""

    model: str
    data: str
    out: str
    epochs: int
    data_root: str = "data"
    # how an image folder's or shards' files are decoded (S, or (H, W) as resolved from a
    # cache or the data), data.decode_options: None where the cache, the teacher or the
    # rule decides, and config.json records what was used
    image_size: int | tuple[int, int] | None = None
    channels: int | None = None
    resize: str | None = None
    # the model's own input size S: every image and stored view rendered at S x S from the
    # decoded source (FKD's rule), so a student need not see the teacher's size
    input_size: int | None = None
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
    # "update": the schedule (warm-up included) moves after every optimizer update, timm's
    # step_update; "epoch": once per epoch, timm's step (a run saved before the field: LEGACY)
    sched_on: str = "update"
    seed: int = 0
    # gradient clipping before each optimizer step (timm's dispatch_clip_grad): None is off
    clip_grad: float | None = None
    clip_mode: str = "norm"
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
    precision: str = "auto"  # bf16 autocast on CUDA, float32 on the CPU (inputs.autocast)
    workers: int = 0  # DataLoader worker processes that build batches ahead
    overwrite: bool = False
    # distillation: from a cache (train-student) or online from a teacher (distill-online)
    cache: str | None = None
    cache_memory: int | None = None  # bytes: a larger cache is streamed (cache.stream)
    teacher: str | None = None
    alpha: float = 1.0
    temperature: float | None = None
    # Sun et al. (2024): teacher and student logits z-scored per row before the temperature,
    # which is then a base temperature (tasks.classify.loss.distillation_loss)
    logit_standardize: bool = False
    # watching the run (train.watch): a run saved before these existed resumes with them off
    log: str = "none"  # also send each metrics row to "tensorboard" or "mlflow"
    log_dir: str | None = None  # default: the run directory (RUN_DIR/mlruns for MLflow)
    # a feature term beside the logits' (issue 16): a student layer, through a learned
    # projector, against a teacher layer cached by cache-teacher --features/--attention
    feature_loss: str | None = None  # hint, cosine or attention (kdpipe.tasks.classify.loss)
    feature_weight: float = 1.0  # beta: loss = distillation loss + beta * feature loss
    student_layer: str | None = None
    teacher_layer: str | None = None
    # a pretrained start (train-teacher --pretrained): a SOURCE of kdpipe.models.pretrained and its
    # weights file; the head is new (timm's reset_classifier), the preprocessing the source's
    pretrained: str | None = None
    weights: str | None = None
    # its preprocessing where not the pretrained_cfg's: a JSON file of timm's data-config keys
    data_config: str | None = None

    def validate(self) -> None:
        checks = (
            (self.epochs >= 1, f"--epochs must be >= 1, not {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, not {self.batch_size}"),
            (
                self.input_size is None or self.input_size >= 1,
                f"--input-size must be >= 1, not {self.input_size}",
            ),
            (
                self.input_size is None or self.pretrained is None,
                "--input-size and --pretrained: a pretrained model takes its own input size",
            ),
            (self.eval_every >= 1, f"--eval-every must be >= 1, not {self.eval_every}"),
            (
                math.isfinite(self.lr) and self.lr > 0,
                f"--lr must be a finite number > 0, not {self.lr}",
            ),
            (
                math.isfinite(self.momentum) and 0 <= self.momentum < 1,
                f"--momentum must be in [0, 1), not {self.momentum}",
            ),
            (
                math.isfinite(self.weight_decay) and self.weight_decay >= 0,
                f"--weight-decay must be a finite number >= 0, not {self.weight_decay}",
            ),
            (alpha_problem(self.alpha) is None, alpha_problem(self.alpha)),
            (
                self.temperature is None or temperature_problem(self.temperature) is None,
                "" if self.temperature is None else temperature_problem(self.temperature),
            ),
            (0.0 <= self.drop_rate < 1.0, f"--dropout must be in [0, 1), not {self.drop_rate}"),
            (self.jitter >= 0, f"--jitter must be >= 0, not {self.jitter}"),
            (self.workers >= 0, f"--workers must be >= 0, not {self.workers}"),
            (memory_problem(self.cache_memory) is None, memory_problem(self.cache_memory)),
            (
                self.precision in PRECISION_CHOICES,
                f"--precision must be one of {', '.join(PRECISION_CHOICES)}, "
                f"not {self.precision!r}",
            ),
            (self.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, not {self.warmup_epochs}"),
            (
                self.sched_on in SCHED_ON,
                f"--sched-on must be one of {', '.join(SCHED_ON)}, not {self.sched_on!r}",
            ),
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
            (
                self.weights is None or self.pretrained is not None,
                "--weights goes with --pretrained SOURCE (the architecture they are weights of)",
            ),
            (
                self.data_config is None or self.pretrained is not None,
                "--data-config goes with --pretrained SOURCE (the preprocessing of its weights)",
            ),
        )
        for ok, message in checks:
            if not ok:
                raise UsageError(message)
        if self.hidden_sizes is not None and self.model != "kd_mlp":
            raise UsageError(
                f"--hidden-sizes sets the layers of kd_mlp; {self.model} has layers of its own "
                "(use --model kd_mlp --hidden-sizes ...)"
            )
        self.policy.validate()
        require(self.log, self.log_dir)
        if self.jitter and not self.policy.is_identity:
            raise UsageError("--jitter and --augment/--mix both augment: choose one")
        self._check_feature_loss()
        self._check_high_temperature()
        self._check_recipe()

    def _check_high_temperature(self) -> None:
        """--clip-grad/--clip-mode and --logit-standardize (issue 28)."""
        clip = self.clip_grad
        if clip is not None and not (math.isfinite(clip) and clip > 0):
            raise UsageError(f"--clip-grad must be a finite number > 0, not {self.clip_grad}")
        if self.clip_mode not in CLIP_MODES:
            raise UsageError(f"--clip-mode must be one of {', '.join(CLIP_MODES)}, "
                             f"not {self.clip_mode!r}")  # fmt: skip
        if self.logit_standardize and (self.cache is None or self.alpha >= 1):
            raise UsageError("--logit-standardize changes the soft term of train-student: it "
                             f"needs --cache and --alpha below 1 (not {self.alpha})")  # fmt: skip

    def _check_feature_loss(self) -> None:
        from kdpipe.tasks.classify.loss import FEATURE_LOSSES

        given = [self.student_layer is not None, self.teacher_layer is not None]
        if self.feature_loss is None:
            if any(given):
                raise UsageError("--student-layer and --teacher-layer go with --feature-loss")
            return
        if self.feature_loss not in FEATURE_LOSSES:
            raise UsageError(f"--feature-loss must be one of {', '.join(FEATURE_LOSSES)}, "
                             f"not {self.feature_loss!r}")  # fmt: skip
        if not all(given):
            raise UsageError("--feature-loss needs --student-layer and --teacher-layer")
        if self.cache is None and self.teacher is None:
            raise UsageError(
                "--feature-loss learns from the teacher's layer: a --cache's "
                "(train-student), or the --teacher's online (distill-online)"
            )
        if not (math.isfinite(self.feature_weight) and self.feature_weight >= 0):
            raise UsageError(f"--feature-weight must be a finite number >= 0, "
                             f"not {self.feature_weight}")  # fmt: skip

    def _check_recipe(self) -> None:
        """--opt, --sched and their settings, tried on one parameter through timm's own
        factories, so that a misspelt name fails before any file is written."""
        import torch
        from timm.optim import create_optimizer_v2

        parameter = torch.nn.Parameter(torch.zeros(1))
        try:
            optimizer = create_optimizer_v2([parameter], opt=self.opt, lr=self.lr,
                                            weight_decay=self.weight_decay,
                                            momentum=self.momentum)  # fmt: skip
        except Exception as exc:  # timm raises ValueError, AssertionError, ImportError ...
            raise UsageError(
                f"--opt {self.opt!r}: timm cannot create this optimizer ({exc}); "
                "timm.optim.list_optimizers() lists the names"
            ) from None
        try:
            scheduler = self.create_scheduler(optimizer, updates_per_epoch=1)
        except Exception as exc:
            raise UsageError(
                f"--sched {self.sched!r}: timm cannot create this schedule stepped per "
                f"{self.sched_on} ({exc or type(exc).__name__})"
            ) from None
        if scheduler is None:
            raise UsageError(f"--sched {self.sched!r}: timm made no schedule of it")

    def create_scheduler(
        self, optimizer: torch.optim.Optimizer, updates_per_epoch: int
    ) -> Scheduler | None:
        """timm's schedule of this run: ``create_scheduler_v2`` counting epochs, or, with
        ``sched_on="update"``, optimizer updates (``updates_per_epoch`` of them an epoch,
        warm-up included), so that the lr moves smoothly instead of jumping at each epoch.
        The loop calls both ``step_update`` and ``step``: timm ignores the other one."""
        from timm.scheduler import create_scheduler_v2

        scheduler, _ = create_scheduler_v2(optimizer, sched=self.sched, num_epochs=self.epochs,
                                           warmup_epochs=self.warmup_epochs,
                                           warmup_lr=self.lr * 0.01,
                                           step_on_epochs=self.sched_on == "epoch",
                                           updates_per_epoch=updates_per_epoch)  # fmt: skip
        return scheduler

    def schedule_record(self, updates_per_epoch: int) -> dict:
        """The schedule as resolved for a run (config.json's ``resolved.schedule``): what
        timm counts in, and how many of those the run and its warm-up last."""
        per = 1 if self.sched_on == "epoch" else updates_per_epoch
        return {"sched": self.sched, "stepped_on": self.sched_on,
                "updates_per_epoch": updates_per_epoch, "steps": self.epochs * per,
                "warmup_steps": self.warmup_epochs * per, "warmup_lr": self.lr * 0.01,
                "lr": self.lr}  # fmt: skip

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
            resize=self.resize,
        )

    def model_kwargs(self) -> dict:
        return {"hidden_sizes": list(self.hidden_sizes)} if self.hidden_sizes else {}
