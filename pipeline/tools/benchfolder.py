"""``make bench``'s measured section on real files: a folder of JPEGs, arms in subprocesses.

Two things live here:

- :func:`build_jpeg_folder` (``kdpipe jpeg-folder``, ``make jpeg-folder``): a folder of RGB
  JPEGs made from Fashion-MNIST by a fixed recipe (:data:`RECIPE`), so that anyone with the
  same Pillow (and libjpeg) rebuilds it bit-identically. Image *i* of a split is a pure
  function of (seed, split, i) and the source pixels: its two colours and its side come
  from numpy's PCG64 seeded with ``(seed, split number, i)``, so a folder of the first N
  images holds the same files as the first N of a larger one.
- :func:`run_folder_bench` (``kdpipe bench-folder``): peak memory and speed of
  ``cache-teacher`` and ``train-student`` on such a folder, each measurement in a fresh
  subprocess (its peak RSS from its own ``VmHWM``), the arms alternated, every timed arm run
  ``repeats`` times and the fastest counted; against timm's own loader running the same
  teacher, and the same student on hard labels.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import pandas as pd
from kdpipe.base.errors import DatasetError, KdpipeError, UsageError
from kdpipe.base.flags import flag

# --- the JPEG folder -----------------------------------------------------------------------------

RECIPE = {
    "source": "Fashion-MNIST, the first N images of each split in file order",
    "colour": "pixel = background + (foreground - background) * gray / 255, rounded; the two "
    "RGB colours uniform integers in [0, 255] from PCG64 seeded (seed, split, index)",
    "size": "a side uniform in [min_side, max_side] from the same generator, drawn after "
    "the colours; resized from 28 x 28 with PIL bicubic",
    "jpeg": "PIL, quality fixed, 4:2:0 subsampling, baseline, not optimised",
    "path": "<split>/<label:02d>-<class>/<index:05d>.jpg",
}
SPLIT_NUMBER = {"train": 0, "test": 1}
RECIPE_FILE = "RECIPE.json"
BLOCK = 1000  # images per task of the writing processes


@dataclass(frozen=True, kw_only=True)
class JpegRecipe:
    seed: int = 0
    quality: int = 90
    min_side: int = 140
    max_side: int = 200

    def validate(self) -> None:
        if not 1 <= self.quality <= 95:
            raise UsageError(f"--quality must be in 1..95, not {self.quality}")
        if not 1 <= self.min_side <= self.max_side:
            raise UsageError(f"the side range {self.min_side}..{self.max_side} is empty")


def class_folder(label: int, name: str) -> str:
    """``03-dress``: the label first, so the folder's sorted class order is the label order."""
    slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    return f"{label:02d}-{slug}"


def jpeg_bytes(gray: np.ndarray, split: str, index: int, recipe: JpegRecipe) -> bytes:
    """Image ``index`` of ``split`` (a uint8 (H, W) grayscale image) by the recipe."""
    import io

    from PIL import Image

    rng = np.random.default_rng((recipe.seed, SPLIT_NUMBER[split], index))
    foreground = rng.integers(0, 256, 3).astype(np.float64)
    background = rng.integers(0, 256, 3).astype(np.float64)
    side = int(rng.integers(recipe.min_side, recipe.max_side + 1))
    weight = gray.astype(np.float64)[..., None] / 255.0
    rgb = np.rint(background + (foreground - background) * weight).astype(np.uint8)
    image = Image.fromarray(rgb, "RGB").resize((side, side), Image.BICUBIC)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=recipe.quality, subsampling=2, optimize=False,
               progressive=False)  # fmt: skip
    return out.getvalue()


def _write_block(task: tuple) -> list[tuple[str, str]]:
    """One block of images written; (relative path, SHA-256) of each."""
    out, split, start, grays, labels, folders, recipe = task
    written = []
    for offset, (gray, label) in enumerate(zip(grays, labels, strict=True)):
        index = start + offset
        relative = f"{split}/{folders[int(label)]}/{index:05d}.jpg"
        data = jpeg_bytes(gray, split, index, recipe)
        (Path(out) / relative).write_bytes(data)
        written.append((relative, hashlib.sha256(data).hexdigest()))
    return written


