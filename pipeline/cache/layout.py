"""How a cache stores the teacher's distribution: one object per storage layout.

A layout owns its arrays (names, shapes, dtypes, fill values), how a chunk of
log-probabilities is encoded into them and decoded back, the teacher's top class,
and the checks of a chunk's stored values. Writer, readers, ``verify``, the
teacher's accuracy and the tables ask the layout; no other module knows which
arrays a layout has. A new layout (say, sampled classes) is a new class here and a
``kind`` in :func:`storage_layout`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from kdpipe.base.errors import UsageError

if TYPE_CHECKING:  # for annotations: imported where they are used, so that a command
    # that reads records only loads no deep-learning library
    import torch

STORAGE_KINDS = ("dense", "top-k")
ArraySpecs = dict[str, tuple[tuple[int, ...], str, int | float]]


def index_dtype(num_classes: int) -> str:
    """int16 class indices where they fit (C <= 32767), int32 beyond."""
    return "int16" if num_classes <= 32767 else "int32"


def _logsumexp(values: np.ndarray) -> np.ndarray:
    top = values.max(axis=-1, keepdims=True)
    return (top + np.log(np.exp(values - top).sum(axis=-1, keepdims=True)))[..., 0]


# the share of a chunk's rows and views stored exactly uniform above which a cache is refused
# (writer) or failed (verify): an unsure teacher's odd flat row at a usable T is harmless,
# a T too high for the dtype flattens most rows (T = 1000 in float16: all of them)
UNIFORM_SHARE = 0.25


def _all_equal(values: np.ndarray) -> np.ndarray:
    """Rows whose stored values are all the same: a uniform distribution (dense), or top K
    without an order (top-k), where the teacher's ranking is lost (a T too high for the
    dtype). One stored value (K = 1, C = 1) says nothing either way."""
    if values.shape[-1] < 2:
        return np.zeros(values.shape[:-1], dtype=bool)
    return values.max(axis=-1) == values.min(axis=-1)


@dataclass(frozen=True)
class Dense:
    """Every class's log-probability: ``logprobs`` ``(N, V, C)``."""

    num_classes: int
    kind = "dense"
    names = ("logprobs",)
    values_name = "logprobs"
    retemperable = True  # log_softmax(z / T) holds z up to a constant: any T is exact

    @property
    def storage(self) -> dict:
        """The manifest's ``storage`` record."""
        return {"kind": self.kind, "k": None}

    def describe(self) -> str:
        return "dense"

    def arrays(self, num_samples: int, num_views: int, dtype: str) -> ArraySpecs:
        return {"logprobs": ((num_samples, num_views, self.num_classes), dtype, 0.0)}

    def encode(self, log_probs: torch.Tensor) -> dict[str, np.ndarray]:
        """A chunk of float32 log-probabilities ``(n, V, C)`` as this layout's arrays."""
        return {"logprobs": log_probs.numpy()}

    def decode(self, stored: dict[str, torch.Tensor]) -> torch.Tensor:
        """This layout's arrays back to float32 log-probabilities ``(n, V, C)``."""
        return stored["logprobs"].float()

    def top1(self, stored: dict[str, np.ndarray]) -> np.ndarray:
        """The teacher's top class of each row and view."""
        return stored["logprobs"].argmax(-1)

    def like_stored(self, log_probs: np.ndarray, stored: dict[str, np.ndarray]) -> np.ndarray:
        """Fresh log-probabilities in the shape of the stored values, to compare them."""
        return log_probs

    def problems(self, values: np.ndarray, stored: dict[str, np.ndarray], tolerance: float) -> dict:
        """Rows (as a boolean mask per check) whose stored values break this layout's rules:
        ``mass`` (how far from a distribution), ``invalid`` (indices), ``uniform``."""
        drift = np.abs(_logsumexp(values))  # each row is a distribution: it sums to 1
        return {"mass": drift, "invalid": np.zeros(values.shape[:-1], dtype=bool),
                "uniform": _all_equal(values)}  # fmt: skip


