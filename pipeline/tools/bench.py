"""``kdpipe bench``: what the offline pipeline costs, as ratios measured side by side.

Every figure comes from one process on one machine, measured in the order
listed, so that the ratios compare runs under the same load:

- P1 the teacher pass (``cache_teacher``, writing the store) / a bare inference
  loop of the same teacher over the same rows, batch size and precision;
- P2 a student epoch from the cache / the same student's hard-label epoch;
- P3 an online distillation epoch (timm's ``LogitDistillationTask``) / the
  cached epoch, beside the ideal (teacher forward + student step) / student step;
- P4 how fast batches of soft labels are read, from memory and streamed from
  disk (shuffled windows of chunks), as a multiple of the student's rows/s;
- P5 bytes per sample-view of each storage layout, and the cost of S students
  of E epochs offline (one teacher pass) against online;
- P6 each command that reads records (``caches``, ``verify``, ``lineage``, ``report``,
  ``storage``; ``--help`` for reference) in a fresh interpreter: seconds from start to
  exit and peak memory, and whether it imported a deep-learning library.

The teacher's weights are whatever one short epoch gives: timing needs its
architecture, not its accuracy.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from kdpipe.base.distributed import SINGLE
from kdpipe.base.errors import UsageError
from kdpipe.base.flags import flag
from kdpipe.base.outputs import BENCH_CSV, BENCH_WORK, MARKDOWN, guard_output, mark_folder
from kdpipe.base.runtime import resolve_device
from kdpipe.cache import (
    Manifest,
    StreamedSoftLabels,
    decoded_bytes,
    load_soft_labels,
    read_manifest,
    smallest_budget,
)
from kdpipe.data.datasets import ImageSet, load_dataset, select_rows
from kdpipe.models.runs import load_model, read_config
from kdpipe.models.teach import CacheConfig, cache_teacher
from kdpipe.models.teacher import predict_logits
from kdpipe.tools.storage import storage_table
from kdpipe.train import (
    EpochBatches,
    TrainConfig,
    TrainData,
    distill_online,
    train_student,
)
from kdpipe.train import train_teacher as train_model
from kdpipe.views.inputs import resolve_precision


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    out: str  # a work folder, made here (replaced with overwrite when bench made it)
    data: str = "fashion-mnist"
    data_root: str = "data"
    fraction: float = 1 / 6  # of the training split: the transfer set
    teacher: str = "resnet18"
    student: str = "kd_cnn"
    batch_size: int = 256
    epochs: int = 6  # per student run; the first and the last (evaluated) are not timed
    chunk_size: int = 4096  # cache-teacher's default
    repeats: int = 2  # rounds of every timed arm, alternated; the fastest counts
    device: str = "auto"
    precision: str = "auto"
    workers: int = 0
    students: tuple[int, ...] = (1, 4, 16)
    student_epochs: int = 30  # E in P5's cost of S students x E epochs
    top_k: tuple[int, ...] = (1, 2, 3, 5)
    overwrite: bool = False  # replace an --out (and a --csv) that bench wrote

    def command(self, markdown: Path | None, csv_path: Path | None) -> str:
        """The kdpipe bench command line for this configuration (defaults left out)."""
        parts = ["kdpipe bench", f"--out {self.out}"]
        for item in fields(self):
            value = getattr(self, item.name)
            if item.name in ("out", "students", "student_epochs", "top_k", "overwrite"):
                continue
            if value != item.default:
                parts.append(f"{flag(item.name)} {value}")
        parts += [f"--markdown {markdown}"] if markdown else []
        parts += [f"--csv {csv_path}"] if csv_path else []
        return " ".join(parts)

    def validate(self) -> None:
        if not 0 < self.fraction <= 1:
            raise UsageError(f"--fraction must be in (0, 1], not {self.fraction}")
        if self.epochs < 3:
            raise UsageError(f"--epochs must be >= 3 (one warm-up, one timed, one evaluated), "
                             f"not {self.epochs}")  # fmt: skip
        if self.repeats < 1:
            raise UsageError(f"--repeats must be >= 1, not {self.repeats}")


def _timed(step: Callable[[], object]) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - started


def _epoch_seconds(run_dir: Path) -> list[float]:
    """Seconds of the epochs between the first (warm-up) and the last (evaluated)."""
    rows = pd.read_csv(run_dir / "metrics.csv")
    return [float(v) for v in rows["seconds"].iloc[1:-1]]


@dataclass
class _Bench:
    """What every section of the bench shares: the settings, the rows, the teacher and the
    cache it made, and the results recorded so far."""

    config: BenchConfig
    log: Callable[[str], None]
    out: Path
    device: torch.device
    precision: str
    train_set: ImageSet
    rows: np.ndarray
    common: dict  # training settings every run shares
    results: list[dict]

    @property
    def teacher_dir(self) -> Path:
        return self.out / "teacher"

    @property
    def cache_path(self) -> Path:
        return self.out / "cache.zarr"

    def record(self, name: str, value: float, unit: str, what: str) -> None:
        self.results.append({"name": name, "value": value, "unit": unit, "what": what})
        self.log(f"{name}: {value:.4g} {unit}  ({what})")


def run_bench(config: BenchConfig, log: Callable[[str], None] = print) -> pd.DataFrame:
    """Run P1-P5; one row per measured quantity (name, value, unit, what it is)."""
    config.validate()
    device = resolve_device(config.device)
    data_folder = config.data if Path(config.data).is_dir() else config.data_root
    train_set = load_dataset(config.data, "train", data_root=Path(config.data_root))
    guard_output(config.out, BENCH_WORK, overwrite=config.overwrite, inputs=[data_folder])
    Path(config.out).mkdir(parents=True, exist_ok=True)  # absent, or an empty folder
    mark_folder(Path(config.out), "bench")
    bench = _Bench(
        config=config, log=log, out=Path(config.out), device=device,
        precision=resolve_precision(device, config.precision), train_set=train_set,
        rows=select_rows(train_set.labels, subset=config.fraction,
                         num_classes=train_set.num_classes, seed=0),
        common={"data": config.data, "data_root": config.data_root, "device": config.device,
                "precision": config.precision, "batch_size": config.batch_size,
                "workers": config.workers, "overwrite": True},
        results=[],
    )  # fmt: skip
    log(f"bench: {len(bench.rows)} rows of {config.data} train, teacher {config.teacher}, "
        f"student {config.student}, batch {config.batch_size}, {device}, "
        f"{bench.precision}")  # fmt: skip
    train_model(TrainConfig(model=config.teacher, out=str(bench.teacher_dir), epochs=1,
                            subset=min(config.fraction, 0.05), **bench.common))  # fmt: skip
    teacher_pass, bare = _teacher_pass(bench)
    cached, online = _student_epochs(bench, bare)
    _soft_label_reads(bench, cached)
    _storage_and_cost(bench, teacher_pass, cached, online)
    _command_costs(bench)
    table = pd.DataFrame(bench.results)
    table.attrs.update(
        {"config": asdict(config), "rows": len(bench.rows), "device": str(device),
         "precision": bench.precision, "teacher_config": read_config(bench.teacher_dir)}
    )  # fmt: skip
    return table


def _teacher_pass(bench: _Bench) -> tuple[float, float]:
    """P1: the teacher pass against a bare inference loop (batches in, logits out to the
    host, nothing else), alternated, fastest of each: (teacher pass, bare loop) seconds."""
    config = bench.config
    teacher, card = load_model(bench.teacher_dir, bench.device)
    # the rows by index, never gathered whole: an image folder's (or shards') are decoded
    # batch by batch, ahead in its DataLoader workers (teacher.predict_logits, batches_of)
    images = bench.train_set.with_workers(config.workers).images

    def bare(rows: np.ndarray) -> None:
        predict_logits(teacher, images, card.data, device=bench.device, rows=rows,
                       batch_size=config.batch_size, precision=config.precision)  # fmt: skip

    bare(bench.rows[: config.batch_size * 2])  # warm-up
    cache_config = CacheConfig(
        teachers=(str(bench.teacher_dir),), out=str(bench.cache_path), temperature=4.0,
        batch_size=config.batch_size, chunk_size=config.chunk_size, device=config.device,
        precision=config.precision, overwrite=True, subset=config.fraction,
    )  # fmt: skip
    dataset = bench.train_set.with_workers(config.workers)  # as the CLI's cache-teacher
    bare_times, pass_times = [], []
    for _ in range(config.repeats):
        bare_times.append(_timed(lambda: bare(bench.rows)))
        pass_times.append(_timed(lambda: cache_teacher(cache_config, dataset, log=lambda _: None)))
    teacher_pass, bare_best = min(pass_times), min(bare_times)
    bench.record("teacher_pass_s", teacher_pass, "s", "cache-teacher, writing the store "
                 f"(fastest of {config.repeats})")  # fmt: skip
    bench.record("bare_teacher_s", bare_best, "s",
                 f"bare inference loop (fastest of {config.repeats})")  # fmt: skip
    bench.record("P1", teacher_pass / bare_best, "ratio",
                 "teacher pass / bare loop (target <= 1.05)")  # fmt: skip
    return teacher_pass, bare_best


def _student_epochs(bench: _Bench, bare: float) -> tuple[float, float]:
    """P2, P3: one student from the cache, on hard labels, and online; same rows and
    epochs, the runs alternated, each epoch time the fastest of its timed epochs:
    (cached, online) epoch seconds."""
    config, cache_path = bench.config, bench.cache_path
    student = {"model": config.student, **bench.common,
               "epochs": config.epochs, "eval_every": config.epochs}  # fmt: skip
    manifest = read_manifest(cache_path)
    budget = _stream_budget(manifest)
    arms = {
        "cached": lambda out: train_student(
            TrainConfig(out=out, cache=str(cache_path), alpha=0.5, **student)
        ),
        # the same, streamed from disk (when the budget is below the cache's size)
        "streamed": lambda out: train_student(
            TrainConfig(out=out, cache=str(cache_path), alpha=0.5, cache_memory=budget, **student)
        ),
        "hard": lambda out: train_model(
            TrainConfig(out=out, subset=config.fraction, subset_seed=0, **student)
        ),
        "online": lambda out: distill_online(
            TrainConfig(out=out, teacher=str(bench.teacher_dir), alpha=0.5, temperature=4.0,
                        subset=config.fraction, subset_seed=0, **student)
        ),
    }  # fmt: skip
    if budget >= decoded_bytes(manifest):
        del arms["streamed"]  # a cache this small is read whole whatever the budget
    epoch_times: dict[str, list[float]] = {name: [] for name in arms}
    for round_index in range(config.repeats):
        for name, run in arms.items():
            run_dir = bench.out / f"{name}-{round_index}"
            run(str(run_dir))
            epoch_times[name] += _epoch_seconds(run_dir)
    cached, hard, online = (min(epoch_times[name]) for name in ("cached", "hard", "online"))
    record = bench.record
    record("cached_epoch_s", cached, "s", f"student epoch from the cache (fastest of "
           f"{len(epoch_times['hard'])})")  # fmt: skip
    record("hard_epoch_s", hard, "s", "the same student on hard labels")
    record("online_epoch_s", online, "s", "online distillation epoch (LogitDistillationTask)")
    record("P2", cached / hard, "ratio", "cached epoch / hard-label epoch (target <= 1.05)")
    if "streamed" in arms:
        record("P4_train_streamed", min(epoch_times["streamed"]) / cached, "ratio",
               "cached epoch streamed from disk (--cache-memory a quarter of the cache) / "
               "read from memory")  # fmt: skip
    record("P3", online / cached, "ratio", "online epoch / cached epoch")
    # the teacher's forward over one epoch's rows is the bare loop, at the same batch size
    record("P3_ideal", (bare + hard) / hard, "ratio",
           "(teacher forward + student step) / student step")  # fmt: skip
    return cached, online


def _stream_budget(manifest: Manifest) -> int:
    """The --cache-memory of the streamed arms: a quarter of the cache at most."""
    return max(decoded_bytes(manifest) // 4, smallest_budget(manifest))


def _soft_label_reads(bench: _Bench, cached: float) -> None:
    """P4: reading batches of soft labels (with their images), in memory and streamed,
    against the student's training rate."""
    student_rate = len(bench.rows) / cached
    soft = load_soft_labels(bench.cache_path)
    budget = _stream_budget(soft.manifest)
    train_set = bench.train_set
    for label, opened in (
        ("memory", soft),
        ("streamed", StreamedSoftLabels(bench.cache_path, budget)),  # even if it would fit
    ):
        data = TrainData.cached(train_set, opened, opened.log_probs())
        order = data.epoch_order(torch.Generator().manual_seed(0), seed=0, epoch=1)
        batches = EpochBatches(data, order, bench.config.batch_size, 1, 0, SINGLE)
        seconds = _timed(lambda b=batches: [None for _ in b.load(workers=0, pin_memory=False)])
        bench.record(f"P4_{label}", len(bench.rows) / seconds / student_rate, "x",
                     f"rows/s reading soft labels {label} / the student's training rows/s "
                     "(target >= 20)")  # fmt: skip