def build_jpeg_folder(
    out: Path,
    counts: dict[str, int],
    *,
    source: str = "fashion-mnist",
    data_root: Path = Path("data"),
    recipe: JpegRecipe = JpegRecipe(),
    workers: int = 2,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Write ``out/<split>/<class>/<index>.jpg`` for the first ``counts[split]`` images of
    each split of ``source``, by :data:`RECIPE`, in ``workers`` processes; then
    ``out/RECIPE.json`` (the recipe, counts, Pillow's versions and a SHA-256 over every
    file's path and digest), which it returns."""
    from kdpipe.base.outputs import JPEG_FOLDER, guard_output, mark_folder
    from kdpipe.data.datasets import load_dataset
    from PIL import __version__ as pillow_version
    from PIL import features

    recipe.validate()
    out = Path(out)
    guard_output(out, JPEG_FOLDER, overwrite=overwrite, inputs=[Path(data_root) / source],
                 option="--dest")  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    mark_folder(out, "jpeg-folder")  # first: a build killed half-way is still known as ours
    written: list[tuple[str, str]] = []
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        for split, count in counts.items():
            dataset = load_dataset(source, split, data_root=Path(data_root))
            if not 0 < count <= len(dataset):
                raise UsageError(f"{split}: {count} images asked, {source} has {len(dataset)}")
            folders = [class_folder(i, name) for i, name in enumerate(dataset.classes)]
            grays = dataset.images[:count, 0].numpy()
            labels = dataset.labels[:count].numpy()
            for label in np.unique(labels):  # a class with no image here gets no folder
                (out / split / folders[int(label)]).mkdir(parents=True, exist_ok=True)
            tasks = [(str(out), split, s, grays[s : s + BLOCK], labels[s : s + BLOCK], folders,
                      recipe) for s in range(0, count, BLOCK)]  # fmt: skip
            for block in pool.map(_write_block, tasks):
                written += block
            log(f"{out / split}: {count} JPEGs")
    digest = hashlib.sha256()
    for relative, sha in sorted(written):
        digest.update(f"{relative}\t{sha}\n".encode())
    record = {
        "recipe": RECIPE, **asdict(recipe), "source": source, "counts": dict(counts),
        "pillow": pillow_version, "libjpeg": features.version("jpg"),
        "files_sha256": digest.hexdigest(),
    }  # fmt: skip
    (out / RECIPE_FILE).write_text(json.dumps(record, indent=1) + "\n")
    return record


# --- the measurements ----------------------------------------------------------------------------

CPU_ARMS = {"teacher": "resnet10t", "image_size": 32}  # a 50,000-image pass in minutes on 2 cores
CUDA_ARMS = {"teacher": "resnet50", "image_size": 224}  # the GPU line: bf16 by --precision auto


@dataclass(frozen=True, kw_only=True)
class FolderBenchConfig:
    out: str  # a work folder, made here (replaced with overwrite when bench-folder made it)
    folder: str  # the large folder (make jpeg-folder: 50,000 train images)
    small: str  # the small folder of the memory comparison (its first 6,000)
    teacher: str | None = None  # None: resnet10t on the CPU, resnet50 on CUDA
    student: str = "kd_cnn"
    image_size: int | None = None  # decode size of every arm; None: 32 (CPU), 224 (CUDA)
    batch_size: int = 256
    epochs: int = 3  # per student run; the first and the last (evaluated) are not timed
    repeats: int = 2
    workers: int = 2  # DataLoader processes of every arm, kdpipe's and timm's alike
    device: str = "auto"
    precision: str = "auto"
    overwrite: bool = False  # replace an --out (and a --csv) that bench-folder wrote

    def command(self, markdown: Path | None, csv_path: Path | None) -> str:
        parts = ["kdpipe bench-folder", f"--out {self.out}", f"--folder {self.folder}",
                 f"--small {self.small}"]  # fmt: skip
        for item in fields(self):
            value = getattr(self, item.name)
            if item.name not in ("out", "folder", "small", "overwrite") and value != item.default:
                parts.append(f"{flag(item.name)} {value}")
        parts += [f"--markdown {markdown}"] if markdown else []
        parts += [f"--csv {csv_path}"] if csv_path else []
        return " ".join(parts)

    def validate(self) -> None:
        for option, folder in (("--folder", self.folder), ("--small", self.small)):
            if not (Path(folder) / "train").is_dir():
                raise DatasetError(f"{option} {folder} has no train/ folder: build it with "
                                   "`make jpeg-folder` (kdpipe jpeg-folder)")  # fmt: skip
        if Path(self.folder).resolve() == Path(self.small).resolve():
            raise UsageError(f"--folder and --small are the same folder ({self.folder})")
        if self.epochs < 3:
            raise UsageError(f"--epochs must be >= 3 (one warm-up, one timed, one evaluated), "
                             f"not {self.epochs}")  # fmt: skip
        if self.repeats < 1:
            raise UsageError(f"--repeats must be >= 1, not {self.repeats}")

    def resolved(self, cuda: bool) -> FolderBenchConfig:
        """Teacher and size filled in for the device: see :data:`CPU_ARMS`, :data:`CUDA_ARMS`."""
        arms = CUDA_ARMS if cuda else CPU_ARMS
        filled = {"teacher": self.teacher or arms["teacher"],
                  "image_size": self.image_size or arms["image_size"]}  # fmt: skip
        return FolderBenchConfig(**{**asdict(self), **filled})


@dataclass
class Measured:
    seconds: float  # the arm's own time, after its imports (see _arm_main)
    rows: int
    peak_rss_mib: float  # the arm process's own peak (peak_rss_mib), DataLoader workers aside
    run_dir: str | None = None
    epochs: list[float] = field(default_factory=list)  # an API loop's seconds per epoch


def run_arm(spec: dict, work: Path) -> Measured:
    """One measurement in a fresh ``python -m kdpipe.tools.benchfolder`` process: its output in
    ``work/<name>.log``, its result (seconds, rows, its peak RSS) in ``work/<name>.json``."""
    work.mkdir(parents=True, exist_ok=True)
    name = spec["name"]
    result_file, log_file = work / f"{name}.json", work / f"{name}.log"
    result_file.unlink(missing_ok=True)
    spec = {**spec, "result": str(result_file)}
    with open(log_file, "w") as log:
        command = [sys.executable, "-m", "kdpipe.tools.benchfolder", json.dumps(spec)]
        child = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=_child_env(work)
        )
        child.wait()
    if child.returncode != 0 or not result_file.exists():
        lines = [line for line in log_file.read_text().splitlines() if line.strip()]
        last = lines[-1] if lines else "no output"
        raise KdpipeError(f"bench arm {name} failed (exit {child.returncode}): {last} "
                          f"(log: {log_file})")  # fmt: skip
    result = json.loads(result_file.read_text())
    return Measured(result["seconds"], result["rows"], result["peak_rss_mib"], result["run_dir"],
                    result["epochs"])  # fmt: skip


# a command run as the console script runs it, then what it cost: its peak RSS and the
# deep-learning libraries it imported, written to the file named first
_COMMAND_PROBE = """import json, sys
out, sys.argv = sys.argv[1], ["kdpipe", *sys.argv[2:]]
from kdpipe.cli import main
from kdpipe.tools.benchfolder import peak_rss_mib
try:
    main()
except SystemExit as exc:
    code = exc.code or 0
heavy = [m for m in ("torch", "timm", "torchvision") if m in sys.modules]
json.dump({"code": code, "peak_rss_mib": peak_rss_mib(), "imports": heavy}, open(out, "w"))
"""


def command_cost(args: list[str], work: Path) -> dict:
    """One kdpipe command in a fresh interpreter: wall seconds from start to exit (imports
    included: what a person waits for), its peak RSS (MiB) and the deep-learning libraries
    it imported."""
    work.mkdir(parents=True, exist_ok=True)
    result_file = work / "command-cost.json"
    result_file.unlink(missing_ok=True)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _COMMAND_PROBE, str(result_file), *args],
                          capture_output=True, text=True, env=_child_env(work),
                          check=False)  # fmt: skip
    seconds = time.perf_counter() - started
    if not result_file.exists() or json.loads(result_file.read_text())["code"] != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise KdpipeError(f"bench: kdpipe {' '.join(args)} failed: {last}")
    return {"seconds": seconds, **json.loads(result_file.read_text())}


