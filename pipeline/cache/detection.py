"""The detection cache's manifest, apart from any I/O: what a detector's cache holds.

The same store as a classification cache (a Zarr v3 group, crc32c and zstd on every chunk,
position digests, per-chunk progress flags, the manifest and its checksum in the group's
attributes under ``kdpipe``, ``complete`` last), so the writer, resume and the checks are
shared; the manifest says ``"task": "detect"`` and lists other arrays
(:func:`detection_array_specs`), all chunked along the row axis:

- ``dense``: ``scores`` ``(N, V, nc, A)`` and ``boxes`` ``(N, V, 4 * reg_max, A)``, the
  teacher's raw class logits (before the sigmoid) and box logits (DFL distributions before
  the softmax; plain box values when reg_max is 1) at every anchor of the view, float16;
- ``top-k``: only the K anchors with the highest class logit (the teacher's max over
  classes): ``topk_anchors`` ``(N, V, K)`` int32 (sorted by that logit, highest first) and
  ``topk_scores`` ``(N, V, nc, K)``, ``topk_boxes`` ``(N, V, 4 * reg_max, K)`` at them; an
  anchor not stored is background for a student (no object, no box target);
- ``gt_boxes`` ``(N, V, max_boxes, 5)`` float32 (``class cx cy w h`` normalised to the
  view's canvas; rows from ``gt_counts`` on are -1) and ``gt_counts`` ``(N, V)`` int32: the
  view's own ground truth, after its geometry;
- ``views`` ``(N, V, 7)`` float32: the view parameters (:data:`DETECT_VIEW_FIELDS`, drawn
  and rendered by ``kdpipe.tasks.detect.views``), and ``indices`` ``(N,)`` int64: each
  row's image in the split's canonical order.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from typing import Any

from kdpipe.base.errors import ManifestError
from kdpipe.base.spec import check_field, check_keys, check_object

TASK = "detect"
DETECT_FORMAT_VERSION = 1
DETECT_VIEW_FIELDS = ("scale", "translate_x", "translate_y", "flip", "hue", "saturation", "value")
DETECT_STORAGE = ("dense", "top-k")
DETECT_DTYPES = ("float16", "float32")
DETECT_VALUES = (
    "raw head outputs of the teacher in eval mode: class logits (before the sigmoid) and box "
    "logits (DFL distributions before their softmax, or box values when reg_max is 1)"
)
RANKING = "the anchor's highest class logit"  # what top-k keeps the K highest of
TEACHER_KEYS = ("architecture", "weights_sha256", "run_dir", "num_classes", "classes",
                "strides", "reg_max", "end2end", "image_size", "param_count")  # fmt: skip
STATUSES = ("writing", "complete")


def _digest(payload: Any) -> str:
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def anchor_count(image_size: int, strides: list[int] | tuple[int, ...]) -> int:
    """Anchors of a square ``image_size`` canvas: one per cell of each stride's grid."""
    return sum((image_size // stride) ** 2 for stride in strides)


@dataclass(frozen=True, kw_only=True)
class DetectionManifest:
    """Everything that produced a detection cache, and whether it is finished."""

    task: str  # "detect": what tells this manifest from a classification one
    format_version: int
    status: str
    cache_id: str
    teacher_id: str
    teacher: dict  # TEACHER_KEYS: the teacher's card as the cache records it
    values: str
    dataset: dict  # name (the data YAML), split, fingerprint {count, num_classes, classes, sha256}
    classes: list
    seed: int  # drew the views
    views: dict  # the ranges the views were drawn from (DetectAugment's fields)
    storage: dict  # kind dense or top-k, k, ranking
    num_samples: int
    num_views: int
    num_classes: int
    strides: list
    reg_max: int
    image_size: int  # the views' square canvas
    num_anchors: int
    max_boxes: int
    dtype: str
    chunk_size: int
    array_metadata_sha256: dict
    software: dict
    created: str
    completed: str | None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str = "manifest") -> DetectionManifest:
        check_object(data, where)
        check_keys(data, cls, where)
        kinds = {"teacher": dict, "dataset": dict, "classes": list, "views": dict,
                 "storage": dict, "strides": list, "array_metadata_sha256": dict,
                 "software": dict, "completed": (str, type(None))}  # fmt: skip
        values = {}
        for item in fields(cls):
            default = int if item.type == "int" else str
            values[item.name] = check_field(data, item.name, kinds.get(item.name, default), where)
        manifest = cls(**values)
        manifest._check(where)
        return manifest

    def _check(self, where: str) -> None:
        """The fields that must agree with each other before anything reads the arrays."""
        if self.task != TASK or self.format_version != DETECT_FORMAT_VERSION:
            raise ManifestError(f"{where}: task {self.task!r}, format {self.format_version}: "
                                f"not a detection cache this kdpipe reads (task {TASK!r}, "
                                f"format {DETECT_FORMAT_VERSION})")  # fmt: skip
        kind = self.storage.get("kind")
        for name, value, allowed in (("status", self.status, STATUSES),
                                     ("dtype", self.dtype, DETECT_DTYPES),
                                     ("storage kind", kind, DETECT_STORAGE)):  # fmt: skip
            if value not in allowed:
                raise ManifestError(f"{where}: {name} {value!r} is not one of "
                                    f"{', '.join(allowed)}")  # fmt: skip
        missing = [key for key in TEACHER_KEYS if key not in self.teacher]
        if missing or set(self.teacher) - set(TEACHER_KEYS):
            raise ManifestError(f"{where}: teacher must have exactly {', '.join(TEACHER_KEYS)}")
        for key in ("name", "split", "fingerprint"):
            if key not in self.dataset:
                raise ManifestError(f"{where}: dataset has no {key!r}")
        positive = {"num_samples": self.num_samples, "num_views": self.num_views,
                    "num_classes": self.num_classes, "reg_max": self.reg_max,
                    "image_size": self.image_size, "num_anchors": self.num_anchors,
                    "max_boxes": self.max_boxes, "chunk_size": self.chunk_size}  # fmt: skip
        for name, value in positive.items():
            if value < 1:
                raise ManifestError(f"{where}: {name} {value} is not >= 1")
        if not self.strides or not all(isinstance(s, int) and s >= 1 for s in self.strides):
            raise ManifestError(f"{where}: strides {self.strides!r} is not a list of sizes")
        if self.num_anchors != anchor_count(self.image_size, self.strides):
            raise ManifestError(f"{where}: num_anchors {self.num_anchors} is not what image_size "
                                f"{self.image_size} and strides {self.strides} give "
                                f"({anchor_count(self.image_size, self.strides)})")  # fmt: skip
        k = self.storage.get("k")
        if self.storage["kind"] == "top-k" and not (
            isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= self.num_anchors
        ):
            raise ManifestError(f"{where}: storage k {k!r} is not in 1..{self.num_anchors}")
        if len(self.classes) != self.num_classes:
            raise ManifestError(f"{where}: {len(self.classes)} class names for "
                                f"{self.num_classes} classes")  # fmt: skip

    @property
    def top_k(self) -> int | None:
        """K of a top-k cache; None for a dense one."""
        return self.storage["k"] if self.storage["kind"] == "top-k" else None

    @property
    def box_channels(self) -> int:
        return 4 * self.reg_max

    def describe_storage(self) -> str:
        return "dense" if self.top_k is None else f"top-{self.top_k} anchors"

    def identity(self) -> dict:
        """The fields the ``cache_id`` is derived from: same inputs, same id."""
        return {"task": self.task, "format_version": self.format_version,
                "teacher_id": self.teacher_id, "values": self.values,
                "dataset_sha256": self.dataset["fingerprint"]["sha256"],
                "split": self.dataset["split"], "seed": self.seed, "views": self.views,
                "storage": self.storage, "num_views": self.num_views,
                "image_size": self.image_size, "max_boxes": self.max_boxes,
                "dtype": self.dtype}  # fmt: skip


def detection_array_specs(
    manifest: DetectionManifest,
) -> dict[str, tuple[tuple[int, ...], str, int | float]]:
    """Every data array of a detection cache: name -> (shape, dtype, fill value)."""
    n, v, nc = manifest.num_samples, manifest.num_views, manifest.num_classes
    boxes, k = manifest.box_channels, manifest.top_k
    if k is None:
        head = {"scores": ((n, v, nc, manifest.num_anchors), manifest.dtype, 0.0),
                "boxes": ((n, v, boxes, manifest.num_anchors), manifest.dtype, 0.0)}  # fmt: skip
    else:
        head = {"topk_anchors": ((n, v, k), "int32", -1),
                "topk_scores": ((n, v, nc, k), manifest.dtype, 0.0),
                "topk_boxes": ((n, v, boxes, k), manifest.dtype, 0.0)}  # fmt: skip
    return {**head, "gt_boxes": ((n, v, manifest.max_boxes, 5), "float32", -1.0),
            "gt_counts": ((n, v), "int32", -1),
            "views": ((n, v, len(DETECT_VIEW_FIELDS)), "float32", 0.0),
            "indices": ((n,), "int64", -1)}  # fmt: skip


def derive_detection_teacher_id(teacher: dict) -> str:
    """What the teacher computes: its architecture and its weights (not where they lie)."""
    return _digest({"task": TASK, "architecture": teacher["architecture"],
                    "weights_sha256": teacher["weights_sha256"]})  # fmt: skip


def derive_detection_cache_id(manifest: DetectionManifest) -> str:
    return _digest(manifest.identity())


def describe_detection_differences(
    existing: DetectionManifest, wanted: DetectionManifest
) -> list[str]:
    """What makes ``existing`` another detection cache than ``wanted`` (empty: the same
    cache, which a partial one can resume into)."""
    differences = []
    if existing.teacher_id != wanted.teacher_id:
        differences.append(f"teacher {existing.teacher['architecture']}@"
                           f"{existing.teacher['weights_sha256'][:12]} != "
                           f"{wanted.teacher['architecture']}@"
                           f"{wanted.teacher['weights_sha256'][:12]}")  # fmt: skip
    old, new = existing.dataset, wanted.dataset
    if (old["name"], old["split"]) != (new["name"], new["split"]):
        differences.append(f"data {old['name']} {old['split']} != {new['name']} {new['split']}")
    elif old["fingerprint"] != new["fingerprint"]:
        differences.append("data fingerprint differs (same data YAML and split, other content)")
    for name in ("num_views", "views", "seed", "storage", "image_size", "max_boxes", "dtype",
                 "chunk_size", "values", "format_version"):  # fmt: skip
        if getattr(existing, name) != getattr(wanted, name):
            differences.append(f"{name} {getattr(existing, name)} != {getattr(wanted, name)}")
    return differences


def detection_field_problems(manifest: DetectionManifest) -> list[str]:
    """What the manifest's fields outside the ``cache_id`` contradict (``verify`` reports
    them): the teacher's record against the cache's classes, grid and dataset."""
    problems = []
    teacher, fingerprint = manifest.teacher, manifest.dataset["fingerprint"]
    if manifest.values != DETECT_VALUES:
        problems.append(f"values {manifest.values!r} is not {DETECT_VALUES!r}")
    for name in ("num_classes", "strides", "reg_max"):
        if teacher[name] != getattr(manifest, name):
            problems.append(f"teacher {name} {teacher[name]} is not the cache's "
                            f"{getattr(manifest, name)}")  # fmt: skip
    if teacher["classes"] != manifest.classes:
        problems.append("the teacher's class names are not the cache's")
    if not isinstance(fingerprint, dict) or fingerprint.get("count", 0) < manifest.num_samples:
        problems.append(f"dataset fingerprint {fingerprint!r} counts fewer images than the "
                        f"{manifest.num_samples} rows")  # fmt: skip
    elif fingerprint.get("classes") != manifest.classes:
        problems.append("the dataset's class names are not the cache's")
    if manifest.chunk_size > manifest.num_samples:
        problems.append(f"chunk_size {manifest.chunk_size} is not 1..{manifest.num_samples}")
    if (manifest.status == "complete") != (manifest.completed is not None):
        problems.append(f"status {manifest.status!r} with completed {manifest.completed!r}")
    return problems
