"""``kdpipe verify``: check a cache end to end and name the chunk or sample at fault.

Checks, in order: the manifest (strict schema), the arrays (shape, dtype, the
crc32c codec), then every chunk: its completion flag, its files, its checksum
(zarr verifies crc32c when decoding), finite values, each row a probability
distribution (logsumexp ≈ 0) and not uniform (every stored value equal: the ranking
lost to a T too high for the dtype), labels in range. With a dataset: its fingerprint
and labels (the fingerprint of a folder or shards comes from their index, which trusts
a file whose size and mtime are unchanged; ``rehash`` reads and hashes every file
again first). With teachers: the stored values against a fresh teacher pass on a
random sample.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import zarr
from kdpipe.base.errors import KdpipeError, UsageError
from kdpipe.base.runtime import resolve_device
from kdpipe.cache import (
    DIGEST_BYTES,
    DIGESTS,
    PROGRESS,
    STATUS_COMPLETE,
    UNIFORM_SHARE,
    DetectionManifest,
    Location,
    Manifest,
    array_specs,
    check_array_metadata,
    chunk_key,
    digest_matches,
    field_problems,
    read_cache_manifest,
    stored_teacher_accuracy,
)
from kdpipe.data.datasets import ImageSet, class_mismatch, dataset_mismatch, rehashed
from tqdm.auto import tqdm

# float16 keeps 11 significant bits: a row's logsumexp drifts by up to ~1e-3 per
# term near 0; 2e-2 leaves room for 10+ classes without hiding real damage.
LOGSUMEXP_TOLERANCE = {"float16": 2e-2, "float32": 1e-4}
RECOMPUTE_TOLERANCE = {"float16": 2e-2, "float32": 1e-3}
ATTENTION_NORM_TOLERANCE = 5e-3  # an L2-normalised map stored in float16
LAYER_TOLERANCE = 1e-2  # a cached layer recomputed: absolute and relative, float16 storage


@dataclass
class VerifyReport:
    """One row per check; ``ok`` is False when any check failed."""

    path: Location
    rows: list[dict] = field(default_factory=list)

    def add(self, check: str, ok: bool, detail: str) -> None:
        self.rows.append({"check": check, "result": "ok" if ok else "FAIL", "detail": detail})

    @property
    def ok(self) -> bool:
        return all(row["result"] == "ok" for row in self.rows)

    def failures(self) -> list[str]:
        return [f"{r['check']}: {r['detail']}" for r in self.rows if r["result"] != "ok"]

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=["check", "result", "detail"])


def verify_cache(
    path: str | Path | Location,
    *,
    dataset: ImageSet | str | None = None,
    recompute: int = 0,
    teachers: Sequence[Path] = (),
    device: str = "auto",
    seed: int = 0,
    rehash: bool = False,
) -> VerifyReport:
    """Run every check on the cache at ``path`` (a folder or an fsspec URL); never raises for
    damage it can name. ``rehash``: re-read every file of ``dataset`` before its
    fingerprint is compared, trusting none of its index's stored digests. A detection cache
    is checked by :mod:`kdpipe.check.verify_detect` (``dataset``: its data YAML)."""
    if recompute and (dataset is None or not teachers):
        raise UsageError("--recompute needs --data (the cache's dataset) and --teacher (its "
                         "teacher run directories)")  # fmt: skip
    if rehash and dataset is None:
        raise UsageError("--rehash needs --data (the dataset whose files are hashed again)")
    path = Location(path)
    report = VerifyReport(path)
    try:
        manifest = read_cache_manifest(path)
    except KdpipeError as exc:
        report.add("manifest", False, str(exc))
        return report
    if isinstance(manifest, DetectionManifest):
        from kdpipe.check.verify_detect import verify_detection

        return verify_detection(path, manifest, report, data=dataset, recompute=recompute,
                                teachers=teachers, device=device, seed=seed)  # fmt: skip
    if isinstance(dataset, str):
        raise UsageError(f"{path} is a classification cache: --data {dataset} is a detection "
                         "data YAML, not its dataset")  # fmt: skip
    report.add("manifest", True, f"format {manifest.format_version}, cache_id {manifest.cache_id}")
    report.add(
        "status",
        manifest.status == STATUS_COMPLETE,
        f"status {manifest.status!r}" + ("" if manifest.status == STATUS_COMPLETE else
                                         ": the teacher pass did not finish"),
    )  # fmt: skip
    problems = field_problems(manifest)
    report.add("fields", not problems, "; ".join(problems) or "consistent with each other")
    arrays = _open_arrays(path, manifest, report)
    if arrays is None:
        return report
    rows = _check_chunks(path, manifest, arrays, report)
    if rows is not None:
        _check_accuracy(manifest, arrays, report)
    if dataset is not None and rehash:
        dataset = _rehash(dataset, report)
    if dataset is not None and rows is not None:
        _check_dataset(manifest, rows, dataset, report)
    if recompute:
        _recompute(manifest, arrays, dataset, teachers, recompute, device, seed, report)
    return report


def _open_arrays(path: Location, manifest: Manifest, report: VerifyReport) -> dict | None:
    num_chunks = -(-manifest.num_samples // manifest.chunk_size)
    specs = array_specs(manifest)
    expected = {name: (shape, dtype) for name, (shape, dtype, _) in specs.items()}
    expected[DIGESTS] = ((num_chunks, len(array_specs(manifest)), DIGEST_BYTES), "uint8")
    expected[PROGRESS] = ((num_chunks,), "uint8")
    try:  # before zarr parses the metadata: a damaged or swapped zarr.json is named here
        check_array_metadata(path, manifest)
    except KdpipeError as exc:
        report.add("arrays", False, str(exc))
        return None
    try:
        group = zarr.open_group(path.zarr_path, mode="r")
        arrays = {name: group[name] for name in expected}
    except Exception as exc:  # zarr raises KeyError or its own errors for a missing node
        report.add("arrays", False, f"cannot open the arrays: {exc!r}")
        return None
    problems = []
    for name, (shape, dtype) in expected.items():
        array = arrays[name]
        if not isinstance(array, zarr.Array):
            problems.append(f"{name}/zarr.json describes a {type(array).__name__}, not an array")
            continue
        codecs = [c["name"] for c in array.metadata.to_dict().get("codecs", [])]
        if array.shape != shape or str(array.dtype) != dtype:
            problems.append(f"{name} is {array.shape} {array.dtype}, expected {shape} {dtype}")
        elif name in specs and array.chunks[0] != min(manifest.chunk_size, shape[0]):
            problems.append(f"{name} is chunked by {array.chunks[0]} rows, the manifest's "
                            f"chunk_size is {manifest.chunk_size}")  # fmt: skip
        if "crc32c" not in codecs:
            problems.append(f"{name} has no crc32c checksum codec ({', '.join(codecs)})")
    report.add(
        "arrays", not problems, "; ".join(problems) or "metadata checksums, shapes, dtypes, codecs"
    )
    return None if problems else arrays


def _check_chunks(
    path: Location,
    manifest: Manifest | DetectionManifest,
    arrays: dict,
    report: VerifyReport,
    problems_of: Callable[[dict, int], list[str]] | None = None,
) -> dict[str, np.ndarray] | None:
    """Every chunk: flag, files, checksum, position digest, values (``problems_of(chunk,
    first row)``: a detection cache's checks; default a classification cache's). Returns
    labels (where the cache has them) and row indices if every chunk was readable."""
    step = manifest.chunk_size
    names = tuple(array_specs(manifest))
    if problems_of is None:
        tolerance = LOGSUMEXP_TOLERANCE[manifest.dtype]
        values_name = manifest.layout.values_name

        def problems_of(chunk: dict, start: int) -> list[str]:
            values = chunk[values_name].astype(np.float32)
            return _chunk_problems(manifest, chunk, values, start, tolerance)

    rows = {name: np.empty(manifest.num_samples, dtype=np.int64)
            for name in ("labels", "indices") if name in names}  # fmt: skip
    failures: list[str] = []
    unwritten: list[int] = []
    num_chunks = arrays[PROGRESS].shape[0]
    for index in tqdm(range(num_chunks), desc=f"verifying {path}", unit="chunk", disable=None):
        start, stop = index * step, min((index + 1) * step, manifest.num_samples)
        where = f"chunk {index} (rows {start}-{stop - 1})"
        missing = [n for n in (*names, DIGESTS, PROGRESS)
                   if not path.is_file(n, chunk_key(arrays[n], index))]  # fmt: skip
        if missing and manifest.status != STATUS_COMPLETE:
            unwritten.append(index)  # not yet written: the pass did not finish
            continue
        if missing:
            failures.append(f"{where}: missing file(s) of {', '.join(missing)}")
            continue
        try:
            flag = int(arrays[PROGRESS][index])
            chunk = {name: arrays[name][start:stop] for name in names}
            digests = arrays[DIGESTS][index]
        except Exception as exc:
            failures.append(f"{where}: unreadable, checksum or compression error ({exc})")
            continue
        moved = [
            name
            for position, name in enumerate(names)
            if not digest_matches(manifest.cache_id, name, index, chunk[name], digests[position])
        ]
        if moved:  # the values are still checked: they may say what happened
            failures.append(f"{where}: {', '.join(moved)} not what was written at chunk {index} "
                            "(moved from another position, copied from another cache, or "
                            "rewritten)")  # fmt: skip
        for name, values in rows.items():
            values[start:stop] = chunk[name]
        if flag != 1:
            failures.append(f"{where}: not flagged as written")
        failures += [f"{where}: {problem}" for problem in problems_of(chunk, start)]
    if unwritten:
        failures.append(f"{len(unwritten)} of {num_chunks} chunk(s) not written yet "
                        f"({_ranges(unwritten)}): run cache-teacher again to finish")  # fmt: skip
    readable = not unwritten and not any("missing" in f or "unreadable" in f for f in failures)
    indices = rows["indices"]
    if readable and len(indices) > 1 and not (np.diff(indices) > 0).all():
        failures.append("row indices are not strictly increasing (each sample once, in order)")
    report.add(
        "chunks",
        not failures,
        "; ".join(failures)
        or f"{num_chunks} chunk(s): flags, files, checksums, positions, values ok",
    )
    return rows if readable else None


def _check_accuracy(manifest: Manifest, arrays: dict, report: VerifyReport) -> None:
    """The manifest's teacher_accuracy, recomputed from the stored values and labels: it is
    in no id, so a re-signed manifest could claim any figure (and report would show it)."""
    if manifest.status != STATUS_COMPLETE:
        return  # recorded only when the pass completes
    expected = stored_teacher_accuracy(manifest, arrays) if manifest.labeled else None
    claimed = manifest.teacher_accuracy
    same = (claimed is None and expected is None) or (
        claimed is not None and expected is not None and abs(claimed - expected) <= 1e-9
    )
    report.add("teacher accuracy", same,
               f"{claimed} recorded, {expected} from the stored values and labels"
               if not same else f"{expected} recomputed from the stored values")  # fmt: skip


def _layer_problems(manifest: Manifest, chunk: dict, start: int) -> list[str]:
    """The cached layers of one chunk: finite values, and attention maps of unit L2 norm
    (to float16 precision)."""
    problems = []
    for layer in manifest.features:
        values = chunk[layer.array].astype(np.float32)
        values = values.reshape(*values.shape[:2], -1)  # (rows, views, numbers)
        bad = ~np.isfinite(values).all(axis=(1, 2))
        if layer.kind == "attention":
            norms = np.sqrt((values**2).sum(axis=-1))
            bad |= (np.abs(norms - 1) > ATTENTION_NORM_TOLERANCE).any(axis=1)
        if bad.any():
            problems.append(f"{layer.array}: NaN, Inf or (attention) a norm other than 1 at "
                            f"row(s) {_first(start + np.flatnonzero(bad))}")  # fmt: skip
    return problems


def _ranges(indices: list[int]) -> str:
    """``0-3, 5, 7-9``: sorted chunk indices as runs."""
    runs, start = [], indices[0]
    for previous, current in itertools.pairwise([*indices, None]):
        if current != previous + 1 if current is not None else True:
            runs.append(f"{start}" if start == previous else f"{start}-{previous}")
            start = current
    return ", ".join(runs)


def _chunk_problems(
    manifest: Manifest, chunk: dict, values: np.ndarray, start: int, tolerance: float
) -> list[str]:
    """What is wrong with the values of one readable chunk (an empty list: nothing)."""
    problems = []
    finite = np.isfinite(values).all(axis=-1)
    if not finite.all():
        bad = start + np.flatnonzero(~finite.all(axis=-1))
        return [f"NaN or Inf at row(s) {_first(bad)}"]
    layout = manifest.layout
    checked = layout.problems(values, chunk, tolerance)
    drift = checked["mass"]  # how far each row is from the mass its layout allows
    if (drift > tolerance).any():
        bad = start + np.flatnonzero((drift > tolerance).any(axis=-1))
        problems.append(
            f"not a distribution (logsumexp off by up to {drift.max():.3g}) at row(s) {_first(bad)}"
        )
    uniform = checked["uniform"]
    if uniform.size and uniform.mean() > UNIFORM_SHARE:
        bad = start + np.flatnonzero(uniform.any(axis=-1))
        problems.append(
            f"{uniform.mean():.0%} of rows and views uniform (every stored value equal: the "
            f"teacher's ranking is lost, T={manifest.temperature:g} too high for "
            f"{manifest.dtype}?) at row(s) {_first(bad)}"
        )
    if checked["invalid"].any():
        bad = start + np.flatnonzero(checked["invalid"].any(axis=-1))
        problems.append(f"{layout.kind} classes out of range, repeated or unsorted at "
                        f"row(s) {_first(bad)}")  # fmt: skip
    problems += _layer_problems(manifest, chunk, start)
    labels = chunk["labels"]
    lowest = 0 if manifest.labeled else -1
    highest = manifest.num_classes - 1 if manifest.labeled else -1
    bad_labels = (labels < lowest) | (labels > highest)
    if bad_labels.any():
        problems.append(
            f"labels out of range at row(s) {_first(start + np.flatnonzero(bad_labels))}"
        )
    size = manifest.transfer["dataset_samples"]
    bad_rows = (chunk["indices"] < 0) | (chunk["indices"] >= size)
    partners = chunk["partners"]
    bad_rows |= ((partners < -1) | (partners >= size)).any(axis=-1)
    bad_rows |= ~np.isfinite(chunk["views"]).all(axis=(1, 2))
    if bad_rows.any():
        problems.append(f"dataset indices, partners or view parameters out of range at row(s) "
                        f"{_first(start + np.flatnonzero(bad_rows))}")  # fmt: skip
    return problems


def _rehash(dataset: ImageSet, report: VerifyReport) -> ImageSet:
    """Every file of the dataset read and hashed again; the files whose bytes are not what
    the index said are named (the stored index is then corrected)."""
    fresh, changed = rehashed(dataset)
    if fresh.index is None:
        report.add("rehash", True, f"{dataset.name} is held in memory: hashed whole on every open")
        return fresh
    where = fresh.index.split_dir
    report.add(
        "rehash",
        not changed,
        f"{len(changed)} of {len(fresh)} file(s) in {where} changed since they were indexed "
        f"(size and modification time kept, or the index edited): {_names(changed)}"
        if changed
        else f"all {len(fresh)} files of {where} read again: their digests are the index's",
    )
    return fresh


def _names(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _check_dataset(
    manifest: Manifest, rows: dict[str, np.ndarray], dataset: ImageSet, report: VerifyReport
) -> None:
    mismatch = dataset_mismatch(manifest.dataset, dataset)
    report.add("dataset", mismatch is None, mismatch or "fingerprint matches")
    indices = rows["indices"]
    if manifest.labeled and mismatch is None and len(indices):
        wrong = np.flatnonzero(rows["labels"] != dataset.labels.numpy()[indices])
        detail = "equal to the dataset's" if not len(wrong) else f"differ at row(s) {_first(wrong)}"
        report.add("labels", not len(wrong), detail)


def _recompute(
    manifest: Manifest,
    arrays: dict,
    dataset: ImageSet,
    teachers: Sequence[Path],
    count: int,
    device: str,
    seed: int,
    report: VerifyReport,
) -> None:
    """A fresh teacher pass over every view of ``count`` random rows, against the store."""
    from kdpipe.models.teacher import load_teacher
    from kdpipe.views.features import LayerRequest, LayerTaps

    torch_device = resolve_device(device)
    teacher = load_teacher(teachers, torch_device)
    hashes = sorted(card.weights_sha256 for card in teacher.cards)
    if hashes != sorted(m.weights_sha256 for m in manifest.teachers):
        report.add("recompute", False, "the --teacher weights are not the cache's teachers")
        return
    if dataset_mismatch(manifest.dataset, dataset) is not None:
        report.add("recompute", False, "--data is not the cache's dataset")
        return
    # in no id, so recomputed from the teacher: its class names and parameter counts
    counts = sorted((card.weights_sha256, card.param_count) for card in teacher.cards)
    if counts != sorted((m.weights_sha256, m.param_count) for m in manifest.teachers):
        report.add("recompute", False, "the manifest's param_count is not the teachers'")
        return
    named = class_mismatch(teacher.class_names(dataset), manifest.classes,
                           "the --teacher", "the cache")  # fmt: skip
    if named is not None:
        report.add("recompute", False, named)
        return
    picked = np.sort(np.random.default_rng(seed).choice(
        manifest.num_samples, min(count, manifest.num_samples), replace=False
    ))  # fmt: skip
    indices = arrays["indices"].get_orthogonal_selection(picked)
    params = arrays["views"].get_orthogonal_selection((picked, slice(None), slice(None)))
    partners = arrays["partners"].get_orthogonal_selection((picked, slice(None)))
    requests = [LayerRequest(x.name, x.kind, _grid(x.pooling)) for x in manifest.features]
    fresh_layers: dict[str, list[np.ndarray]] = {x.array: [] for x in manifest.features}
    with contextlib.ExitStack() as stack:  # the layers from the same passes as the logits
        taps = (stack.enter_context(LayerTaps(teacher.models[0], requests))
                if requests else None)  # fmt: skip
        fresh = []
        for view in range(manifest.num_views):
            fresh.append(teacher.log_probs(
                dataset.images, manifest.temperature, manifest.combine, taps=taps, rows=indices,
                params=params[:, view] if manifest.has_views else None,
                partners=partners[:, view], device=torch_device,
            ).numpy())  # fmt: skip
            for array, value in (taps.take() if taps else {}).items():
                fresh_layers[array].append(value.numpy())
    fresh = np.stack(fresh, axis=1)
    for array, values in fresh_layers.items():
        _compare_layer(array, np.stack(values, axis=1), arrays[array], picked, report)
    layout = manifest.layout
    stored_arrays = {
        name: arrays[name].get_orthogonal_selection((picked, slice(None), slice(None)))
        for name in layout.names
    }
    stored = stored_arrays[layout.values_name]
    fresh = layout.like_stored(fresh, stored_arrays)
    error = np.abs(stored.astype(np.float32) - fresh).max(axis=(1, 2))
    tolerance = RECOMPUTE_TOLERANCE[manifest.dtype]
    wrong = picked[error > tolerance]
    report.add(
        "recompute",
        not len(wrong),
        f"{len(picked)} random row(s) x {manifest.num_views} view(s) recomputed, max |difference| "
        f"{error.max():.3g}" + (f"; differ at row(s) {_first(wrong)}" if len(wrong) else ""),
    )


def _grid(pooling: str) -> int | None:
    """G of a cached layer's ``adaptive-avg GxG`` pooling (None: ``none``)."""
    return None if pooling == "none" else int(pooling.split()[-1].split("x")[0])


def _compare_layer(
    array: str, fresh: np.ndarray, stored: zarr.Array, picked: np.ndarray, report: VerifyReport
) -> None:
    """A cached layer against the teacher's recomputed one, to float16 precision."""
    values = stored.get_orthogonal_selection((picked, *[slice(None)] * (stored.ndim - 1)))
    values = values.astype(np.float32)
    excess = np.abs(values - fresh) - (LAYER_TOLERANCE + LAYER_TOLERANCE * np.abs(fresh))
    wrong = picked[(excess.reshape(len(picked), -1) > 0).any(axis=1)]
    report.add(
        f"recompute {array}",
        not len(wrong),
        f"{len(picked)} random row(s) recomputed, max |difference| "
        f"{np.abs(values - fresh).max():.3g}"
        + (f"; differ at row(s) {_first(wrong)}" if len(wrong) else ""),
    )


def _first(rows: np.ndarray, limit: int = 10) -> str:
    shown = ", ".join(str(int(r)) for r in rows[:limit])
    return shown + (f" and {len(rows) - limit} more" if len(rows) > limit else "")