def _child_env(work: Path) -> dict[str, str]:
    """The environment of an arm: this one, with the ``kdpipe`` package the bench runs first
    on the path (a link ``work/.path/kdpipe`` to its folder: the source folder is
    ``pipeline/``), so the arm runs the same code, not another checkout's install."""
    import kdpipe

    package = Path(kdpipe.__file__).resolve().parent
    path = work / ".path"
    link = path / "kdpipe"
    path.mkdir(parents=True, exist_ok=True)
    if not link.is_symlink() or link.resolve() != package:
        link.unlink(missing_ok=True)
        link.symlink_to(package, target_is_directory=True)
    rest = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": str(path) + (os.pathsep + rest if rest else "")}


def _arm_main(spec: dict) -> None:
    """The subprocess side of :func:`run_arm`: run one arm, time it from after the imports
    (loading the model and listing the data included), write the result."""
    from kdpipe.base.runtime import resolve_device
    from kdpipe.data.datasets import load_dataset
    from kdpipe.models.teach import CacheConfig, cache_teacher
    from kdpipe.train import TrainConfig, train_student
    from kdpipe.train import train_teacher as train_model

    kind, folder, size, workers = spec["kind"], spec["folder"], spec["image_size"], spec["workers"]
    common = {"data": folder, "image_size": size, "batch_size": spec["batch_size"],
              "workers": workers, "device": spec["device"], "precision": spec["precision"],
              "overwrite": True}  # fmt: skip
    started = time.perf_counter()
    run_dir, epochs = None, []
    if kind == "cache-teacher":
        dataset = load_dataset(folder, "train", image_size=size).with_workers(workers)
        cache_teacher(CacheConfig(teachers=(spec["teacher"],), out=spec["cache"],
                                  batch_size=spec["batch_size"], device=spec["device"],
                                  precision=spec["precision"], overwrite=True),
                      dataset, log=lambda line: None)  # fmt: skip
        rows = len(dataset)
    elif kind == "timm-loop":
        rows = _timm_loop(spec, resolve_device(spec["device"]))
    elif kind in ("student", "hard"):
        run_dir = spec["out"]
        student = {"model": spec["student"], "out": run_dir, "epochs": spec["epochs"],
                   "eval_every": spec["epochs"], **common}  # fmt: skip
        if kind == "student":
            train_student(TrainConfig(cache=spec["cache"], alpha=0.5, **student))
        else:
            train_model(TrainConfig(**student))
        rows = 0  # its epochs' seconds are read from the run's metrics.csv
    elif kind in ("api-items", "api-batches"):
        epochs = _api_loop(spec, resolve_device(spec["device"]), batched=kind == "api-batches")
        rows = 0
    else:
        raise UsageError(f"unknown bench arm {kind!r}")
    seconds = time.perf_counter() - started
    result = {"seconds": seconds, "rows": rows, "run_dir": run_dir, "peak_rss_mib": peak_rss_mib(),
              "epochs": epochs}  # fmt: skip
    Path(spec["result"]).write_text(json.dumps(result))


