"""Stage one for detection: a YOLO teacher run once over the train split's stored views.

Per image, ``views`` views (view 0 the plain letterbox, the others drawn by
:func:`kdpipe.tasks.detect.views.draw_views` from the seed); per view the cache holds the
teacher's raw head outputs (dense, or its top-K anchors by class logit), the view's ground
truth after its geometry, and its seven parameters (``docs/cache-format.md``, detection).
The store, the writer, resume, the single-writer lock and the chunk loop are the
classification pass's own (:mod:`kdpipe.cache`, :func:`kdpipe.models.teach.write_chunks`):
only what a chunk holds is computed here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from kdpipe.base.distributed import current_world
from kdpipe.base.errors import DatasetError, TeacherOutputError, UsageError
from kdpipe.base.runtime import check_disjoint, quiet, resolve_device, software_versions
from kdpipe.cache import (
    DETECT_DTYPES,
    DETECT_FORMAT_VERSION,
    DETECT_VALUES,
    RANKING,
    STATUS_COMPLETE,
    STATUS_WRITING,
    CacheWriter,
    DetectionManifest,
    Location,
    anchor_count,
    derive_detection_cache_id,
    derive_detection_teacher_id,
    read_detection_manifest,
    utc_now,
)
from kdpipe.data.datasets import check_classes
from kdpipe.data.yolo import DetectionSplit, is_data_yaml, load_detection_split, read_data_yaml
from kdpipe.models.runs import is_detection_run
from kdpipe.models.teach import open_writer, single_writer, write_chunks
from kdpipe.tasks.detect.runs import DetectionCard, load_detection_run
from kdpipe.tasks.detect.targets import DetectBatch
from kdpipe.tasks.detect.views import DetectAugment, draw_views, read_image, render
from kdpipe.tasks.detect.yolo import head_outputs
from tqdm.auto import tqdm

DETECT_CHUNK_SIZE = 64  # rows per chunk: at 160 px a yolo11n view is 72 KB dense
DETECT_BATCH_SIZE = 32


def teacher_task(teachers: Sequence[str], data: str) -> str:
    """``detect`` or ``classify``: what ``cache-teacher --teacher ... --data ...`` asks for,
    read from the teacher run's ``model.json`` and the data's kind; a detection teacher with
    data that holds no boxes, or a data YAML with a classification teacher, is one line."""
    detection = [is_detection_run(Path(teacher)) for teacher in teachers]
    yaml = is_data_yaml(str(data))
    if any(detection) and len(teachers) > 1:
        raise UsageError("a detection cache has one teacher: pass one --teacher (ensembles are "
                         "for classification teachers)")  # fmt: skip
    if any(detection) and not yaml:
        raise DatasetError(f"{teachers[0]} is a detection teacher: --data must be a YOLO data "
                           f"YAML (DATA.yaml with train/val folders and labels), not {data!r}, "
                           "which holds no boxes")  # fmt: skip
    if yaml and not any(detection):
        raise DatasetError(f"{data} is a YOLO detection data YAML but {teachers[0]} is not a "
                           "detection teacher: give a detection run (train-teacher --model "
                           "yolo11n.yaml --data DATA.yaml, or import-teacher "
                           "ultralytics:best.pt)")  # fmt: skip
    return "detect" if any(detection) else "classify"


@dataclass(frozen=True, kw_only=True)
class DetectCacheConfig:
    """The settings of one detection teacher pass."""

    teacher: str  # a detection run directory
    data: str  # a YOLO data YAML; its train split is cached
    out: str
    views: int = 1
    top_k: int | None = None  # anchors kept per view (None: every anchor, dense)
    seed: int = 0
    image_size: int | None = None  # the views' canvas (None: the teacher's own image size)
    batch_size: int = DETECT_BATCH_SIZE
    chunk_size: int = DETECT_CHUNK_SIZE
    dtype: str = "float16"
    device: str = "auto"
    overwrite: bool = False
    augment: DetectAugment = field(default_factory=DetectAugment)

    def validate(self) -> None:
        if self.views < 1:
            raise UsageError(f"--views must be >= 1, not {self.views}")
        if self.top_k is not None and self.top_k < 1:
            raise UsageError(f"--top-k must be >= 1, not {self.top_k}")
        if self.batch_size < 1 or self.chunk_size < 1:
            raise UsageError("--batch-size and --chunk-size must be >= 1")
        if self.dtype not in DETECT_DTYPES:
            raise UsageError(f"--dtype must be {' or '.join(DETECT_DTYPES)}, not {self.dtype!r}")


def teacher_record(card: DetectionCard, model: torch.nn.Module, run_dir: str) -> dict:
    """The teacher as the manifest records it (``TEACHER_KEYS``)."""
    return {"architecture": card.architecture, "weights_sha256": card.weights_sha256,
            "run_dir": str(run_dir), "num_classes": card.num_classes,
            "classes": list(card.classes), "strides": list(card.strides),
            "reg_max": card.reg_max, "end2end": card.end2end, "image_size": card.image_size,
            "param_count": sum(p.numel() for p in model.parameters())}  # fmt: skip


def canvas_size(card: DetectionCard, image_size: int | None) -> int:
    """The views' square side: the teacher's own unless given, a multiple of its largest
    stride (else the grid of anchors would not cover the canvas)."""
    size = card.image_size if image_size is None else image_size
    if size < max(card.strides) or size % max(card.strides):
        raise UsageError(f"--image-size must be a multiple of {max(card.strides)} (the "
                         f"teacher's largest stride), not {size}")  # fmt: skip
    return size


def cache_detection_teacher(
    config: DetectCacheConfig, log: Callable[[str], None] = print
) -> DetectionManifest:
    """Run the detection teacher over every view of the train split once; write the cache."""
    config.validate()
    world = current_world()
    if not world.is_main:
        log = quiet
    out = Location(config.out)
    data = read_data_yaml(config.data)
    split = load_detection_split(data, "train")
    device = resolve_device(config.device)
    model, card = load_detection_run(Path(config.teacher))
    check_classes(card.classes, data.names, f"the teacher {config.teacher}", str(data.yaml_file))
    size = canvas_size(card, config.image_size)
    anchors = anchor_count(size, card.strides)
    if config.top_k is not None and config.top_k > anchors:
        raise UsageError(f"--top-k {config.top_k} is more than the {anchors} anchors of a "
                         f"{size} px view")  # fmt: skip
    check_disjoint(out, [config.teacher, data.root])
    manifest = new_manifest(config, split, teacher_record(card, model, config.teacher), size)
    with single_writer(out, world):
        opened = world.on_main(
            lambda: open_writer(out, manifest, overwrite=config.overwrite, log=log).manifest
        )
        if opened.status == STATUS_COMPLETE:
            return opened
        writer = CacheWriter(out, read_detection_manifest(out), resume=True)
        chunks = DetectionChunks(config, model.to(device), split, manifest, device)
        write_chunks(writer, chunks, world, log)
        manifest = world.on_main(writer.finish)
    log(f"{out}: {manifest.num_samples} images x {manifest.num_views} view(s) x "
        f"{manifest.num_anchors} anchors ({manifest.describe_storage()}), cache_id "
        f"{manifest.cache_id}, teacher_id {manifest.teacher_id}")  # fmt: skip
    return manifest


def new_manifest(
    config: DetectCacheConfig, split: DetectionSplit, teacher: dict, size: int
) -> DetectionManifest:
    """The manifest of the cache these arguments make, its ids derived."""
    storage = {"kind": "dense", "k": None, "ranking": None}
    if config.top_k is not None:
        storage = {"kind": "top-k", "k": config.top_k, "ranking": RANKING}
    rows = len(split)
    manifest = DetectionManifest(
        task="detect", format_version=DETECT_FORMAT_VERSION, status=STATUS_WRITING,
        cache_id="", teacher_id=derive_detection_teacher_id(teacher), teacher=teacher,
        values=DETECT_VALUES,
        dataset={"name": str(split.data.yaml_file), "split": split.split,
                 "fingerprint": split.fingerprint},
        classes=list(split.data.names), seed=config.seed, views=asdict(config.augment),
        storage=storage, num_samples=rows, num_views=config.views,
        num_classes=teacher["num_classes"], strides=list(teacher["strides"]),
        reg_max=teacher["reg_max"], image_size=size,
        num_anchors=anchor_count(size, teacher["strides"]),
        max_boxes=max(1, max(len(boxes) for boxes in split.boxes)), dtype=config.dtype,
        chunk_size=min(config.chunk_size, rows), array_metadata_sha256={},
        software={**software_versions(), "ultralytics": _ultralytics_version()},
        created=utc_now(), completed=None,
    )  # fmt: skip
    return replace(manifest, cache_id=derive_detection_cache_id(manifest))


def _ultralytics_version() -> str:
    from kdpipe.tasks.detect.yolo import ultralytics

    return str(ultralytics().__version__)


def render_views(
    split: DetectionSplit, rows: np.ndarray, params: np.ndarray, size: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Every view of ``rows`` (dataset indices) rendered from its image and its stored
    parameters ``(len(rows), V, 7)``: canvases and boxes, row by row, view by view."""
    canvases, boxes = [], []
    for row, views in zip(rows, params, strict=True):
        image = read_image(split.paths[int(row)])
        for view in views:
            canvas, kept = render(image, split.boxes[int(row)], view, size)
            canvases.append(canvas)
            boxes.append(kept)
    return canvases, boxes


