"""Which teacher made which cache: ``kdpipe caches`` and ``kdpipe lineage``."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from pipeline.cache import MANIFEST_KEY, read_manifest
from pipeline.data import load_dataset
from pipeline.errors import KdpipeError, RunDirError
from pipeline.runs import load_model, read_card

CATALOG_COLUMNS = [
    "path",
    "cache_id",
    "status",
    "teacher_id",
    "teachers",
    "dataset",
    "split",
    "samples",
    "views",
    "classes",
    "temperature",
    "storage",
    "dtype",
    "size_mb",
    "created",
]


def _is_cache(folder: Path) -> bool:
    meta = folder / "zarr.json"
    if not meta.is_file():
        return False
    try:
        return MANIFEST_KEY in json.loads(meta.read_text()).get("attributes", {})
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return True  # a damaged manifest is still worth listing, as damaged


def find_caches(paths: Iterable[Path]) -> list[Path]:
    """kdpipe caches at or below each path (a cache's own folders are not searched)."""
    found = []
    for root in paths:
        root = Path(root)
        if _is_cache(root):
            found.append(root)
            continue
        for folder, subfolders, _ in os.walk(root):
            subfolders.sort()
            if _is_cache(Path(folder)):
                found.append(Path(folder))
                subfolders.clear()
    return found


def _size_mb(folder: Path) -> float:
    return round(sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20, 3)


def catalog(paths: Iterable[Path]) -> pd.DataFrame:
    """One row per cache found: what produced it and what it holds."""
    rows = []
    for path in find_caches(paths):
        try:
            m = read_manifest(path)
        except KdpipeError as exc:
            rows.append({"path": str(path), "status": f"unreadable: {exc}"})
            continue
        rows.append(
            {
                "path": str(path),
                "cache_id": m.cache_id,
                "status": m.status,
                "teacher_id": m.teacher_id,
                "teachers": " + ".join(
                    f"{t.architecture}@{t.weights_sha256[:8]}" for t in m.teachers
                ),
                "dataset": m.dataset["name"],
                "split": m.dataset["split"],
                "samples": m.num_samples,
                "views": m.num_views,
                "classes": m.num_classes,
                "temperature": m.temperature,
                "storage": m.layout.describe(),
                "dtype": m.dtype,
                "size_mb": _size_mb(path),
                "created": m.created,
            }
        )
    return pd.DataFrame(rows, columns=CATALOG_COLUMNS)


def lineage(
    run_dir: Path,
    *,
    data_root: Path = Path("data"),
    image_size: int | None = None,
    channels: int | None = None,
) -> pd.DataFrame:
    """The chain run → cache → teacher(s) → dataset, each link checked where its files are.

    ``verified``: the file is there and its hash was recomputed and matches;
    ``missing``: the file is not where the record says; ``MISMATCH``: it is
    there but its content is not what the record says. An exported ``.onnx``
    file starts the chain: file → run → cache → teacher(s) → dataset.
    """
    if Path(run_dir).suffix == ".onnx":
        from pipeline.export.lineage import file_lineage

        return file_lineage(
            Path(run_dir), data_root=data_root, image_size=image_size, channels=channels
        )
    rows: list[dict] = []

    def link(kind: str, name: str, identity: str, status: str, detail: str) -> None:
        rows.append(
            {"link": kind, "path": name, "id": identity, "status": status, "detail": detail}
        )

    load = {"data_root": data_root, "image_size": image_size, "channels": channels}
    card = read_card(run_dir)
    try:
        load_model(run_dir)  # recomputes the weights hash
        link(
            card.kind, str(run_dir), card.weights_sha256[:16], "verified", "weights hash recomputed"
        )
    except RunDirError as exc:
        link(card.kind, str(run_dir), card.weights_sha256[:16], "MISMATCH", str(exc))
    if card.lineage is None:  # a teacher: trained on labels, its dataset ends the chain
        _dataset_link(link, card.dataset, load)
        return pd.DataFrame(rows)
    cache_path = card.lineage["cache_path"]  # a folder or an fsspec URL
    try:
        manifest = read_manifest(cache_path)
    except KdpipeError as exc:
        link("cache", str(cache_path), card.lineage["cache_id"], "missing", str(exc))
        _dataset_link(link, card.dataset, load)
        return pd.DataFrame(rows)
    same = manifest.cache_id == card.lineage["cache_id"]
    link(
        "cache",
        str(cache_path),
        manifest.cache_id,
        "verified" if same else "MISMATCH",
        "cache_id matches the run's record"
        if same
        else f"the run learned from cache {card.lineage['cache_id']}, this is {manifest.cache_id}",
    )
    for member in manifest.teachers:
        try:
            _, teacher = load_model(Path(member.run_dir))
        except RunDirError as exc:
            status = "MISMATCH" if Path(member.run_dir, "model.json").is_file() else "missing"
            link("teacher", member.run_dir, member.weights_sha256[:16], status, str(exc))
            continue
        same = teacher.weights_sha256 == member.weights_sha256
        link(
            "teacher",
            member.run_dir,
            member.weights_sha256[:16],
            "verified" if same else "MISMATCH",
            "weights hash recomputed"
            if same
            else f"the cache was made by weights {member.weights_sha256[:16]}, these are "
            f"{teacher.weights_sha256[:16]}",
        )
    _dataset_link(link, manifest.dataset, load)
    return pd.DataFrame(rows)


def _dataset_link(link, record: dict, load: dict) -> None:
    name = f"{record['name']} ({record['split']})"
    expected = record["fingerprint"]
    try:
        dataset = load_dataset(record["name"], record["split"], **load)
    except KdpipeError as exc:
        link("dataset", name, expected["sha256"][:16], "missing", str(exc))
        return
    same = dataset.fingerprint() == expected
    link(
        "dataset",
        name,
        expected["sha256"][:16],
        "verified" if same else "MISMATCH",
        "fingerprint recomputed" if same else "the data on disk has another fingerprint",
    )
