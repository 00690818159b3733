"""The commands that inspect, measure and publish: evaluate, tune-bias, report, storage,
verify, caches, lineage, bench."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import click
from kdpipe.base.flags import DETECT_HEADS
from kdpipe.cli.base import (
    ALPHA,
    CONTEXT,
    DEVICE_OPTION,
    POSITIVE,
    PRECISION_OPTION,
    TEMPERATURE,
    WORKERS_OPTION,
    data_options,
    echo,
    load_data,
    main,
    parse_classes,
    parse_sizes,
    reports_errors,
    table_options,
)


@main.command("evaluate", context_settings=CONTEXT)
@click.argument("run_dir", type=click.Path())
@data_options
@click.option(
    "--split",
    type=click.Choice(["train", "val", "test"]),
    default="test",
    help="The split to score (val: detection data YAMLs).",
)
@click.option(
    "--teacher",
    "teachers",
    multiple=True,
    type=click.Path(),
    help="Teacher run directory or SOURCE (repeat for an ensemble), for agreement.",
)
@click.option(
    "--cache",
    type=click.Path(),
    default=None,
    help="A cache of the same split, for agreement with its teacher.",
)
@click.option(
    "--per-class",
    is_flag=True,
    help="Also each class's accuracy, columns class_<i>_accuracy (i: the class id).",
)
@click.option(
    "--head",
    type=click.Choice(DETECT_HEADS),
    default=DETECT_HEADS[0],
    show_default=True,
    help="Detection: the head scored. A YOLO26 has both: one2many with NMS (Ultralytics' "
    "default), or one2one, NMS-free, as such a model is deployed.",
)
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table")
@click.option(
    "--output",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write the report to this file instead of the screen.",
)
@click.option("--overwrite", is_flag=True, help="Replace an --output that kdpipe evaluate wrote.")
@DEVICE_OPTION
@reports_errors
def evaluate_command(
    run_dir: str,
    data: str,
    data_root: str,
    image_size: int | None,
    channels: str | None,
    resize: str | None,
    split: str,
    teachers: tuple[str, ...],
    cache: str | None,
    per_class: bool,
    head: str,
    fmt: str,
    output: str | None,
    overwrite: bool,
    device: str,
) -> None:
    """Accuracy, agreement with the teacher, calibration (ECE), size and CPU speed of a run.

    RUN_DIR may also be an exported .onnx file: it then runs on ONNX Runtime's CPU
    provider with the file's own preprocessing (--device does not apply).

    A detection run (or its .onnx), with --data DATA.yaml: mAP50-95 and mAP50 on the split
    in view 0 by Ultralytics' validator machinery, size and batch-1 CPU latency.
    """
    from kdpipe.tasks.detect.evaluate import evaluate_detection, is_detection

    detect = is_detection(run_dir)
    if detect and (teachers or cache or per_class):
        raise click.UsageError("--teacher, --cache and --per-class are for classification runs")
    if not detect and head != "one2many":
        raise click.UsageError("--head is for detection runs")
    if output:
        from kdpipe.base.outputs import EVALUATION, guard_output

        guard_output(output, EVALUATION, overwrite=overwrite, inputs=[run_dir, cache, *teachers],
                     option="--output")  # fmt: skip
    from kdpipe.check.evaluate import evaluate_run
    from kdpipe.check.timing import latency_note
    from kdpipe.tools.publish import render

    card = Path(run_dir) / "model.json"  # a run's data is decoded as it was trained on
    recorded = json.loads(card.read_text()).get("dataset") if card.is_file() else None
    if detect:
        frame = evaluate_detection(run_dir, data, split=split, head=head)
    else:
        dataset = load_data(data, split, data_root, image_size, channels, resize, recorded,
                            run_dir)  # fmt: skip
        frame = evaluate_run(
            Path(run_dir),
            dataset,
            teachers=[Path(t) for t in teachers],
            cache=cache,  # a folder or an fsspec URL
            device=device,
            per_class=per_class,
        )
    text = render(frame, fmt)
    if output:
        Path(output).write_text(text if text.endswith("\n") else text + "\n")
    else:
        click.echo(text)
    note = latency_note(frame.iloc[0].to_dict())
    if note and fmt == "table":  # csv and json carry latency_spread and cpu_load as columns
        click.echo(f"note: {note}")


@main.command("tune-bias", context_settings=CONTEXT)
@click.argument("run_dir", type=click.Path())
@data_options
@click.option(
    "--classes",
    callback=parse_classes,
    required=True,
    help="Comma-separated class ids that get the one bias (e.g. the class a transfer set "
    "left out).",
)
@click.option(
    "--max-bias",
    type=POSITIVE,
    default=10.0,
    help="Search biases from -MAX to +MAX on the validation rows.",
)
@click.option("--step", type=POSITIVE, default=0.1, help="Spacing of the searched biases.")
@DEVICE_OPTION
@reports_errors
def tune_bias_command(
    run_dir: str,
    data: str,
    data_root: str,
    image_size: int | None,
    channels: str | None,
    resize: str | None,
    classes: tuple[int, ...],
    max_bias: float,
    step: float,
    device: str,
) -> None:
    """Choose a logit bias for CLASSES on the run's validation rows; score the test split.

    The run must have been trained with --val-fraction: its held-out rows choose
    the bias, never the test set. Writes RUN_DIR/bias.json.
    """
    from kdpipe.tools.bias import BIAS_FILE, tune_bias

    result = tune_bias(
        Path(run_dir),
        classes,
        load_data(data, "train", data_root, image_size, channels, resize),
        load_data(data, "test", data_root, image_size, channels, resize),
        limit=max_bias,
        step=step,
        device=device,
    )
    before, after = result["test"]["before"], result["test"]["after"]
    click.echo(
        f"bias {result['bias']:+g} for class(es) {', '.join(result['class_names'])} "
        f"(chosen on {result['chosen_on']['rows']} validation rows)\n"
        f"test errors {before['errors']} -> {after['errors']}; those classes right "
        f"{before['class_accuracy']:.4f} -> {after['class_accuracy']:.4f}\n"
        f"wrote {Path(run_dir) / BIAS_FILE}"
    )


@main.command("report", context_settings=CONTEXT)
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path())
@click.option(
    "--baseline",
    default=None,
    help="Group of the student trained from scratch, for the gap-recovery column.",
)
@table_options(
    csv_help="Write one row per run here.",
    section="results",
    overwrite_help="Replace a --csv, --plot or --temperature-plot that kdpipe report wrote.",
)
@click.option(
    "--temperature-plot",
    "plot_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also draw test errors against T per student architecture into this PNG (linked "
    "from the --markdown section).",
)
@click.option(
    "--plot",
    "curves_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also draw the training curves (test errors and each loss term against the epoch, "
    "one line per group, its seeds' range shaded) into this PNG (linked from the --markdown "
    "section).",
)
@click.option(
    "--class-accuracy",
    "evaluations",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A CSV of `kdpipe evaluate RUN --per-class` (repeatable): runs without a tune-bias "
    "result get their accuracy on the tune-bias runs' class (students that saw the class).",
)
@reports_errors
def report_command(
    run_dirs: tuple[str, ...],
    baseline: str | None,
    csv_path: Path | None,
    markdown_path: Path | None,
    section: str,
    plot_path: Path | None,
    curves_path: Path | None,
    evaluations: tuple[Path, ...],
    overwrite: bool,
) -> None:
    """Summarise runs (mean ± std over seeds) from their own metrics.csv and model.json.

    Runs whose directory names differ only by a trailing -s<seed> form one group. A
    cache of a labelled test split is a row too: its teacher's (or ensemble's) result.
    """
    from kdpipe.tools.report import report, to_markdown

    table = report(
        [Path(p) for p in run_dirs],
        baseline=baseline,
        csv_path=csv_path,
        markdown_path=markdown_path,
        section=section,
        plot_path=plot_path,
        curves_path=curves_path,
        evaluations=evaluations,
        overwrite=overwrite,
    )
    click.echo(to_markdown(table))


@main.command("storage", context_settings=CONTEXT)
@click.argument("cache_path", metavar="CACHE", type=click.Path())
@click.option(
    "--top-k",
    "ks",
    callback=parse_sizes,
    help="The K values to measure, comma-separated (default: those of 1,2,3,5 below the "
    "cache's class count).",
)
@table_options(
    csv_help="Write one row per layout here.",
    section="storage",
    overwrite_help="Replace a --csv that kdpipe storage wrote.",
)
@reports_errors
def storage_command(
    cache_path: str,
    ks: tuple[int, ...] | None,
    csv_path: Path | None,
    markdown_path: Path | None,
    section: str,
    overwrite: bool,
) -> None:
    """Bytes per sample-view of a dense cache as float32, float16 and top-k, and what top-k
    loses (mean KL to the reconstruction)."""
    from kdpipe.tools.storage import storage_report, to_markdown

    table = storage_report(
        cache_path,  # a folder or an fsspec URL
        ks,
        csv_path=csv_path,
        markdown_path=markdown_path,
        section=section,
        overwrite=overwrite,
    )
    click.echo(to_markdown(table))


@main.command("verify", context_settings=CONTEXT)
@click.argument("cache_path", metavar="CACHE", type=click.Path())
@functools.partial(data_options, required=False)
@click.option(
    "--recompute",
    type=click.IntRange(min=0),
    default=0,
    help="Re-run the teacher on this many random samples and compare (needs --teacher).",
)
@click.option(
    "--teacher",
    "teachers",
    multiple=True,
    type=click.Path(),
    help="The cache's teacher run directories (or SOURCEs), for --recompute.",
)
@click.option("--seed", type=int, default=0, help="Chooses the samples to recompute.")
@click.option(
    "--rehash",
    is_flag=True,
    help="With --data: read and hash every file of an image folder or shards again, "
    "trusting no digest of their index (which reuses a file's digest while its size and "
    "modification time hold).",
)
@DEVICE_OPTION
@reports_errors
def verify_command(
    cache_path: str,
    data: str | None,
    data_root: str,
    image_size: int | None,
    channels: str | None,
    resize: str | None,
    recompute: int,
    teachers: tuple[str, ...],
    seed: int,
    rehash: bool,
    device: str,
) -> None:
    """Check a cache: manifest, completion, every chunk's checksum and values, labels.

    With --data, also the dataset's fingerprint and labels (the cache's split is used).
    The fingerprint of a folder or shards comes from their index, quick to reopen but
    blind to a file edited with its size and modification time kept; --rehash reads
    every file again and names those that changed.
    A detection cache: its values, ground truth and, with --data DATA.yaml, the images'
    and labels' fingerprint; --recompute renders stored views and runs the teacher again.
    Exits with status 1, naming the chunk or sample at fault, when a check fails.
    """
    from kdpipe.check.verify import verify_cache
    from kdpipe.data.yolo import is_data_yaml

    dataset = None
    if data is not None and is_data_yaml(data):
        dataset = data  # a detection set: verify reads the split its cache names
    elif data is not None:
        recorded = _cache_dataset(cache_path)  # its split, decoded as the cache's data was
        dataset = load_data(data, recorded["split"], data_root, image_size, channels, resize,
                            recorded, cache_path)  # fmt: skip
    report = verify_cache(
        cache_path,  # a folder or an fsspec URL
        dataset=dataset,
        recompute=recompute,
        teachers=[Path(t) for t in teachers],
        device=device,
        seed=seed,
        rehash=rehash,
    )
    click.echo(report.frame().to_string(index=False))
    if not report.ok:
        raise click.ClickException(
            f"{cache_path} failed verification: " + "; ".join(report.failures())
        )


def _cache_dataset(path: str) -> dict:
    """The dataset record of a cache, so --data loads the same split, decoded the same way."""
    from kdpipe.cache import read_manifest

    return read_manifest(path).dataset


@main.command("caches", context_settings=CONTEXT)
@click.argument("paths", nargs=-1, type=click.Path())
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table")
@reports_errors
def caches_command(paths: tuple[str, ...], fmt: str) -> None:
    """List the kdpipe caches under PATHS (default: the current folder) and what made each.

    A PATH may be a folder or an fsspec URL (file://, s3://, gs://...)."""
    from kdpipe.check.catalog import catalog, unreachable
    from kdpipe.tools.publish import render_rows

    for path in paths:
        problem = unreachable(path)
        if problem is not None:
            raise click.BadParameter(problem, param_hint="PATHS")
    frame = catalog(paths or ["."])
    if frame.empty:
        click.echo("no kdpipe caches found", err=True)
        return
    click.echo(render_rows(frame, fmt))


@main.command("lineage", context_settings=CONTEXT)
@click.argument("run_dir", type=click.Path())
@click.option("--data-root", default="data", type=click.Path(file_okay=False))
@click.option(
    "--image-size",
    type=click.IntRange(min=1),
    default=None,
    help="Image folders: the size the cache was made with, if not the images' own.",
)
@click.option(
    "--channels",
    type=click.Choice(["1", "3"]),
    default=None,
    help="Image folders: the channels the cache was made with, if not the images'.",
)
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table")
@reports_errors
def lineage_command(
    run_dir: str, data_root: str, image_size: int | None, channels: str | None, fmt: str
) -> None:
    """The chain run -> cache -> teacher(s) -> ... -> dataset, back to the first teacher.

    RUN_DIR may also be an exported .onnx file: the chain then starts at the file.

    Hashes are recomputed wherever the files are present; links whose files are gone are
    taken from the manifests' records; exits with status 1 when a file is present but
    does not match its record (MISMATCH).
    """
    from kdpipe.check.catalog import lineage
    from kdpipe.tools.publish import render_rows

    frame = lineage(
        Path(run_dir),
        data_root=Path(data_root),
        image_size=image_size,
        channels=int(channels) if channels else None,
    )
    click.echo(render_rows(frame, fmt))
    if (frame["status"] == "MISMATCH").any():
        raise click.ClickException(f"{run_dir}: a link of its lineage does not match its record")


@main.command("bench", context_settings=CONTEXT)
@click.option(
    "--out",
    type=click.Path(),
    required=True,
    help="Work folder to create (--overwrite replaces one this command made).",
)
@click.option("--data", default="fashion-mnist", help="Dataset to time on.")
@click.option("--data-root", type=click.Path(), default="data")
@click.option(
    "--fraction",
    type=click.FloatRange(0, 1, min_open=True),
    default=1 / 6,
    help="Share of the training split used as the transfer set.",
)
@click.option("--teacher", default="resnet18", help="Teacher architecture (timm).")
@click.option("--student", default="kd_cnn", help="Student architecture (timm).")
@click.option("--batch-size", type=click.IntRange(min=1), default=256)
@click.option(
    "--epochs",
    type=click.IntRange(min=3),
    default=6,
    help="Epochs per student run; the first (warm-up) and the last (evaluated) are not timed.",
)
@click.option("--chunk-size", type=click.IntRange(min=1), default=4096)
@click.option(
    "--repeats",
    type=click.IntRange(min=1),
    default=2,
    help="Rounds of every timed arm, alternated; the fastest counts (the machine is noisy).",
)
@DEVICE_OPTION
@PRECISION_OPTION
@WORKERS_OPTION
@table_options(
    csv_help="Write the rows here.",
    section=None,
    section_help="Name of the section's markers  [default: bench-<device>]",
    overwrite_help="Replace an --out work folder and a --csv that kdpipe bench wrote.",
)
@reports_errors
def bench_command(
    markdown_path: Path | None, csv_path: Path | None, section: str | None, **options: Any
) -> None:
    """Time the pipeline: P1-P5 of docs/benchmarks.md, as ratios measured side by side.

    P1 teacher pass / bare teacher loop; P2 cached student epoch / hard-label
    epoch; P3 online distillation epoch / cached epoch; P4 soft-label read rate
    (memory, streamed) / student training rate; P5 bytes per sample-view and the
    cost of S students offline against online.
    """
    from kdpipe.tools.bench import BenchConfig, bench_report

    bench_report(BenchConfig(**options), markdown_path, csv_path, section=section, log=echo)


@main.command("jpeg-folder", context_settings=CONTEXT)
@click.option("--dest", type=click.Path(), required=True, help="The folder to write.")
@click.option(
    "--train-count", type=click.IntRange(min=1), default=50000, help="First N training images."
)
@click.option(
    "--test-count", type=click.IntRange(min=1), default=10000, help="First N test images."
)
@click.option("--data-root", type=click.Path(), default="data", help="Holds fashion-mnist/.")
@click.option("--seed", type=int, default=0, help="Seeds every image's colours and size.")
@click.option("--quality", type=click.IntRange(1, 95), default=90, help="JPEG quality.")
@click.option("--workers", type=click.IntRange(min=1), default=2, help="Writing processes.")
@click.option("--overwrite", is_flag=True, help="Replace a --dest that jpeg-folder built.")
@reports_errors
def jpeg_folder_command(
    dest: str, train_count: int, test_count: int, data_root: str, seed: int, quality: int,
    workers: int, overwrite: bool,
) -> None:  # fmt: skip
    """Build an image folder of RGB JPEGs (140-200 px) from Fashion-MNIST, bit-identically.

    Image i of a split: its two colours and its side drawn from a generator seeded with
    (seed, split, i), resized with PIL bicubic, saved at a fixed quality; DEST/RECIPE.json
    records the recipe and a digest of every file (pipeline/tools/benchfolder.py).
    """
    from kdpipe.tools.benchfolder import JpegRecipe, build_jpeg_folder

    record = build_jpeg_folder(
        Path(dest), {"train": train_count, "test": test_count}, data_root=Path(data_root),
        recipe=JpegRecipe(seed=seed, quality=quality), workers=workers, overwrite=overwrite,
        log=echo,
    )  # fmt: skip
    click.echo(f"{dest}: {train_count} + {test_count} JPEGs, files {record['files_sha256']}")


@main.command("detect-folder", context_settings=CONTEXT)
@click.option("--dest", type=click.Path(), required=True, help="The folder to write.")
@click.option("--train-count", type=click.IntRange(min=1), default=2000, help="Train canvases.")
@click.option("--val-count", type=click.IntRange(min=1), default=400, help="Val canvases.")
@click.option("--test-count", type=click.IntRange(min=1), default=400, help="Test canvases.")
@click.option("--data-root", type=click.Path(), default="data", help="Holds fashion-mnist/.")
@click.option("--seed", type=int, default=0, help="Seeds every canvas.")
@click.option("--quality", type=click.IntRange(1, 95), default=90, help="JPEG quality.")
@click.option("--overwrite", is_flag=True, help="Replace a detection set kdpipe made at --dest.")
@reports_errors
def detect_folder_command(
    dest: str, train_count: int, val_count: int, test_count: int, data_root: str, seed: int,
    quality: int, overwrite: bool,
) -> None:  # fmt: skip
    """Build a detection set in Ultralytics' YOLO format from Fashion-MNIST, bit-identically.

    1-4 garments per canvas (128-192 px, a coloured, textured background) at random scales
    and positions; DEST/data.yaml names the splits and classes, DEST/RECIPE.json records
    the recipe and a digest of every file (pipeline/data/detectfolder.py).
    """
    from kdpipe.data.detectfolder import DetectRecipe, build_detect_folder

    counts = {"train": train_count, "val": val_count, "test": test_count}
    record = build_detect_folder(Path(dest), counts, data_root=Path(data_root),
                                 recipe=DetectRecipe(seed=seed, quality=quality),
                                 overwrite=overwrite, log=echo)  # fmt: skip
    click.echo(f"{dest}: {train_count} + {val_count} + {test_count} canvases, files "
               f"{record['files_sha256']}")  # fmt: skip


@main.command("bench-folder", context_settings=CONTEXT)
@click.option(
    "--out",
    type=click.Path(),
    required=True,
    help="Work folder to create (--overwrite replaces one this command made).",
)
@click.option("--folder", type=click.Path(), required=True, help="The large JPEG folder.")
@click.option("--small", type=click.Path(), required=True,
              help="The small folder of the memory comparison.")  # fmt: skip
@click.option(
    "--teacher",
    default=None,
    help="Teacher architecture  [default: resnet10t on the CPU, resnet50 on CUDA]",
)
@click.option("--student", default="kd_cnn", help="Student architecture (timm).")
@click.option(
    "--image-size",
    type=click.IntRange(min=1),
    default=None,
    help="Decode size of every arm  [default: 32 on the CPU, 224 on CUDA]",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=256)
@click.option(
    "--epochs",
    type=click.IntRange(min=3),
    default=3,
    help="Epochs per student run; the first and the last (evaluated) are not timed.",
)
@click.option(
    "--repeats",
    type=click.IntRange(min=1),
    default=2,
    help="Rounds of every arm, alternated; the fastest counts.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=2,
    help="DataLoader processes of every arm, kdpipe's and timm's.",
)
@DEVICE_OPTION
@PRECISION_OPTION
@table_options(
    csv_help="Write the rows here.",
    section=None,
    section_help="Name of the section's markers  [default: bench-folder-<device>]",
    overwrite_help="Replace an --out work folder and a --csv that kdpipe bench-folder wrote.",
)
@reports_errors
def bench_folder_command(
    markdown_path: Path | None, csv_path: Path | None, section: str | None, **options: Any
) -> None:
    """Measure cache-teacher and train-student on a JPEG folder, each arm a subprocess.

    Peak RSS at the small and the large folder; cache-teacher rows/s against timm's own
    loader running the same teacher; a cached epoch against a hard-label epoch.
    """
    from kdpipe.tools.benchfolder import FolderBenchConfig, folder_bench_report

    folder_bench_report(FolderBenchConfig(**options), markdown_path, csv_path,
                        section=section, log=echo)  # fmt: skip


@main.command("bench-detect", context_settings=CONTEXT)
@click.option(
    "--out",
    type=click.Path(),
    required=True,
    help="Work folder to create (--overwrite replaces one this command made).",
)
@click.option("--teacher", type=click.Path(), required=True, help="A detection teacher run.")
@click.option("--data", type=click.Path(), required=True,
              help="A YOLO data YAML; every arm trains on its train split.")  # fmt: skip
@click.option(
    "--students",
    default="yolo11n.yaml",
    help="Comma-separated Ultralytics model YAMLs, each timed in every arm.",
)
@click.option("--views", type=click.IntRange(min=1), default=4, help="Views per image.")
@click.option("--top-k", type=click.IntRange(min=1), default=24,
              help="Anchors per view of the top-K cache.")  # fmt: skip
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16",
              show_default=True, help="The caches' values (cache-teacher --dtype).")  # fmt: skip
