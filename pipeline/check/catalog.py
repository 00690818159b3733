"""Which teacher made which cache: ``kdpipe caches`` and ``kdpipe lineage``."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import pandas as pd
from kdpipe.base.errors import KdpipeError, RunDirError
from kdpipe.cache import (
    MANIFEST_KEY,
    DetectionManifest,
    Location,
    TeacherMember,
    Upstream,
    read_cache_manifest,
    read_detection_manifest,
    read_manifest,
)
from kdpipe.data.datasets import dataset_fingerprint, decode_options
from kdpipe.models.pretrained import file_sha256, looks_like_source
from kdpipe.models.runs import check_weights, is_detection_run, read_card

CATALOG_COLUMNS = [
    "path",
    "cache_id",
    "status",
    "teacher_id",
    "teachers",
    "generation",
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
    "task",
]


# counts: pandas' nullable integers, so a row without them (an unreadable cache) leaves
# the others' counts integers, not floats
INTEGER_COLUMNS = ("generation", "samples", "views", "classes")


def _is_cache(folder: Location) -> bool:
    try:
        meta = folder.read_bytes("zarr.json")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError):
        return False
    try:
        return MANIFEST_KEY in json.loads(meta).get("attributes", {})
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return True  # a damaged manifest is still worth listing, as damaged


def unreachable(path: str | Path) -> str | None:
    """Why ``path`` (a folder or an fsspec URL: ``file://``, ``s3://``...) cannot be listed,
    or None when it can."""
    try:
        location = Location(path)
        if location.exists():
            return None
    except Exception as exc:  # fsspec's unknown protocols, a store's client errors
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        return f"{path} cannot be reached ({type(exc).__name__}: {lines[0] if lines else ''})"
    return f"{path} does not exist"


def find_caches(paths: Iterable[str | Path | Location]) -> list[Location]:
    """kdpipe caches at or below each path, a folder or an fsspec URL (a cache's own
    folders are not searched)."""
    found = []
    for root in paths:
        root = Location(root)
        if _is_cache(root):
            found.append(root)
        elif root.local:
            for folder, subfolders, _ in os.walk(root.path):
                subfolders.sort()
                if _is_cache(Location(folder)):
                    found.append(Location(folder))
                    subfolders.clear()
        else:
            found.extend(_remote_caches(root))
    return found


def _remote_caches(root: Location) -> list[Location]:
    """The caches below a prefix of an object store, one listing per level, none inside a
    cache (its chunks are never listed)."""
    found, pending = [], [root.root]
    while pending:
        prefix = pending.pop(0)
        root.fs.invalidate_cache()
        for entry in sorted(root.fs.ls(prefix, detail=True), key=lambda e: e["name"]):
            if entry.get("type") != "directory":
                continue
            folder = Location(root.fs.unstrip_protocol(entry["name"].rstrip("/")))
            if _is_cache(folder):
                found.append(folder)
            else:
                pending.append(entry["name"].rstrip("/"))
    return found


def _size_mb(folder: Location) -> float:
    if folder.local:
        files = (p for p in folder.path.rglob("*") if p.is_file())
        return round(sum(p.stat().st_size for p in files) / 2**20, 3)
    return round(folder.fs.du(folder.root, total=True) / 2**20, 3)


def catalog(paths: Iterable[str | Path | Location]) -> pd.DataFrame:
    """One row per cache found (below local folders and fsspec URLs): what produced it
    and what it holds."""
    rows = []
    for path in find_caches(paths):
        try:
            m = read_cache_manifest(path)
        except KdpipeError as exc:
            rows.append({"path": str(path), "status": f"unreadable: {exc}"})
            continue
        if isinstance(m, DetectionManifest):
            rows.append(_detection_row(path, m))
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
                # of the teacher: 0 trained on labels, 1 a student of a generation-0 cache...
                "generation": m.teacher_generation,
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
                "task": "classify",
            }
        )
    frame = pd.DataFrame(rows, columns=CATALOG_COLUMNS)
    return frame.astype({name: "Int64" for name in INTEGER_COLUMNS})


def _detection_row(path: Location, m: DetectionManifest) -> dict:
    """A detection cache's row: its teacher, data YAML, images x views, classes, storage
    (dense, or the top-K anchors); no temperature (raw head outputs) nor generation yet."""
    teacher = m.teacher
    return {"path": str(path), "cache_id": m.cache_id, "status": m.status,
            "teacher_id": m.teacher_id,
            "teachers": f"{teacher['architecture']}@{teacher['weights_sha256'][:8]}",
            "generation": 0, "dataset": m.dataset["name"], "split": m.dataset["split"],
            "samples": m.num_samples, "views": m.num_views, "classes": m.num_classes,
            "temperature": None, "storage": m.describe_storage(), "dtype": m.dtype,
            "size_mb": _size_mb(path), "created": m.created, "task": "detect"}  # fmt: skip


def lineage(
    run_dir: Path,
    *,
    data_root: Path = Path("data"),
    image_size: int | None = None,
    channels: int | None = None,
) -> pd.DataFrame:
    """The chain run → cache → teacher(s) → (their cache → their teachers → ...) →
    dataset, back to the first teacher, each link checked where its files are.

    ``verified``: the file is there and its hash was recomputed and matches;
    ``missing``: the file is not where the record says; ``MISMATCH``: it is
    there but its content is not what the record says; ``recorded``: a cache that is
    gone, known from the manifest downstream of it (its teacher_id re-derived from its
    recorded teachers). The walk goes on through records when a run directory or a
    cache in the middle of the chain is gone. An exported ``.onnx``
    file starts the chain: file → run → cache → teacher(s) → dataset.
    """
    if Path(run_dir).suffix == ".onnx":
        from kdpipe.export.lineage import file_lineage

        return file_lineage(
            Path(run_dir), data_root=data_root, image_size=image_size, channels=channels
        )
    if is_detection_run(Path(run_dir)):
        return detection_lineage(Path(run_dir))
    rows: list[dict] = []

    def link(kind: str, name: str, identity: str, status: str, detail: str) -> None:
        rows.append(
            {"link": kind, "path": name, "id": identity, "status": status, "detail": detail}
        )

    load = {"data_root": data_root, "image_size": image_size, "channels": channels}
    card = read_card(run_dir)
    try:
        check_weights(run_dir)  # recomputes the weights hash from the file
        link(
            card.kind, str(run_dir), card.weights_sha256[:16], "verified", "weights hash recomputed"
        )
    except RunDirError as exc:
        link(card.kind, str(run_dir), card.weights_sha256[:16], "MISMATCH", str(exc))
    if card.source is not None:  # pretrained: where its weights came from
        _source_link(link, card.source)
    if card.lineage is None or "cache_id" not in card.lineage:  # trained on labels (or online)
        if card.dataset.get("name") is not None:  # an imported teacher was trained elsewhere
            _dataset_link(link, card.dataset, load)
        return pd.DataFrame(rows)
    datasets: list[dict] = []
    _walk_cache(link, card.lineage["cache_id"], card.lineage["cache_path"], None, datasets)
    for record in datasets or [card.dataset]:
        _dataset_link(link, record, load)
    return pd.DataFrame(rows)


def _walk_cache(
    link: Callable[..., None],
    cache_id: str,
    cache_path: str,
    record: Upstream | None,
    datasets: list[dict],
) -> None:
    """The cache ``cache_id`` (at ``cache_path``, or as ``record`` describes it when it is
    gone), then each of its teachers and, for a student teacher, its own cache."""
    teachers, dataset = None, None
    try:
        manifest = read_manifest(cache_path)
    except KdpipeError as exc:
        manifest, problem = None, str(exc)
    if manifest is not None and manifest.cache_id == cache_id:
        link("cache", str(cache_path), cache_id, "verified", "cache_id matches the record")
        teachers, dataset = manifest.teachers, manifest.dataset
    elif manifest is not None:
        link("cache", str(cache_path), cache_id, "MISMATCH",
             f"the record says cache {cache_id}, this is {manifest.cache_id}")  # fmt: skip
    elif record is not None and record.teachers is not None:
        consistent = record.consistent()
        link("cache", str(cache_path), cache_id, "recorded" if consistent else "MISMATCH",
             f"gone ({problem}); known from the manifest downstream, teacher_id "
             + ("re-derived from its recorded teachers" if consistent
                else "is not the one its recorded teachers give"))  # fmt: skip
    else:
        link("cache", str(cache_path), cache_id, "missing", problem)
    if teachers is None and record is not None:  # the live cache is gone or is another one
        teachers, dataset = record.teachers, record.dataset
    for member in teachers or ():
        learned = _teacher_link(link, member)
        if member.lineage is not None:
            up = member.lineage
            _walk_cache(link, up.cache_id, up.cache_path, up, datasets)
        elif learned is not None:  # a cache written before members recorded their lineage
            _walk_cache(link, learned["cache_id"], learned["cache_path"], None, datasets)
    if dataset is not None and dataset not in datasets:
        datasets.append(dataset)


def _teacher_link(link: Callable[..., None], member: TeacherMember) -> dict | None:
    """A teacher run directory, its weights hash recomputed, and the cache its card says
    it learned from compared with the manifest's record of it: that cache's lineage (as
    the card has it) when the run is there and learned from a cache. A SOURCE imported on
    the fly (``timm:``, ``hf-hub:``) has no run directory: its source is the link."""
    if member.source is not None and looks_like_source(member.run_dir):
        link("teacher", member.run_dir, member.weights_sha256[:16], "recorded",
             "imported on the fly by cache-teacher")  # fmt: skip
        _source_link(link, member.source)
        return None
    if member.source is not None:
        _source_link(link, member.source)
    try:
        teacher = check_weights(Path(member.run_dir))
    except RunDirError as exc:
        status = "MISMATCH" if Path(member.run_dir, "model.json").is_file() else "missing"
        link("teacher", member.run_dir, member.weights_sha256[:16], status, str(exc))
        return None
    card_lineage = teacher.lineage if teacher.lineage and "cache_id" in teacher.lineage else None
    learned = card_lineage["cache_id"] if card_lineage else None
    recorded = member.lineage.cache_id if member.lineage is not None else None
    if teacher.weights_sha256 != member.weights_sha256:
        detail = (f"the cache was made by weights {member.weights_sha256[:16]}, these are "
                  f"{teacher.weights_sha256[:16]}")  # fmt: skip
    elif recorded is not None and learned != recorded:
        detail = f"the run learned from cache {learned}, the manifest records {recorded}"
    else:
        link("teacher", member.run_dir, member.weights_sha256[:16], "verified",
             "weights hash recomputed")  # fmt: skip
        return card_lineage
    link("teacher", member.run_dir, member.weights_sha256[:16], "MISMATCH", detail)
    return None


def _source_link(link: Callable[..., None], source: dict) -> None:
    """The pretrained weights a teacher was imported or fine-tuned from, named by where they
    came from (:func:`weights_origin`): the weights file's SHA-256 recomputed where there is
    one (a --weights file, a local-dir folder's), else what the record says."""
    file, recorded = source.get("weights_file"), source.get("weights_file_sha256")
    name = f"{source['source']} ({source.get('pretrained_cfg')})"
    origin = weights_origin(source)
    if file is None:
        link("source", name, "", "recorded", origin)
    elif not Path(file).is_file():
        link("source", f"{name} {file}", (recorded or "")[:16], "missing",
             f"{origin}: {file} is gone")  # fmt: skip
    else:
        same = file_sha256(Path(file)) == recorded
        link("source", f"{name} {file}", (recorded or "")[:16],
             "verified" if same else "MISMATCH",
             f"{origin}: " + ("file hash recomputed" if same
                              else "the file has changed since"))  # fmt: skip


def weights_origin(source: dict) -> str:
    """Where a pretrained teacher's weights came from, in words: its record's
    ``weights_from``, or for a record made before it, what its SOURCE and weights file say."""
    text = str(source["source"])
    kind, _, name = text.partition(":")
    origin = source.get("weights_from")
    if origin is None:  # an older record: a file was a --weights file, except a folder's
        origin = (
            "weights-file"
            if source.get("weights_file")
            else {"timm": "timm-download", "hf-hub": "hf-hub", "local-dir": "local-dir"}.get(kind)
        )
    if origin == "weights-file":
        return f"weights from the file {source.get('weights_file')}"
    if origin == "local-dir":
        return f"weights from the local folder {name}"
    if origin == "hf-hub":
        return f"weights from the Hugging Face hub repository {name} (huggingface_hub's download)"
    if origin == "timm-download":
        return f"weights from timm's download of {source.get('pretrained_cfg')}"
    return f"weights from {text}"


def _dataset_link(link, record: dict, load: dict) -> None:
    name = f"{record['name']} ({record['split']})"
    expected = record["fingerprint"]
    try:  # decoded as the record says (dataset.decode) unless --image-size/--channels say
        given = {"image_size": load.get("image_size"), "channels": load.get("channels")}
        decode = decode_options(record, name, **given)
        actual = dataset_fingerprint(record["name"], record["split"],
                                     data_root=load["data_root"], **decode)  # fmt: skip
    except KdpipeError as exc:
        link("dataset", name, expected["sha256"][:16], "missing", str(exc))
        return
    same = actual == expected
    link(
        "dataset",
        name,
        expected["sha256"][:16],
        "verified" if same else "MISMATCH",
        "fingerprint recomputed" if same else "the data on disk has another fingerprint",
    )


def detection_lineage(run_dir: Path) -> pd.DataFrame:
    """The chain of a detection run: run → cache → teacher → data YAML (a student whose card
    records the cache it learned from), or run → data YAML (a teacher trained here), each
    link checked where its files are, with the statuses of :func:`lineage`."""
    from kdpipe.tasks.detect.runs import load_detection_run, read_detection_card

    rows: list[dict] = []

    def link(kind: str, name: str, identity: str, status: str, detail: str) -> None:
        rows.append({"link": kind, "path": name, "id": identity, "status": status,
                     "detail": detail})  # fmt: skip

    card = read_detection_card(run_dir)
    _detection_run_link(link, card.kind, run_dir, card.weights_sha256, load_detection_run)
    dataset = card.dataset
    cache_id, cache_path = (card.lineage or {}).get("cache_id"), (card.lineage or {}).get(
        "cache_path")  # fmt: skip
    if cache_id is not None:
        try:
            manifest = read_detection_manifest(cache_path)
        except KdpipeError as exc:
            link("cache", str(cache_path), cache_id, "missing", str(exc))
            return pd.DataFrame(rows)
        same = manifest.cache_id == cache_id
        link("cache", str(cache_path), cache_id, "verified" if same else "MISMATCH",
             "cache_id matches the record" if same
             else f"the record says cache {cache_id}, this is {manifest.cache_id}")  # fmt: skip
        teacher = manifest.teacher
        _detection_run_link(link, "teacher", Path(teacher["run_dir"]),
                            teacher["weights_sha256"], load_detection_run)  # fmt: skip
        dataset = manifest.dataset
    if dataset:
        _detection_data_link(link, dataset)
    return pd.DataFrame(rows)


def _detection_run_link(link: Callable[..., None], kind: str, run_dir: Path, recorded: str,
                        load: Callable[[Path], tuple]) -> None:  # fmt: skip
    """A detection run directory, its weights hash recomputed against the record."""
    try:
        _, card = load(run_dir)
    except KdpipeError as exc:
        status = "MISMATCH" if Path(run_dir, "model.json").is_file() else "missing"
        link(kind, str(run_dir), recorded[:16], status, str(exc))
        return
    same = card.weights_sha256 == recorded
    link(kind, str(run_dir), recorded[:16], "verified" if same else "MISMATCH",
         "weights hash recomputed" if same
         else f"the record says weights {recorded[:16]}, these are "
         f"{card.weights_sha256[:16]}")  # fmt: skip


def _detection_data_link(link: Callable[..., None], record: dict) -> None:
    """A YOLO data YAML's split, its fingerprint (images and labels) recomputed."""
    from kdpipe.data.yolo import load_detection_split

    name = record.get("name") or record.get("data_yaml")
    expected = record["fingerprint"]
    label = f"{name} ({record['split']})"
    try:
        split = load_detection_split(name, record["split"])
    except KdpipeError as exc:
        link("dataset", label, expected["sha256"][:16], "missing", str(exc))
        return
    same = split.fingerprint == expected
    link("dataset", label, expected["sha256"][:16], "verified" if same else "MISMATCH",
         "fingerprint recomputed (images and labels)" if same
         else "the images or labels on disk have another fingerprint")  # fmt: skip