def peak_rss_mib() -> float:
    """This process's peak resident set, MiB: ``VmHWM`` of ``/proc/self/status``, the
    high-water mark of its own memory since its ``exec``. Not ``ru_maxrss`` (``wait4``,
    ``RUSAGE_CHILDREN``, ``/usr/bin/time`` run from here): Linux carries ``ru_maxrss`` across
    ``exec`` from the forked copy of the parent, so a child of the bench (torch loaded, a
    teacher trained) reports at least the bench's own size. Elsewhere,
    ``getrusage(RUSAGE_SELF)``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def _api_loop(spec: dict, device: object, *, batched: bool) -> list[float]:
    """The Python API's loop (docs/examples/plain_loop.py's shape: the train-student arm's
    student, SGD, kdpipe's loss at its alpha) over the folder's cache, fed by
    ``DistillationDataset`` items through a ``DataLoader`` with the arm's workers, or by
    its ``batches()`` with as many; the seconds of each epoch."""
    import kdpipe as kd
    import torch

    cache = kd.open_cache(spec["cache"])
    images = kd.load_dataset(spec["folder"], "train", **cache.decode)
    dataset = kd.DistillationDataset(images, cache, seed=0)
    torch.manual_seed(0)
    model = kd.create_model(spec["student"], num_classes=cache.num_classes,
                            data_config=dataset.data_config)  # fmt: skip
    # channels_last, as train-student converts its model (its inputs are)
    model = model.to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    size, workers, seconds = spec["batch_size"], spec["workers"], []
    for epoch in range(1, spec["epochs"] + 1):
        dataset.set_epoch(epoch)
        started = time.perf_counter()
        batches = (
            dataset.batches(size, generator=generator, workers=workers)
            if batched
            else torch.utils.data.DataLoader(dataset, batch_size=size, shuffle=True,
                                             generator=generator, num_workers=workers)
        )  # fmt: skip
        model.train()
        for inputs, labels, soft_targets, *_ in batches:
            logits = model(inputs.to(device))
            terms = kd.distillation_loss(logits, labels.to(device), soft_targets.to(device),
                                         alpha=0.5, temperature=dataset.temperature)  # fmt: skip
            optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    return seconds


def _timm_loop(spec: dict, device: object) -> int:
    """timm's own dataset and loader (``create_dataset('', root, split='train')``,
    ``create_loader`` with the teacher's data config, no augmentation, the same workers)
    feeding the same teacher as kdpipe loads it (channels_last, the same precision); the
    logits to the host as ``predict_logits`` keeps them. Returns the rows seen."""
    import torch
    from kdpipe.models.runs import load_model
    from kdpipe.views.inputs import autocast
    from timm.data import create_dataset, create_loader

    model, card = load_model(Path(spec["teacher"]), device)
    data = card.data
    dataset = create_dataset("", root=spec["folder"], split="train")
    loader = create_loader(
        dataset, input_size=data.input_size, batch_size=spec["batch_size"], is_training=False,
        no_aug=True, interpolation=data.interpolation or "bilinear", mean=data.mean,
        std=data.std, crop_pct=data.crop_pct or 1.0, crop_mode=data.crop_mode or "center",
        num_workers=spec["workers"], device=device, use_prefetcher=device.type == "cuda",
        persistent_workers=False,
    )  # fmt: skip
    outputs = []
    with torch.inference_mode():
        for images, _ in loader:
            images = images.to(device, non_blocking=True)
            with autocast(device, spec["precision"]):
                logits = model(images.contiguous(memory_format=torch.channels_last))
            outputs.append(logits.float().cpu())
    return int(sum(len(o) for o in outputs))


def run_folder_bench(config: FolderBenchConfig, log: Callable[[str], None] = print) -> pd.DataFrame:
    """The measured section: one row per quantity (name, value, unit, what)."""
    import torch
    from kdpipe.base.outputs import BENCH_WORK, guard_output, mark_folder
    from kdpipe.base.runtime import resolve_device
    from kdpipe.data.datasets import load_dataset
    from kdpipe.tools.bench import _epoch_seconds
    from kdpipe.train import TrainConfig
    from kdpipe.train import train_teacher as train_model
    from kdpipe.views.inputs import resolve_precision

    config.validate()
    device = resolve_device(config.device)
    config = config.resolved(device.type == "cuda")
    out = Path(config.out)
    guard_output(out, BENCH_WORK, overwrite=config.overwrite, inputs=[config.folder, config.small])
    out.mkdir(parents=True, exist_ok=True)  # absent, or an empty folder
    mark_folder(out, "bench-folder")
    sizes = {}
    for label, folder in (("large", config.folder), ("small", config.small)):
        # the index (a SHA-256 per file) built once here, before any arm is timed
        sizes[label] = len(load_dataset(folder, "train", image_size=config.image_size))
    log(f"bench-folder: {sizes['large']} and {sizes['small']} images, teacher "
        f"{config.teacher} and student {config.student} at {config.image_size} px, "
        f"{config.workers} workers, {device}")  # fmt: skip
    teacher_dir = out / "teacher"
    base = {"image_size": config.image_size, "batch_size": config.batch_size,
            "workers": config.workers, "device": config.device,
            "precision": config.precision}  # fmt: skip
    # the teacher: its architecture matters here, not its accuracy (one short epoch)
    train_model(TrainConfig(model=config.teacher, data=config.small, out=str(teacher_dir),
                            epochs=1, subset=0.25, **base, overwrite=True))  # fmt: skip
    caches = {label: str(out / f"cache-{label}.zarr") for label in ("large", "small")}
    arms = {
        "timm_loop": {"kind": "timm-loop", "folder": config.folder},
        "cache_teacher_large": {"kind": "cache-teacher", "folder": config.folder,
                                "cache": caches["large"]},
        "cache_teacher_small": {"kind": "cache-teacher", "folder": config.small,
                                "cache": caches["small"]},
        "hard_large": {"kind": "hard", "folder": config.folder},
        "student_large": {"kind": "student", "folder": config.folder, "cache": caches["large"]},
        "student_small": {"kind": "student", "folder": config.small, "cache": caches["small"]},
        "api_items": {"kind": "api-items", "folder": config.folder, "cache": caches["large"]},
        "api_batches": {"kind": "api-batches", "folder": config.folder, "cache": caches["large"]},
    }  # fmt: skip
    measured: dict[str, list[Measured]] = {name: [] for name in arms}
    epochs: dict[str, list[float]] = {name: [] for name in arms}
    for round_index in range(config.repeats):
        for name, arm in arms.items():
            spec = {**base, **arm, "name": f"{name}-{round_index}", "teacher": str(teacher_dir),
                    "student": config.student, "epochs": config.epochs,
                    "out": str(out / f"{name}-{round_index}")}  # fmt: skip
            result = run_arm(spec, out / "arms")
            if result.run_dir is not None:
                epochs[name] += _epoch_seconds(Path(result.run_dir))
            epochs[name] += result.epochs[1:]  # an API loop's, its first (warm-up) left out
            measured[name].append(result)
            log(f"{spec['name']}: {result.seconds:.1f} s, peak RSS {result.peak_rss_mib:.0f} MiB")
    table = _folder_rows(config, sizes, measured, epochs)
    table.attrs.update({"config": asdict(config), "device": str(device),
                        "precision": resolve_precision(device, config.precision),
                        "sizes": sizes, "torch_threads": torch.get_num_threads()})  # fmt: skip
    return table


def _folder_rows(
    config: FolderBenchConfig, sizes: dict, measured: dict, epochs: dict
) -> pd.DataFrame:  # fmt: skip
    rows: list[dict] = []

    def record(name: str, value: float, unit: str, what: str) -> None:
        rows.append({"name": name, "value": value, "unit": unit, "what": what})

    large, small = sizes["large"], sizes["small"]
    runs = config.repeats
    for command, arm in (("cache_teacher", "cache_teacher"), ("train_student", "student")):
        peaks = {label: max(m.peak_rss_mib for m in measured[f"{arm}_{label}"])
                 for label in ("small", "large")}  # fmt: skip
        record(
            f"rss_{command}_small_MiB",
            peaks["small"],
            "MiB",
            f"peak RSS of {command.replace('_', '-')} at {small} images (largest of {runs})",
        )
        record(
            f"rss_{command}_large_MiB",
            peaks["large"],
            "MiB",
            f"peak RSS of {command.replace('_', '-')} at {large} images (largest of {runs})",
        )
        record(
            f"M1_rss_{command}",
            peaks["large"] / peaks["small"],
            "ratio",
            f"peak RSS at {large} / at {small} images (target <= 1.2)",
        )
    teacher_s = min(m.seconds for m in measured["cache_teacher_large"])
    timm_s = min(m.seconds for m in measured["timm_loop"])
    timm_rows = measured["timm_loop"][0].rows
    if timm_rows != large:
        raise KdpipeError(
            f"timm's loader saw {timm_rows} images of {config.folder}, kdpipe {large}"
        )
    record("cache_teacher_rows_per_s", large / teacher_s, "rows/s",
           f"cache-teacher over {large} images, writing the store ({teacher_s:.1f} s, fastest "
           f"of {runs})")  # fmt: skip
    record("timm_loop_rows_per_s", large / timm_s, "rows/s",
           f"timm's create_dataset + create_loader, the same teacher ({timm_s:.1f} s, "
           f"fastest of {runs})")  # fmt: skip
    record(
        "M2_teacher_rows",
        timm_s / teacher_s,
        "ratio",
        "cache-teacher rows/s / timm loop rows/s (target >= 0.95)",
    )
    cached, hard = min(epochs["student_large"]), min(epochs["hard_large"])
    record("cached_epoch_s", cached, "s",
           f"train-student epoch from the cache, {large} images (fastest of "
           f"{len(epochs['student_large'])})")  # fmt: skip
    record("hard_epoch_s", hard, "s", "the same student on hard labels, the same loader")
    record("M3_epoch", cached / hard, "ratio", "cached epoch / hard-label epoch (target <= 1.05)")
    items, batches = min(epochs["api_items"]), min(epochs["api_batches"])
    record("api_items_epoch_s", items, "s",
           f"the Python API's loop over DistillationDataset items, a DataLoader of "
           f"{config.workers} workers, {large} images (fastest of "
           f"{len(epochs['api_items'])})")  # fmt: skip
    record(
        "api_batches_epoch_s",
        batches,
        "s",
        "the same loop over DistillationDataset.batches(), as many workers",
    )
    record(
        "api_items_vs_batches",
        items / batches,
        "ratio",
        "items epoch / batches() epoch (issue 27.9: items ran at a fifth of train-student)",
    )
    record(
        "api_batches_vs_cached",
        batches / cached,
        "ratio",
        "batches() epoch / train-student epoch from the cache",
    )
    return pd.DataFrame(rows)


def folder_bench_report(
    config: FolderBenchConfig, markdown_path: Path | None, csv_path: Path | None,
    section: str | None = None, log: Callable[[str], None] = print,
) -> pd.DataFrame:  # fmt: skip
    """Run the measured section, then write its CSV and its section of ``markdown_path``."""
    from kdpipe.tools.bench import guard_tables, publish_measured

    guard_tables(csv_path, markdown_path, overwrite=config.overwrite)
    table = run_folder_bench(config, log)
    attrs = table.attrs
    resolved = attrs["config"]
    device = attrs["device"]
    publish_measured(
        table,
        command=config.command(markdown_path, csv_path),
        setting=f"{attrs['sizes']['large']} and {attrs['sizes']['small']} JPEGs, teacher "
        f"{resolved['teacher']}, student {resolved['student']}, both at "
        f"{resolved['image_size']} px, batch {config.batch_size}, {config.workers} DataLoader "
        f"workers per arm, {device}, {attrs['precision']}, {config.epochs} epochs per student "
        "run (the first and the evaluated last are not timed); every arm a fresh subprocess, "
        f"the arms alternated, each run {config.repeats} times, the fastest counted.",
        csv_path=csv_path,
        markdown_path=markdown_path,
        section=section or f"bench-folder-{device.split(':')[0]}",
    )
    return table


if __name__ == "__main__":
    _arm_main(json.loads(sys.argv[1]))