@torch.no_grad()
def teacher_outputs(
    model: torch.nn.Module, canvases: list[np.ndarray], device: torch.device, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's raw ``scores`` (n, nc, A) and ``boxes`` (n, 4 * reg_max, A) on the
    canvases, float32 on the CPU, in batches: the input tensor is the one
    :class:`DetectBatch` gives a student, so teacher and student see the same pixels."""
    scores, boxes = [], []
    for start in range(0, len(canvases), batch_size):
        part = canvases[start : start + batch_size]
        images = DetectBatch.from_views(part, [np.zeros((0, 5), np.float32)] * len(part)).images
        outputs = head_outputs(model, images.to(device))
        scores.append(outputs["scores"].float().cpu())
        boxes.append(outputs["boxes"].float().cpu())
    return torch.cat(scores), torch.cat(boxes)


def encode_outputs(
    scores: torch.Tensor, boxes: torch.Tensor, top_k: int | None
) -> dict[str, torch.Tensor]:
    """A chunk's head outputs ``(n, V, nc, A)``, ``(n, V, 4 * reg_max, A)`` as the storage
    keeps them: all of them, or the ``top_k`` anchors by their highest class logit (sorted,
    highest first) with both outputs at them."""
    if top_k is None:
        return {"scores": scores, "boxes": boxes}
    anchors = scores.amax(dim=2).topk(top_k, dim=-1).indices  # (n, V, K)

    def at(values: torch.Tensor) -> torch.Tensor:
        index = anchors[:, :, None, :].expand(-1, -1, values.shape[2], -1)
        return values.gather(3, index)

    return {"topk_anchors": anchors.int(), "topk_scores": at(scores), "topk_boxes": at(boxes)}


def ground_truth(boxes: list[np.ndarray], rows: int, views: int, max_boxes: int) -> dict:
    """The views' boxes as the padded ``gt_boxes`` (rows, V, max_boxes, 5), -1 past each
    view's ``gt_counts``."""
    padded = np.full((rows * views, max_boxes, 5), -1.0, np.float32)
    counts = np.zeros(rows * views, np.int32)
    for i, kept in enumerate(boxes):
        padded[i, : len(kept)] = kept
        counts[i] = len(kept)
    return {"gt_boxes": padded.reshape(rows, views, max_boxes, 5),
            "gt_counts": counts.reshape(rows, views)}  # fmt: skip


@dataclass(frozen=True)
class DetectionChunks:
    """What the detection pass computes, one chunk of rows at a time (the shape
    :func:`kdpipe.models.teach.write_chunks` asks for: ``rows``, ``rows_of``, ``compute``,
    ``config.views``)."""

    config: DetectCacheConfig
    model: torch.nn.Module
    split: DetectionSplit
    manifest: DetectionManifest
    device: torch.device

    @property
    def rows(self) -> np.ndarray:
        return np.arange(self.manifest.num_samples, dtype=np.int64)

    def rows_of(self, index: int) -> slice:
        step = self.manifest.chunk_size
        return slice(index * step, (index + 1) * step)

    def compute(self, index: int, progress: tqdm) -> dict[str, np.ndarray]:
        m = self.manifest
        rows = self.rows[self.rows_of(index)]
        params = draw_views(rows, m.num_views, m.seed, DetectAugment(**m.views))
        canvases, boxes = render_views(self.split, rows, params, m.image_size)
        scores, head_boxes = teacher_outputs(self.model, canvases, self.device,
                                             self.config.batch_size)  # fmt: skip
        progress.update(len(canvases))
        shape = (len(rows), m.num_views)
        # ranked in float32 (the teacher's own order), then stored in the cache's dtype
        encoded = encode_outputs(scores.reshape(*shape, *scores.shape[1:]),
                                 head_boxes.reshape(*shape, *head_boxes.shape[1:]),
                                 m.top_k)  # fmt: skip
        dtype = getattr(torch, m.dtype)
        encoded = {name: value.to(dtype) if value.is_floating_point() else value
                   for name, value in encoded.items()}  # fmt: skip
        floats = [v.flatten(2) for v in encoded.values() if v.is_floating_point()]
        bad = ~torch.isfinite(torch.cat(floats, 2)).all(2).all(1)
        if bad.any():
            images = [int(rows[i]) for i in bad.nonzero().flatten()]
            raise TeacherOutputError(f"the teacher produced NaN or Inf (as {m.dtype}) on "
                                     f"image(s) {', '.join(map(str, images[:10]))}; "
                                     f"{self.config.out} is left incomplete")  # fmt: skip
        return {**{name: value.numpy() for name, value in encoded.items()},
                **ground_truth(boxes, len(rows), m.num_views, m.max_boxes),
                "views": params, "indices": rows}  # fmt: skip
