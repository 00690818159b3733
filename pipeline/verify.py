"""``kdpipe verify``: check a cache end to end and name the chunk or sample at fault.

Checks, in order: the manifest (strict schema), the arrays (shape, dtype, the
crc32c codec), then every chunk: its completion flag, its files, its checksum
(zarr verifies crc32c when decoding), finite values, each row a probability
distribution (logsumexp ≈ 0), labels in range. With a dataset: its fingerprint
and labels. With teachers: the stored values against a fresh teacher pass on a
random sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import zarr

from pipeline.cache.format import STATUS_COMPLETE, Manifest
from pipeline.cache.store import (
    ARRAYS,
    PROGRESS,
    check_array_metadata,
    chunk_key,
    read_manifest,
)
from pipeline.data import ImageSet, describe_mismatch
from pipeline.errors import KdpipeError
from pipeline.runs import load_model
from pipeline.runtime import predict_logits, resolve_device

# float16 keeps 11 significant bits: a row's logsumexp drifts by up to ~1e-3 per
# term near 0; 2e-2 leaves room for 10+ classes without hiding real damage.
LOGSUMEXP_TOLERANCE = {"float16": 2e-2, "float32": 1e-4}
RECOMPUTE_TOLERANCE = {"float16": 2e-2, "float32": 1e-3}


@dataclass
class VerifyReport:
    """One row per check; ``ok`` is False when any check failed."""

    path: Path
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
    path: Path,
    *,
    dataset: ImageSet | None = None,
    recompute: int = 0,
    teachers: Sequence[Path] = (),
    device: str = "auto",
    seed: int = 0,
) -> VerifyReport:
    """Run every check on the cache at ``path``; never raises for damage it can name."""
    path = Path(path)
    report = VerifyReport(path)
    try:
        manifest = read_manifest(path)
    except KdpipeError as exc:
        report.add("manifest", False, str(exc))
        return report
    report.add("manifest", True, f"format {manifest.format_version}, cache_id {manifest.cache_id}")
    report.add(
        "status",
        manifest.status == STATUS_COMPLETE,
        f"status {manifest.status!r}" + ("" if manifest.status == STATUS_COMPLETE else
                                         ": the teacher pass did not finish"),
    )  # fmt: skip
    arrays = _open_arrays(path, manifest, report)
    if arrays is None:
        return report
    labels = _check_chunks(path, manifest, arrays, report)
    if dataset is not None and labels is not None:
        _check_dataset(manifest, labels, dataset, report)
    if recompute:
        if dataset is None or not teachers:
            report.add("recompute", False, "--recompute needs --data and --teacher")
        else:
            _recompute(
                manifest, arrays["logprobs"], dataset, teachers, recompute, device, seed, report
            )
    return report


def _open_arrays(path: Path, manifest: Manifest, report: VerifyReport) -> dict | None:
    expected = {
        "logprobs": (
            (manifest.num_samples, manifest.num_views, manifest.num_classes),
            manifest.dtype,
        ),
        "labels": ((manifest.num_samples,), "int64"),
        PROGRESS: ((-(-manifest.num_samples // manifest.chunk_size),), "uint8"),
    }
    try:
        group = zarr.open_group(str(path), mode="r")
        arrays = {name: group[name] for name in expected}
    except Exception as exc:  # zarr raises KeyError or its own errors for a missing node
        report.add("arrays", False, f"cannot open the arrays: {exc!r}")
        return None
    problems = []
    for name, (shape, dtype) in expected.items():
        array = arrays[name]
        codecs = [c["name"] for c in array.metadata.to_dict()["codecs"]]
        if array.shape != shape or str(array.dtype) != dtype:
            problems.append(f"{name} is {array.shape} {array.dtype}, expected {shape} {dtype}")
        if "crc32c" not in codecs:
            problems.append(f"{name} has no crc32c checksum codec ({', '.join(codecs)})")
    try:
        check_array_metadata(path, manifest)
    except KdpipeError as exc:
        problems.append(str(exc))
    report.add(
        "arrays", not problems, "; ".join(problems) or "metadata checksums, shapes, dtypes, codecs"
    )
    return None if problems else arrays


def _check_chunks(
    path: Path, manifest: Manifest, arrays: dict, report: VerifyReport
) -> np.ndarray | None:
    """Every chunk: flag, files, checksum, values. Returns the labels if all were readable."""
    step = manifest.chunk_size
    tolerance = LOGSUMEXP_TOLERANCE[manifest.dtype]
    labels = np.empty(manifest.num_samples, dtype=np.int64)
    failures: list[str] = []
    num_chunks = arrays[PROGRESS].shape[0]
    for index in range(num_chunks):
        start, stop = index * step, min((index + 1) * step, manifest.num_samples)
        where = f"chunk {index} (rows {start}-{stop - 1})"
        missing = [n for n in (*ARRAYS, PROGRESS)
                   if not (path / n / chunk_key(arrays[n], index)).is_file()]  # fmt: skip
        if missing:
            failures.append(f"{where}: missing file(s) of {', '.join(missing)}")
            continue
        try:
            flag = int(arrays[PROGRESS][index])
            values = arrays["logprobs"][start:stop].astype(np.float32)
            labels[start:stop] = arrays["labels"][start:stop]
        except Exception as exc:
            failures.append(f"{where}: unreadable, checksum or compression error ({exc})")
            continue
        if flag != 1:
            failures.append(f"{where}: not flagged as written")
        finite = np.isfinite(values).all(axis=-1)
        if not finite.all():
            rows = start + np.flatnonzero(~finite.all(axis=-1))
            failures.append(f"{where}: NaN or Inf at sample(s) {_first(rows)}")
            continue
        drift = np.abs(_logsumexp(values))
        if (drift > tolerance).any():
            rows = start + np.flatnonzero((drift > tolerance).any(axis=-1))
            failures.append(
                f"{where}: not a distribution (|logsumexp| up to {drift.max():.3g}) at "
                f"sample(s) {_first(rows)}"
            )
        bad_labels = (labels[start:stop] < 0) | (labels[start:stop] >= manifest.num_classes)
        if bad_labels.any():
            failures.append(f"{where}: labels out of range at sample(s) "
                            f"{_first(start + np.flatnonzero(bad_labels))}")  # fmt: skip
    report.add(
        "chunks",
        not failures,
        "; ".join(failures) or f"{num_chunks} chunk(s): flags, files, checksums, values ok",
    )
    readable = not any("missing" in f or "unreadable" in f for f in failures)
    return labels if readable else None


def _check_dataset(
    manifest: Manifest, labels: np.ndarray, dataset: ImageSet, report: VerifyReport
) -> None:
    expected = manifest.dataset["fingerprint"]
    actual = dataset.fingerprint()
    report.add(
        "dataset",
        expected == actual,
        "fingerprint matches" if expected == actual else describe_mismatch(expected, actual),
    )
    if len(labels) == len(dataset):
        wrong = np.flatnonzero(labels != dataset.labels.numpy())
        detail = (
            "equal to the dataset's" if not len(wrong) else f"differ at sample(s) {_first(wrong)}"
        )
        report.add("labels", not len(wrong), detail)


def _recompute(
    manifest: Manifest,
    logprobs: zarr.Array,
    dataset: ImageSet,
    teachers: Sequence[Path],
    count: int,
    device: str,
    seed: int,
    report: VerifyReport,
) -> None:
    from pipeline.teach import combine_members

    torch_device = resolve_device(device)
    members = [load_model(Path(run_dir), torch_device) for run_dir in teachers]
    hashes = sorted(card.weights_sha256 for _, card in members)
    if hashes != sorted(m.weights_sha256 for m in manifest.teachers):
        report.add("recompute", False, "the --teacher weights are not the cache's teachers")
        return
    rows = np.sort(np.random.default_rng(seed).choice(len(dataset), min(count, len(dataset)),
                                                      replace=False))  # fmt: skip
    images = dataset.images[torch.from_numpy(rows)]
    fresh = combine_members(
        [predict_logits(model, images, card.data, device=torch_device) for model, card in members],
        manifest.temperature,
        manifest.combine,
    ).numpy()
    stored = logprobs.get_orthogonal_selection((rows, slice(0, 1), slice(None)))[:, 0].astype(
        np.float32
    )
    error = np.abs(stored - fresh).max(axis=-1)
    tolerance = RECOMPUTE_TOLERANCE[manifest.dtype]
    wrong = rows[error > tolerance]
    report.add(
        "recompute",
        not len(wrong),
        f"{len(rows)} random sample(s) recomputed, max |difference| {error.max():.3g}"
        + (f"; differ at sample(s) {_first(wrong)}" if len(wrong) else ""),
    )


def _logsumexp(values: np.ndarray) -> np.ndarray:
    top = values.max(axis=-1, keepdims=True)
    return (top + np.log(np.exp(values - top).sum(axis=-1, keepdims=True)))[..., 0]


def _first(rows: np.ndarray, limit: int = 10) -> str:
    shown = ", ".join(str(int(r)) for r in rows[:limit])
    return shown + (f" and {len(rows) - limit} more" if len(rows) > limit else "")
