"""kdpipe: offline knowledge distillation.

Stage one (:func:`cache_teacher`) runs a teacher once and stores its
temperature-softened log-probabilities in a Zarr cache; stage two
(:func:`train_student`) trains students from that cache without loading the
teacher again. In your own training loop, ``import pipeline as kd``:
:func:`open_cache` reads a cache, :class:`DistillationDataset` pairs it with your
dataset (the stored views replayed), :func:`distillation_loss` is the loss
``train-student`` uses. ``docs/python-api.md`` documents this surface, the names
in ``__all__``; every other module and name is kdpipe's own and may change.

The names are imported on first use, so that ``import pipeline`` (and the command
line's start-up) does not pay for torch, timm and zarr until they are needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_SURFACE = {
    "open_cache": "pipeline.api",
    "Cache": "pipeline.api",
    "DistillationDataset": "pipeline.api",
    "distillation_loss": "pipeline.losses",
    "load_dataset": "pipeline.data",
    "ImageSet": "pipeline.data",
    "CacheConfig": "pipeline.teach",
    "cache_teacher": "pipeline.teach",
    "ViewPolicy": "pipeline.views",
    "TrainConfig": "pipeline.train",
    "train_teacher": "pipeline.train",
    "train_student": "pipeline.train",
    "create_model": "pipeline.models",
    "weights_sha256": "pipeline.models",
    "DataConfig": "pipeline.inputs",
    "KdpipeError": "pipeline.errors",
}

__all__ = [  # the public surface (tests/test_api.py keeps it equal to _SURFACE, documented)
    "Cache",
    "CacheConfig",
    "DataConfig",
    "DistillationDataset",
    "ImageSet",
    "KdpipeError",
    "TrainConfig",
    "ViewPolicy",
    "__version__",
    "cache_teacher",
    "create_model",
    "distillation_loss",
    "load_dataset",
    "open_cache",
    "train_student",
    "train_teacher",
    "weights_sha256",
]

if TYPE_CHECKING:  # what type checkers and editors see; at run time, __getattr__ below
    from pipeline.api import Cache, DistillationDataset, open_cache
    from pipeline.data import ImageSet, load_dataset
    from pipeline.errors import KdpipeError
    from pipeline.inputs import DataConfig
    from pipeline.losses import distillation_loss
    from pipeline.models import create_model, weights_sha256
    from pipeline.teach import CacheConfig, cache_teacher
    from pipeline.train import TrainConfig, train_student, train_teacher
    from pipeline.views import ViewPolicy


def __getattr__(name: str) -> Any:
    if name not in _SURFACE:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(_SURFACE[name]), name)
    globals()[name] = value  # imported once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_SURFACE})