@click.option(
    "--epochs",
    type=click.IntRange(min=2),
    default=3,
    help="Epochs per student run; the first (warm-up) is not timed.",
)
@click.option(
    "--repeats",
    type=click.IntRange(min=1),
    default=2,
    help="Rounds of every arm, alternated; the fastest epoch counts (the machine is noisy).",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=16)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="cpu")
@table_options(
    csv_help="Write the rows here.",
    section="bench-detect-cpu",
    overwrite_help="Replace an --out work folder and a --csv that kdpipe bench-detect wrote.",
)
@reports_errors
def bench_detect_command(
    markdown_path: Path | None, csv_path: Path | None, section: str, students: str,
    **options: Any,
) -> None:  # fmt: skip
    """Time a detection student's epoch in every arm, side by side in one process.

    D1 the teacher pass, dense and top-K, and bytes per view; D2 a cached epoch
    (dense, top-K) / a hard-label epoch; D3 an online epoch / a dense cached epoch
    (the detect extra).
    """
    from kdpipe.tasks.detect.bench import DetectBenchConfig, detect_bench_report

    names = tuple(name.strip() for name in students.split(",") if name.strip())
    detect_bench_report(DetectBenchConfig(students=names, **options), markdown_path,
                        csv_path, section=section, log=echo)  # fmt: skip