def _storage_and_cost(bench: _Bench, teacher_pass: float, cached: float, online: float) -> None:
    """P5: bytes per sample-view of each layout, and S students x E epochs offline
    against online."""
    config = bench.config
    num_classes = read_manifest(bench.cache_path).num_classes
    ks = [k for k in config.top_k if k < num_classes]
    for _, layout in storage_table(bench.cache_path, ks).iterrows():
        bench.record(f"P5_bytes_{layout['storage'].replace(' ', '_')}",
                     layout["stored_bytes_per_view"], "bytes", f"{layout['storage']} per "
                     f"sample-view, stored; raw {layout['raw_bytes_per_view']:.0f}")  # fmt: skip
    epochs = config.student_epochs
    for count in config.students:
        offline = teacher_pass + count * epochs * cached
        online_cost = count * epochs * online
        bench.record(f"P5_cost_S{count}", online_cost / offline, "ratio",
                     f"online / offline for {count} student(s) x {epochs} epochs "
                     f"({online_cost:.0f} s / {offline:.0f} s)")  # fmt: skip


def _command_costs(bench: _Bench) -> None:
    """P6: start-up time and peak memory of each command that only reads records, on the
    bench's own cache and student, each in a fresh interpreter."""
    from kdpipe.tools.benchfolder import command_cost

    cache, student = str(bench.cache_path), str(bench.out / "cached-0")
    commands = {
        "help": ["--help"],
        "caches": ["caches", cache],
        "verify": ["verify", cache],
        "lineage": ["lineage", student],
        "report": ["report", student],
        "storage": ["storage", cache, "--top-k", "1"],
    }
    for name, args in commands.items():
        cost = command_cost(args, bench.out / "commands")
        imported = ", ".join(cost["imports"]) or "no deep-learning library"
        bench.record(f"P6_{name}_s", cost["seconds"], "s",
                     f"kdpipe {' '.join(args[:1])}: start to exit, fresh interpreter "
                     f"(imported {imported})")  # fmt: skip
        bench.record(f"P6_{name}_peak_mib", cost["peak_rss_mib"], "MiB",
                     f"kdpipe {' '.join(args[:1])}: peak RSS")  # fmt: skip