@dataclass(frozen=True)
class TopK:
    """The K largest log-probabilities and their classes, sorted (index 0 is the argmax):
    ``topk_logprobs`` and ``topk_indices`` ``(N, V, K)``. The leftover mass is spread
    uniformly over the other classes when read (:func:`reconstruct_top_k`)."""

    num_classes: int
    k: int
    kind = "top-k"
    names = ("topk_logprobs", "topk_indices")
    values_name = "topk_logprobs"
    retemperable = False  # only T's top K survive: another T cannot be reconstructed

    @property
    def storage(self) -> dict:
        return {"kind": self.kind, "k": self.k}

    def describe(self) -> str:
        return f"top-{self.k}"

    def arrays(self, num_samples: int, num_views: int, dtype: str) -> ArraySpecs:
        shape = (num_samples, num_views, self.k)
        return {
            "topk_logprobs": (shape, dtype, 0.0),
            "topk_indices": (shape, index_dtype(self.num_classes), -1),
        }

    def encode(self, log_probs: torch.Tensor) -> dict[str, np.ndarray]:
        top = log_probs.topk(self.k, dim=-1)  # sorted: index 0 is the argmax
        return {"topk_logprobs": top.values.numpy(), "topk_indices": top.indices.numpy()}

    def decode(self, stored: dict[str, torch.Tensor]) -> torch.Tensor:
        return reconstruct_top_k(
            stored["topk_logprobs"].float(), stored["topk_indices"].long(), self.num_classes
        )

    def top1(self, stored: dict[str, np.ndarray]) -> np.ndarray:
        return stored["topk_indices"][..., 0]

    def like_stored(self, log_probs: np.ndarray, stored: dict[str, np.ndarray]) -> np.ndarray:
        return np.take_along_axis(log_probs, stored["topk_indices"].astype(np.int64), axis=-1)

    def problems(self, values: np.ndarray, stored: dict[str, np.ndarray], tolerance: float) -> dict:
        drift = np.clip(_logsumexp(values), 0, None)  # the top K of a row sum to at most 1
        top = stored["topk_indices"].astype(np.int64)
        ordered = (np.diff(values, axis=-1) <= 0).all(axis=-1)
        distinct = (np.diff(np.sort(top, axis=-1), axis=-1) > 0).all(axis=-1)
        valid = ((top >= 0) & (top < self.num_classes)).all(axis=-1) & ordered & distinct
        return {"mass": drift, "invalid": ~valid, "uniform": _all_equal(values)}


Layout = Dense | TopK


def storage_layout(storage: dict, num_classes: int) -> Layout:
    """The layout a manifest's ``storage`` record names."""
    if storage["kind"] == "top-k":
        return TopK(num_classes, storage["k"])
    return Dense(num_classes)


def layout_for(top_k: int | None, num_classes: int) -> Layout:
    """The layout ``--top-k`` asks for (None: dense), checked against the class count."""
    if top_k is None:
        return Dense(num_classes)
    if top_k < 1:
        raise UsageError(f"--top-k must be >= 1, not {top_k}")
    if top_k > num_classes:
        raise UsageError(f"--top-k {top_k} is more than the {num_classes} classes")
    return TopK(num_classes, top_k)


def reconstruct_top_k(
    top_logprobs: torch.Tensor, top_indices: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """Dense log-probabilities from the K largest: the leftover mass ``1 - sum(p_topk)``
    spread uniformly over the other ``C - K`` classes (the FKD / TinyViT rule).

    With K = C the stored distribution comes back as it is. The leftover is
    floored at a tiny positive mass, so that every class keeps a finite
    log-probability (float16 rounding can make the top-K sum exceed 1).
    """
    import torch

    k = top_logprobs.shape[-1]
    if k == num_classes:
        dense = torch.empty(*top_logprobs.shape[:-1], num_classes)
        return dense.scatter_(-1, top_indices.long(), top_logprobs)
    leftover = (1.0 - top_logprobs.exp().sum(-1, keepdim=True)).clamp_min(1e-8)
    fill = torch.log(leftover / (num_classes - k))
    dense = fill.expand(*top_logprobs.shape[:-1], num_classes).clone()
    return dense.scatter_(-1, top_indices.long(), top_logprobs)


def reconstruct_top_k_numpy(
    top_logprobs: np.ndarray, top_indices: np.ndarray, num_classes: int
) -> np.ndarray:
    """:func:`reconstruct_top_k` in numpy, the same rule in float32, for a table that reads
    a cache without torch (``kdpipe storage``)."""
    top_logprobs = top_logprobs.astype(np.float32)
    shape = (*top_logprobs.shape[:-1], num_classes)
    k = top_logprobs.shape[-1]
    if k == num_classes:
        dense = np.empty(shape, dtype=np.float32)
    else:
        leftover = np.maximum(1.0 - np.exp(top_logprobs).sum(-1, keepdims=True), 1e-8)
        dense = np.broadcast_to(np.log(leftover / (num_classes - k)), shape).astype(np.float32)
    np.put_along_axis(dense, top_indices.astype(np.int64), top_logprobs, axis=-1)
    return dense
