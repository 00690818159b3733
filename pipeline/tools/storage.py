"""What a cache costs to store, dense or top-k, and what top-k loses.

Measured, not estimated: each layout is written with the cache's own codecs
(zstd + crc32c, same chunking) into a temporary Zarr store and its chunk bytes
are counted. The loss of top-k is the mean KL divergence from the full
distribution to its reconstruction (``reconstruct_top_k``), over every row and
view of a dense cache.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import zarr
from kdpipe.base.errors import KdpipeError, UsageError
from kdpipe.cache import (
    Dense,
    array_codecs,
    index_dtype,
    read_arrays,
    read_manifest,
    reconstruct_top_k_numpy,
)
from tqdm.auto import tqdm


def _kl_mean(kl: np.ndarray) -> float:
    """The mean KL divergence, never below zero: a KL is >= 0, and a mean of -7.5e-06 (a
    tiny cache's float rounding where nothing was lost) read as if something were gained."""
    return max(float(kl.mean()), 0.0)


def _stored_bytes(arrays: dict[str, np.ndarray], chunk_rows: int) -> int:
    """Bytes of the chunk files these arrays take with kdpipe's codecs and chunking."""
    with tempfile.TemporaryDirectory() as folder:
        group = zarr.open_group(folder, mode="w")
        for name, values in arrays.items():
            array = group.create_array(
                name,
                shape=values.shape,
                chunks=(chunk_rows, *values.shape[1:]),
                dtype=values.dtype,
                fill_value=0,
                **array_codecs(),
            )
            array[...] = values
        return sum(
            p.stat().st_size for p in Path(folder).rglob("*") if p.is_file() and "c" in p.parts
        )


def stored_bytes_per_view(cache: str | Path | None) -> float:
    """The bytes a cache folder takes on disk (every array, the manifest, the digests) per
    row and view: what a student run paid to store what it read; NaN without a local
    cache folder (an online run, an object-store cache, a cache since removed)."""
    if not cache or not Path(cache).is_dir():
        return float("nan")
    try:
        manifest = read_manifest(cache)
    except KdpipeError:
        return float("nan")
    stored = sum(p.stat().st_size for p in Path(cache).rglob("*") if p.is_file())
    return stored / (manifest.num_samples * manifest.num_views)


# storage's K values when none are asked for: those below the cache's class count
DEFAULT_KS = (1, 2, 3, 5)


def storage_table(cache: str | Path, ks: Sequence[int] | None = None) -> pd.DataFrame:
    """One row per layout: bytes per sample-view (raw and stored), and the mean KL from
    the cache's distribution (best a float32 cache) to what each layout keeps. ``ks``
    given are each checked against the class count; left out, they are the values of
    :data:`DEFAULT_KS` that a top-k layout of this cache can have (K below its classes).
    In numpy: a table of a cache loads no deep-learning library."""
    manifest, data = read_arrays(cache)
    if not isinstance(manifest.layout, Dense):
        raise UsageError(
            f"{cache} is a {manifest.layout.describe()} cache: the table needs a dense one"
        )
    if ks is None:
        ks = [k for k in DEFAULT_KS if k < manifest.num_classes]
    bad = [k for k in ks if not 1 <= k < manifest.num_classes]
    if bad:
        raise UsageError(f"--top-k {bad[0]}: K must be in 1..{manifest.num_classes - 1}")
    dense = data[manifest.layout.values_name].astype(np.float32)  # (N, V, C), as stored
    n, v, c = dense.shape
    views = n * v
    rows = []
    probs = np.exp(dense)
    top1 = dense.argmax(-1)
    progress = tqdm(total=2 + len(ks), desc=f"measuring {cache}", unit="layout", disable=None)
    for dtype in ("float32", "float16"):
        values = dense.astype(dtype)
        rounded = values.astype(np.float32)
        # against a float16 source, float32 adds nothing we could measure
        known = manifest.dtype == "float32" or dtype == "float16"
        rows.append(
            {
                "storage": f"dense {dtype}",
                "raw_bytes_per_view": values.itemsize * c,
                "stored_bytes_per_view": _stored_bytes({"v": values}, manifest.chunk_size) / views,
                "mean_kl": _kl_mean((probs * (dense - rounded)).sum(-1)) if known else float("nan"),
                "top1_kept": float((rounded.argmax(-1) == top1).mean()),
            }
        )
        progress.update()
    # the classes by falling value, ties by index: the order torch.topk gives
    order = np.argsort(-dense, axis=-1, kind="stable")
    for k in ks:
        top_indices = order[..., :k]
        values = np.take_along_axis(dense, top_indices, axis=-1).astype("float16")
        indices = top_indices.astype(index_dtype(c))
        rebuilt = reconstruct_top_k_numpy(values, top_indices, c)
        kl = (probs * (dense - rebuilt)).sum(-1)  # KL(full || reconstructed) per view
        rows.append(
            {
                "storage": f"top-{k} float16",
                "raw_bytes_per_view": values.itemsize * k + indices.itemsize * k,
                "stored_bytes_per_view": _stored_bytes(
                    {"values": values, "indices": indices}, manifest.chunk_size
                )
                / views,
                "mean_kl": _kl_mean(kl),
                "top1_kept": float((rebuilt.argmax(-1) == top1).mean()),
            }
        )
        progress.update()
    progress.close()
    table = pd.DataFrame(rows)
    table.attrs.update(
        {
            "cache": str(cache),
            "views": views,
            "classes": c,
            "temperature": manifest.temperature,
            "ks": list(ks),
        }
    )
    return table


def to_markdown(table: pd.DataFrame) -> str:
    shown = pd.DataFrame(
        {
            "storage": table["storage"],
            "bytes / sample-view, raw": table["raw_bytes_per_view"].map(lambda b: f"{b:.0f}"),
            "bytes / sample-view, stored (zstd + crc32c)": table["stored_bytes_per_view"].map(
                lambda b: f"{b:.1f}"
            ),
            "mean KL(full ‖ reconstructed), nats": table["mean_kl"].map(
                lambda v: "—" if pd.isna(v) else ("0" if v == 0 else f"{v:.2g}")
            ),
            "top-1 kept": table["top1_kept"].map(lambda v: f"{v:.4f}"),
        }
    )
    return shown.to_markdown(index=False)


def storage_report(
    cache: str | Path,
    ks: Sequence[int] | None,
    *,
    csv_path: Path | None = None,
    markdown_path: Path | None = None,
    section: str = "storage",
    overwrite: bool = False,
) -> pd.DataFrame:
    """Measure the table, then write the CSV and the Markdown section (with its command);
    an existing CSV is replaced only with ``overwrite`` and only if kdpipe storage wrote it."""
    from datetime import UTC, datetime

    from kdpipe.base.outputs import MARKDOWN, STORAGE_CSV, guard_output
    from kdpipe.tools.publish import machine_line, publish

    for output, kind, option in ((csv_path, STORAGE_CSV, "--csv"),
                                 (markdown_path, MARKDOWN, "--markdown")):  # fmt: skip
        if output is not None:
            guard_output(output, kind, overwrite=overwrite, inputs=[cache], option=option)
    table = storage_table(cache, ks)
    attrs = table.attrs
    asked = ",".join(map(str, attrs["ks"]))
    publish(
        table,
        csv_path=csv_path,
        markdown_path=markdown_path,
        section=section,
        text=lambda: "\n".join(
            [
                f"Generated by `kdpipe storage {cache} --top-k {asked}` on "
                f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC: {attrs['views']} sample-views of "
                f"{attrs['classes']} classes at T = {attrs['temperature']:g}, each layout "
                "written with the cache's codecs and chunking and its bytes counted.",
                f"Machine: {machine_line()}.",
                "",
                to_markdown(table),
            ]
        ),
    )
    return table