def bench_report(
    config: BenchConfig, markdown_path: Path | None, csv_path: Path | None,
    section: str | None = None, log: Callable[[str], None] = print,
) -> pd.DataFrame:  # fmt: skip
    """Run the benchmark, then write its CSV and its section of ``markdown_path``."""
    guard_tables(csv_path, markdown_path, overwrite=config.overwrite)  # before the hour's work
    table = run_bench(config, log)
    attrs = table.attrs
    publish_measured(
        table,
        command=config.command(markdown_path, csv_path),
        setting=f"{attrs['rows']} rows of {config.data} train, teacher {config.teacher}, "
        f"student {config.student}, batch {config.batch_size}, {attrs['device']}, "
        f"{attrs['precision']}, {config.epochs} epochs per student run (the first and the "
        "evaluated last are not timed), every timed arm run "
        f"{config.repeats} times, alternated, the fastest counted.",
        csv_path=csv_path,
        markdown_path=markdown_path,
        section=section or f"bench-{torch.device(attrs['device']).type}",
    )
    return table


def guard_tables(csv_path: Path | None, markdown_path: Path | None, *, overwrite: bool) -> None:
    """The --csv and --markdown of a benchmark, checked before anything is measured."""
    if csv_path is not None:
        guard_output(csv_path, BENCH_CSV, overwrite=overwrite, option="--csv")
    if markdown_path is not None:
        guard_output(markdown_path, MARKDOWN, overwrite=overwrite, option="--markdown")


def publish_measured(
    table: pd.DataFrame, *, command: str, setting: str, csv_path: Path | None,
    markdown_path: Path | None, section: str,
) -> None:  # fmt: skip
    """A measured table (name, value, unit, what) as CSV, and as a Markdown section: the
    command and date that made it and its setting, the machine, the values to 3 figures.
    Shared by ``kdpipe bench`` and ``kdpipe bench-folder``."""
    from kdpipe.tools.publish import machine_line, publish

    shown = table.assign(value=table["value"].map(lambda v: f"{v:.3g}"))
    publish(
        table,
        csv_path=csv_path,
        markdown_path=markdown_path,
        section=section,
        text=lambda: "\n".join([
            f"Generated by `{command}` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC: {setting}",
            f"Machine: {machine_line()}.",
            "",
            shown.to_markdown(index=False),
        ]),
    )  # fmt: skip
