"""``kdpipe bench-detect``: what a detection student's epoch costs, arm against arm, side by side.

``make detect`` times each arm in whichever pair of jobs shares the cores at the time, so
its epoch-time ratios move by 20 % between two runs of the same code. Here every arm runs in
one process, one after the other, round after round, and the fastest timed epoch of each
counts, so that the ratios compare runs under the same load:

- D1 the teacher pass: ``cache-teacher`` over every view, dense and top-K (seconds, and the
  bytes per view each stores);
- D2 an epoch from the dense cache, and from the top-K cache, / the same student's
  hard-label epoch over the same number of views (issue 25's goal: at most 1.10);
- D3 an online distillation epoch (the teacher run on every batch) / the dense cached
  epoch (goal: at least 1.5).

Every student run has the bench's epochs; the first is a warm-up and is not timed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from kdpipe.base.errors import UsageError
from kdpipe.base.outputs import BENCH_WORK, guard_output, mark_folder
from kdpipe.models.runs import METRICS_FILE
from kdpipe.tasks.detect.results import cache_record
from kdpipe.tasks.detect.teach import DetectCacheConfig, cache_detection_teacher
from kdpipe.tasks.detect.train import DetectStudentConfig, train_detection_student
from kdpipe.tools.bench import guard_tables, publish_measured

ARMS = ("hard", "dense", "topk", "online")


@dataclass(frozen=True, kw_only=True)
class DetectBenchConfig:
    out: str  # a work folder, made here (replaced with overwrite when bench-detect made it)
    teacher: str  # a detection teacher run (train-teacher or import-teacher)
    data: str  # a YOLO data YAML; its train split is what every arm trains on
    students: tuple[str, ...] = ("yolo11n.yaml",)
    views: int = 4
    top_k: int = 24
    dtype: str = "float16"  # the caches' values (cache-teacher --dtype)
    epochs: int = 3  # per student run; the first is not timed
    repeats: int = 2  # rounds of every arm, alternated; the fastest timed epoch counts
    batch_size: int = 16
    device: str = "cpu"
    overwrite: bool = False

    def validate(self) -> None:
        if self.epochs < 2:
            raise UsageError(f"--epochs must be >= 2 (one warm-up, one timed), not {self.epochs}")
        if self.repeats < 1:
            raise UsageError(f"--repeats must be >= 1, not {self.repeats}")
        if not self.students:
            raise UsageError("--students names no student architecture")

    def command(self, markdown: Path | None, csv_path: Path | None) -> str:
        """The kdpipe bench-detect command line for this configuration."""
        parts = ["kdpipe bench-detect", f"--teacher {self.teacher}", f"--data {self.data}",
                 f"--students {','.join(self.students)}", f"--views {self.views}",
                 f"--top-k {self.top_k}", f"--dtype {self.dtype}", f"--epochs {self.epochs}",
                 f"--repeats {self.repeats}", f"--batch-size {self.batch_size}",
                 f"--device {self.device}", f"--out {self.out}"]  # fmt: skip
        parts += [f"--markdown {markdown}"] if markdown else []
        parts += [f"--csv {csv_path}"] if csv_path else []
        return " ".join(parts)


def _timed_epochs(run_dir: Path) -> list[float]:
    """Seconds of every epoch after the first (the warm-up)."""
    return [float(v) for v in pd.read_csv(run_dir / METRICS_FILE)["seconds"].iloc[1:]]


def run_detect_bench(config: DetectBenchConfig, log: Callable[[str], None] = print) -> pd.DataFrame:
    """D1-D3; one row per measured quantity (name, value, unit, what it is)."""
    config.validate()
    out = Path(config.out)
    guard_output(out, BENCH_WORK, overwrite=config.overwrite,
                 inputs=[config.teacher, config.data])  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)  # absent, or an empty folder
    mark_folder(out, "bench-detect")
    results: list[dict] = []

    def record(name: str, value: float, unit: str, what: str) -> None:
        results.append({"name": name, "value": value, "unit": unit, "what": what})
        log(f"{name}: {value:.4g} {unit}  ({what})")

    caches = {"dense": out / "dense.zarr", "topk": out / "topk.zarr"}
    size = None  # every arm at the caches' canvas: the teacher's own image size
    for name, path in caches.items():
        cache_detection_teacher(DetectCacheConfig(
            teacher=config.teacher, data=config.data, out=str(path), views=config.views,
            top_k=config.top_k if name == "topk" else None, dtype=config.dtype,
            device=config.device,
        ), log=lambda _: None)  # fmt: skip
        stored = cache_record(path)
        size = stored["image_size"]
        record(f"D1_{name}_pass_s", stored["teacher_pass_s"], "s",
               f"cache-teacher, {stored['storage']}, {stored['rows']} images x "
               f"{stored['views']} views")  # fmt: skip
        record(f"D1_{name}_bytes_per_view", stored["bytes_per_view"], "bytes",
               f"{stored['storage']} on disk per view")  # fmt: skip
    sources = {
        "hard": {},
        "dense": {"cache": str(caches["dense"])},
        "topk": {"cache": str(caches["topk"])},
        "online": {"teacher": config.teacher},
    }
    times: dict[tuple[str, str], list[float]] = {}
    for round_index in range(config.repeats):
        for student in config.students:
            for arm in ARMS:
                run_dir = out / f"{Path(student).stem}-{arm}-{round_index}"
                train_detection_student(DetectStudentConfig(
                    model=student, data=config.data, out=str(run_dir), epochs=config.epochs,
                    batch_size=config.batch_size, views=config.views, image_size=size,
                    device=config.device, overwrite=True, **sources[arm],
                ))  # fmt: skip
                times.setdefault((student, arm), []).extend(_timed_epochs(run_dir))
    for student in config.students:
        name = Path(student).stem
        best = {arm: min(times[(student, arm)]) for arm in ARMS}
        count = len(times[(student, "hard")])
        for arm in ARMS:
            record(f"{name}_{arm}_epoch_s", best[arm], "s",
                   f"{name}: {arm} epoch (fastest of {count})")  # fmt: skip
        record(f"D2_{name}_dense", best["dense"] / best["hard"], "ratio",
               f"{name}: dense cached epoch / hard-label epoch (goal <= 1.10)")  # fmt: skip
        record(
            f"D2_{name}_topk",
            best["topk"] / best["hard"],
            "ratio",
            f"{name}: top-{config.top_k} cached epoch / hard-label epoch (goal <= 1.10)",
        )
        record(f"D3_{name}", best["online"] / best["dense"], "ratio",
               f"{name}: online epoch / dense cached epoch (goal >= 1.5)")  # fmt: skip
    table = pd.DataFrame(results)
    table.attrs["threads"] = torch.get_num_threads()
    return table


def detect_bench_report(
    config: DetectBenchConfig, markdown_path: Path | None, csv_path: Path | None,
    section: str = "bench-detect-cpu", log: Callable[[str], None] = print,
) -> pd.DataFrame:  # fmt: skip
    """Run the benchmark, then write its CSV and its section of ``markdown_path``."""
    guard_tables(csv_path, markdown_path, overwrite=config.overwrite)  # before the work
    table = run_detect_bench(config, log)
    publish_measured(
        table,
        command=config.command(markdown_path, csv_path),
        setting=f"students {', '.join(config.students)} on the train split of {config.data}, "
        f"{config.views} views per image, batch {config.batch_size}, {config.device}, "
        f"{table.attrs['threads']} torch thread(s); {config.epochs} epochs per run (the first "
        f"not timed), every arm run {config.repeats} times, alternated, the fastest epoch "
        "counted.",
        csv_path=csv_path,
        markdown_path=markdown_path,
        section=section,
    )
    return table