@main.command("export", context_settings=CONTEXT)
@click.argument("run_dir", type=click.Path())
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False),
    help="The .onnx file to write (one file, the weights inside it).",
)
@click.option(
    "--int8",
    is_flag=True,
    help="Static int8 quantization by ONNX Runtime (QDQ, per-channel int8 weights, uint8 "
    "activations), calibrated on rows of the training split.",
)
@click.option(
    "--calibration-rows",
    type=click.IntRange(min=1),
    default=512,
    help="--int8: transfer rows (in their stored views) that set the activation ranges.",
)
@click.option(
    "--calibration-method",
    type=click.Choice(["minmax", "entropy", "percentile"]),
    default="minmax",
    help="--int8: how ONNX Runtime turns the calibration activations into ranges.",
)
@click.option(
    "--calibration-cache",
    default=None,
    help="--int8: a cache of the training split whose rows calibrate "
    "[default: the cache the run learned from].",
)
@click.option(
    "--check-rows",
    type=click.IntRange(min=1),
    default=256,
    help="Test rows on which ONNX Runtime's logits are compared with PyTorch's.",
)
@click.option(
    "--tolerance",
    type=POSITIVE,
    default=None,
    help="Largest logit difference allowed against PyTorch float32 "
    "[default: 1e-3 for float32, 2 for --int8].",
)
@click.option("--seed", type=int, default=0, help="Draws the calibration rows.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@functools.partial(data_options, required=False)
@reports_errors
def export_command(
    run_dir: str, out: str, data: str | None, channels: str | None, **options: Any
) -> None:
    """Export a finished run to ONNX (dynamic batch), checked against PyTorch on test rows.

    The file's metadata records the preprocessing, the class names, the weights hash
    and the lineage (run, cache, teacher). --data defaults to the run's dataset.

    A detection run: its decoded head output before NMS, --int8 calibrated on images of the
    data YAML's train split in view 0 (kdpipe.tasks.detect.export).
    """
    from kdpipe.export import export_run
    from kdpipe.tasks.detect.evaluate import is_detection

    if is_detection(run_dir):
        from kdpipe.tasks.detect.export import export_detection

        done = export_detection(run_dir, out, data=data, int8=options["int8"],
                                calibration_rows=options["calibration_rows"],
                                calibration_method=options["calibration_method"],
                                check_rows=options["check_rows"], seed=options["seed"],
                                overwrite=options["overwrite"])  # fmt: skip
        check = done.record["check"]
        click.echo(f"wrote {done.path}: {done.record['format']}, {done.size_bytes / 1024:.1f} "
                   f"KiB; ONNX Runtime against {check['against']} on {check['rows']} "
                   f"{check['split']} images: largest difference "
                   f"{check['max_abs_difference']:.3g}")  # fmt: skip
        return

    result = export_run(
        Path(run_dir),
        Path(out),
        data=data,
        channels=int(channels) if channels else None,
        data_root=Path(options.pop("data_root")),
        **options,
    )
    check = result.card.check
    lines = [
        f"wrote {result.path}: {result.card.format}, {result.size_bytes / 1024:.1f} KiB"
        + (
            f" ({result.fp32_size_bytes / result.size_bytes:.2f}x smaller than float32)"
            if result.card.format != "fp32"
            else ""
        ),
        f"ONNX Runtime against {check['against']} on {check['rows']} test rows: largest logit "
        f"difference {check['max_abs_logit_difference']:.3g}, top-1 agreement "
        f"{check['top1_agreement']:.4f}",
    ]
    if result.card.quantization:
        calibration = result.card.quantization["calibration"]
        lines.append(
            f"calibrated ({result.card.quantization['calibration_method']}) on "
            f"{calibration['rows']} rows of {calibration['dataset']} {calibration['split']} "
            f"from cache {calibration['cache_id']}"
        )
    click.echo("\n".join(lines))


@main.command("qat", context_settings=CONTEXT)
@click.argument("run_dir", metavar="FP32_RUN", type=click.Path())
@click.option("--cache", required=True, help="The cache of soft labels to fine-tune against.")
@click.option("--out", required=True, type=click.Path(), help="Run directory to create.")
@click.option("--epochs", type=click.IntRange(min=1), default=3, help="Fine-tuning epochs.")
@click.option("--lr", type=POSITIVE, default=0.005, help="Peak learning rate (cosine).")
@click.option("--batch-size", type=click.IntRange(min=1), default=128)
@click.option(
    "--alpha",
    **ALPHA,
    default=None,
    help="Weight of the hard-label term [default: the float32 run's].",
)
@click.option(
    "--temperature",
    **TEMPERATURE,
    default=None,
    help="Soft-label temperature [default: the float32 run's].",
)
@click.option("--seed", type=int, default=0)
@click.option(
    "--eval-every",
    type=click.IntRange(min=1),
    default=1,
    help="Score the fake-quantized model on the test split every N epochs.",
)
@click.option(
    "--check-rows",
    type=click.IntRange(min=1),
    default=256,
    help="Test rows on which the int8 ONNX file is compared with the converted model.",
)
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@data_options
@reports_errors
def qat_command(run_dir: str, channels: str | None, **options: Any) -> None:
    """Quantization-aware distillation: fine-tune FP32_RUN with fake-quantized weights and
    activations against the cache's soft labels (the teacher is not loaded).

    Writes a run directory (kind qat-student) with OUT/model.int8.onnx, the int8 model
    converted from the ranges learned in training (torchao PT2E, X86InductorQuantizer).
    """
    from kdpipe.export import INT8_FILE, QatConfig, qat_distill

    config = QatConfig(run=run_dir, channels=int(channels) if channels else None, **options)
    card = qat_distill(config, log=echo)
    click.echo(
        f"qat-student {card.architecture} from {run_dir} (cache {card.lineage['cache_id']}); "
        f"int8 model {Path(config.out) / INT8_FILE}"
    )
