"""``kdpipe verify`` on a detection cache: the shared checks of the store (manifest,
arrays, every chunk's flag, files, crc32c and position digest), the values a detector's
cache must hold, the data's fingerprint and, with ``--recompute``, the teacher run again on
random rows: every view rendered from its stored parameters, its head outputs and its
ground truth compared with what is stored."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from kdpipe.base.errors import KdpipeError
from kdpipe.base.runtime import resolve_device
from kdpipe.cache import STATUS_COMPLETE, DetectionManifest, Location, detection_field_problems
from kdpipe.check.verify import VerifyReport, _check_chunks, _first, _open_arrays

# a logit stored in float16 keeps 11 significant bits: 1e-3 relative, and the teacher run
# again in other batches differs by float32 rounding
HEAD_TOLERANCE = {"float16": (2e-2, 2e-3), "float32": (1e-3, 1e-4)}  # absolute, relative
BOX_TOLERANCE = 1e-4  # ground truth: float32 arithmetic on the same numbers


def verify_detection(
    path: Location, manifest: DetectionManifest, report: VerifyReport, *,
    data: object = None, recompute: int = 0, teachers: Sequence[Path] = (),
    device: str = "auto", seed: int = 0,
) -> VerifyReport:  # fmt: skip
    """Every check of a detection cache, into ``report`` (``data``: its data YAML)."""
    report.add("manifest", True, f"detection format {manifest.format_version}, cache_id "
               f"{manifest.cache_id}")  # fmt: skip
    complete = manifest.status == STATUS_COMPLETE
    report.add("status", complete, f"status {manifest.status!r}"
               + ("" if complete else ": the teacher pass did not finish"))  # fmt: skip
    problems = detection_field_problems(manifest)
    report.add("fields", not problems, "; ".join(problems) or "consistent with each other")
    arrays = _open_arrays(path, manifest, report)
    if arrays is None:
        return report
    rows = _check_chunks(path, manifest, arrays, report,
                         lambda chunk, start: chunk_problems(manifest, chunk, start))  # fmt: skip
    if data is not None and not isinstance(data, str | Path):
        report.add("dataset", False, "a detection cache is checked against its data YAML "
                   "(--data DATA.yaml), not an image set")  # fmt: skip
        return report
    split = None
    if data is not None:
        split = _check_data(manifest, data, report)
    if recompute and rows is not None and split is not None:
        _recompute(manifest, arrays, split, teachers, recompute, device, seed, report)
    return report


def chunk_problems(manifest: DetectionManifest, chunk: dict, start: int) -> list[str]:
    """What is wrong with the values of one readable chunk of a detection cache."""
    problems = []
    heads = ("scores", "boxes") if manifest.top_k is None else ("topk_scores", "topk_boxes")
    for name in heads:
        bad = ~np.isfinite(chunk[name].reshape(len(chunk[name]), -1)).all(axis=1)
        if bad.any():
            problems.append(f"NaN or Inf in {name} at row(s) {_first(start + np.flatnonzero(bad))}")
    if manifest.top_k is not None:
        anchors = chunk["topk_anchors"].astype(np.int64)
        ranked = chunk["topk_scores"].astype(np.float32).max(axis=2)  # (n, V, K)
        valid = ((anchors >= 0) & (anchors < manifest.num_anchors)).all(axis=-1)
        valid &= (np.diff(np.sort(anchors, axis=-1), axis=-1) > 0).all(axis=-1)
        valid &= (np.diff(ranked, axis=-1) <= 0).all(axis=-1)
        if not valid.all():
            bad = start + np.flatnonzero(~valid.all(axis=-1))
            problems.append(f"top-k anchors out of range, repeated or not sorted by class logit "
                            f"at row(s) {_first(bad)}")  # fmt: skip
    problems += _ground_truth_problems(manifest, chunk, start)
    bad = (chunk["indices"] < 0) | (chunk["indices"] >= manifest.dataset["fingerprint"]["count"])
    bad |= ~np.isfinite(chunk["views"]).all(axis=(1, 2))
    if bad.any():
        problems.append(f"image indices or view parameters out of range at row(s) "
                        f"{_first(start + np.flatnonzero(bad))}")  # fmt: skip
    return problems


def _ground_truth_problems(manifest: DetectionManifest, chunk: dict, start: int) -> list[str]:
    """Counts within 0..max_boxes, each counted box a class of the cache with coordinates in
    [0, 1], every row past the count -1."""
    counts, boxes = chunk["gt_counts"], chunk["gt_boxes"]
    used = np.arange(manifest.max_boxes)[None, None, :] < counts[..., None]  # (n, V, M)
    classes, coordinates = boxes[..., 0], boxes[..., 1:]
    good = (counts >= 0) & (counts <= manifest.max_boxes)
    good &= np.where(used, (classes >= 0) & (classes < manifest.num_classes)
                     & (classes == np.round(classes)), True).all(axis=-1)  # fmt: skip
    inside = ((coordinates >= 0) & (coordinates <= 1)).all(axis=-1)
    good &= np.where(used, inside, (boxes == -1).all(axis=-1)).all(axis=-1)
    if good.all():
        return []
    return [f"ground-truth boxes or counts out of range at row(s) "
            f"{_first(start + np.flatnonzero(~good.all(axis=-1)))}"]  # fmt: skip


def _check_data(manifest: DetectionManifest, data: object, report: VerifyReport) -> object:
    """The data YAML's split against the cache's fingerprint (images and labels)."""
    from kdpipe.data.yolo import load_detection_split
    from kdpipe.tasks.detect.cache import check_split

    try:
        split = load_detection_split(str(data), manifest.dataset["split"])
        check_split(manifest, split, report.path)
    except KdpipeError as exc:
        report.add("dataset", False, str(exc))
        return None
    report.add("dataset", True, "fingerprint matches (images and labels)")
    return split


def _recompute(
    manifest: DetectionManifest, arrays: dict, split: object, teachers: Sequence[Path],
    count: int, device: str, seed: int, report: VerifyReport,
) -> None:  # fmt: skip
    """The teacher run again on every view of ``count`` random rows, against the store."""
    from kdpipe.tasks.detect.runs import load_detection_run
    from kdpipe.tasks.detect.teach import ground_truth, render_views, teacher_outputs

    if len(teachers) != 1:
        report.add("recompute", False, "a detection cache has one teacher: pass one --teacher")
        return
    try:
        model, card = load_detection_run(Path(teachers[0]))
    except KdpipeError as exc:
        report.add("recompute", False, str(exc))
        return
    if card.weights_sha256 != manifest.teacher["weights_sha256"]:
        report.add("recompute", False, f"--teacher {teachers[0]} is not the cache's teacher "
                   f"(weights {card.weights_sha256[:16]}, the cache's "
                   f"{manifest.teacher['weights_sha256'][:16]})")  # fmt: skip
        return
    torch_device = resolve_device(device)
    picked = np.sort(np.random.default_rng(seed).choice(
        manifest.num_samples, min(count, manifest.num_samples), replace=False))  # fmt: skip
    select = lambda name: arrays[name].get_orthogonal_selection(  # noqa: E731
        (picked, *[slice(None)] * (arrays[name].ndim - 1))
    )
    indices, params = select("indices"), select("views")
    canvases, boxes = render_views(split, indices, params, manifest.image_size)
    scores, head_boxes = teacher_outputs(model.to(torch_device), canvases, torch_device, 32)
    shape = (len(picked), manifest.num_views)
    scores = scores.numpy().reshape(*shape, *scores.shape[1:])  # (rows, V, nc, A)
    head_boxes = head_boxes.numpy().reshape(*shape, *head_boxes.shape[1:])
    fresh = {"scores": scores, "boxes": head_boxes}
    absolute, relative = HEAD_TOLERANCE[manifest.dtype]
    wrong, largest = np.zeros(len(picked), bool), 0.0
    if manifest.top_k is not None:  # the stored anchors must be the teacher's top K again
        stored_anchors = select("topk_anchors").astype(np.int64)
        rank = scores.max(axis=2)  # (rows, V, A)
        kth = np.sort(rank, axis=-1)[..., -manifest.top_k]
        at_stored = np.take_along_axis(rank, stored_anchors, axis=-1)
        wrong |= (at_stored < kth[..., None] - absolute).any(axis=(1, 2))
        index = stored_anchors[:, :, None, :]
        fresh = {"topk_scores": np.take_along_axis(scores, index, axis=-1),
                 "topk_boxes": np.take_along_axis(head_boxes, index, axis=-1)}  # fmt: skip
    for name in ("scores", "boxes") if manifest.top_k is None else ("topk_scores", "topk_boxes"):
        stored, new = select(name).astype(np.float32), np.asarray(fresh[name], np.float32)
        error = np.abs(stored - new)
        largest = max(largest, float(error.max()))
        wrong |= (error > absolute + relative * np.abs(new)).reshape(len(picked), -1).any(axis=1)
    truth = ground_truth(boxes, len(picked), manifest.num_views, manifest.max_boxes)
    stored_counts, stored_boxes = select("gt_counts"), select("gt_boxes")
    wrong_gt = (stored_counts != truth["gt_counts"]).any(axis=1)
    wrong_gt |= (np.abs(stored_boxes - truth["gt_boxes"]) > BOX_TOLERANCE).reshape(
        len(picked), -1).any(axis=1)  # fmt: skip
    detail = (f"{len(picked)} random row(s) x {manifest.num_views} view(s) rendered and run "
              f"again, max |difference| {largest:.3g}")  # fmt: skip
    if wrong.any():
        detail += f"; head outputs differ at row(s) {_first(picked[wrong])}"
    if wrong_gt.any():
        detail += f"; ground truth differs at row(s) {_first(picked[wrong_gt])}"
    report.add("recompute", not (wrong.any() or wrong_gt.any()), detail)
