"""kdpipe: offline knowledge distillation.

Stage one (:func:`cache_teacher`) runs a teacher once and stores its
temperature-softened log-probabilities in a Zarr cache; stage two
(:func:`train_student`) trains students from that cache without loading the
teacher again. In your own training loop, ``import kdpipe as kd``:
:func:`open_cache` reads a cache, :class:`DistillationDataset` pairs it with your
dataset (the stored views replayed), :func:`distillation_loss` is the loss
``train-student`` uses. ``docs/python-api.md`` documents this surface, the names
in ``__all__``; every other module and name is kdpipe's own and may change.

The names are imported on first use, so that ``import kdpipe`` (and the command
line's start-up) does not pay for torch, timm and zarr until they are needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_SURFACE = {
    "open_cache": "kdpipe.api",
    "Cache": "kdpipe.api",
    "DistillationDataset": "kdpipe.api",
    "Run": "kdpipe.api",
    "load_run": "kdpipe.api",
    "distillation_loss": "kdpipe.tasks.classify.loss",
    "load_dataset": "kdpipe.data.datasets",
    "ImageSet": "kdpipe.data.datasets",
    "CacheConfig": "kdpipe.models.teach",
    "cache_teacher": "kdpipe.models.teach",
    "ViewPolicy": "kdpipe.views.policy",
    "TrainConfig": "kdpipe.train",
    "train_teacher": "kdpipe.train",
    "train_student": "kdpipe.train",
    "create_model": "kdpipe.models.registry",
    "weights_sha256": "kdpipe.models.registry",
    "DataConfig": "kdpipe.views.inputs",
    "KdpipeError": "kdpipe.base.errors",
}

__all__ = [  # the public surface (tests/test_api.py keeps it equal to _SURFACE, documented)
    "Cache",
    "CacheConfig",
    "DataConfig",
    "DistillationDataset",
    "ImageSet",
    "KdpipeError",
    "Run",
    "TrainConfig",
    "ViewPolicy",
    "__version__",
    "cache_teacher",
    "create_model",
    "distillation_loss",
    "load_dataset",
    "load_run",
    "open_cache",
    "train_student",
    "train_teacher",
    "weights_sha256",
]

if TYPE_CHECKING:  # what type checkers and editors see; at run time, __getattr__ below
    from kdpipe.api import Cache, DistillationDataset, Run, load_run, open_cache
    from kdpipe.base.errors import KdpipeError
    from kdpipe.data.datasets import ImageSet, load_dataset
    from kdpipe.models.registry import create_model, weights_sha256
    from kdpipe.models.teach import CacheConfig, cache_teacher
    from kdpipe.tasks.classify.loss import distillation_loss
    from kdpipe.train import TrainConfig, train_student, train_teacher
    from kdpipe.views.inputs import DataConfig
    from kdpipe.views.policy import ViewPolicy


def __getattr__(name: str) -> Any:
    if name not in _SURFACE:
        raise AttributeError(f"module 'kdpipe' has no attribute {name!r}")
    value = getattr(importlib.import_module(_SURFACE[name]), name)
    globals()[name] = value  # imported once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_SURFACE})
