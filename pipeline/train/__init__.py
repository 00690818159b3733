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

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> its module, imported on first use: reading a run's config.json
# (``report``) needs ``config`` alone, not the loop's torch and timm
_NAMES = {
    "EpochBatches": "batches", "TrainData": "batches", "random_shift": "batches",
    "share_of": "batches", "TrainConfig": "config", "distill_online": "entry",
    "resume_training": "entry", "train_student": "entry", "train_teacher": "entry",
    "METRIC_COLUMNS": "loop", "accuracy": "loop", "early_stop": "loop", "fit": "loop",
    "RunPlan": "plan", "cache_data": "plan", "plan_run": "plan",
    "CachedDistillation": "step", "OnlineDistillation": "step",
}  # fmt: skip

if TYPE_CHECKING:
    from kdpipe.train.batches import EpochBatches, TrainData, random_shift, share_of
    from kdpipe.train.config import TrainConfig
    from kdpipe.train.entry import distill_online, resume_training, train_student, train_teacher
    from kdpipe.train.loop import METRIC_COLUMNS, accuracy, early_stop, fit
    from kdpipe.train.plan import RunPlan, cache_data, plan_run
    from kdpipe.train.step import CachedDistillation, OnlineDistillation


def __getattr__(name: str) -> Any:
    if name not in _NAMES:
        raise AttributeError(f"module 'kdpipe.train' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"kdpipe.train.{_NAMES[name]}"), name)
    globals()[name] = value
    return value


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
