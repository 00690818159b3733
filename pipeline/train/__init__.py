"""Training: teachers, hard-label baselines and distilled students, with one loop.

A student never loads its teacher: its soft targets come from the cache, read
into memory once (or streamed), indexed by the same sample ids as the images.

- ``config``: :class:`TrainConfig`, everything a run depends on (``config.json``);
- ``plan``: the run resolved once: rows, splits, α, T, lineage (:func:`plan_run`);
- ``batches``: what an epoch iterates over (:class:`TrainData`, :class:`EpochBatches`);
- ``step``: the forward pass and loss as a task (cached or online distillation);
- ``loop``: :func:`fit`, the loop that reads top to bottom;
- ``entry``: the entry points (teacher, student, online, resume).
"""

from kdpipe.train.batches import EpochBatches, TrainData, random_shift, share_of
from kdpipe.train.config import TrainConfig
from kdpipe.train.entry import distill_online, resume_training, train_student, train_teacher
from kdpipe.train.loop import METRIC_COLUMNS, accuracy, early_stop, fit
from kdpipe.train.plan import RunPlan, cache_data, plan_run
from kdpipe.train.step import CachedDistillation, OnlineDistillation

__all__ = [
    "METRIC_COLUMNS",
    "CachedDistillation",
    "EpochBatches",
    "OnlineDistillation",
    "RunPlan",
    "TrainConfig",
    "TrainData",
    "accuracy",
    "cache_data",
    "distill_online",
    "early_stop",
    "fit",
    "plan_run",
    "random_shift",
    "resume_training",
    "share_of",
    "train_student",
    "train_teacher",
]
