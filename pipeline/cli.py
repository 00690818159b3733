"""The ``kdpipe`` command line: parse options, call one library function, report errors.

Only this module imports click. Library errors (:class:`KdpipeError`) become
one-line click errors with a non-zero exit; option values click can check
itself (ranges, choices) are rejected by click with exit status 2.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from pipeline import __version__
from pipeline.errors import KdpipeError

# a fixed width keeps --help identical on every terminal, so docs/cli.md can quote it
CONTEXT = {
    "help_option_names": ["-h", "--help"],
    "show_default": True,
    "terminal_width": 100,
    "max_content_width": 100,
}
POSITIVE = click.FloatRange(min=0, min_open=True)


def reports_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn kdpipe's own errors into ``Error: <message>`` and exit status 1."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except KdpipeError as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper


def parse_sizes(_ctx: click.Context, _param: click.Parameter, value: str | None) -> tuple | None:
    if value is None:
        return None
    try:
        sizes = tuple(int(part) for part in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers") from None
    if not sizes or min(sizes) < 1:
        raise click.BadParameter(f"{value!r}: every hidden size must be >= 1")
    return sizes


UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_bytes(_ctx: click.Context, _param: click.Parameter, value: str | None) -> int | None:
    """``1048576``, ``512K``, ``64M``, ``2G`` (binary units; a trailing B or iB is allowed)."""
    if value is None:
        return None
    text = value.strip().upper().removesuffix("B").removesuffix("I")
    number, unit = (text[:-1], text[-1]) if text[-1:] in UNITS else (text, "")
    try:
        size = int(float(number) * UNITS[unit])
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a size such as 512M or 2G") from None
    if size <= 0:
        raise click.BadParameter(f"{value!r}: the budget must be more than 0 bytes")
    return size


def parse_classes(_ctx: click.Context, _param: click.Parameter, value: str | None) -> tuple:
    if not value:
        return ()
    try:
        return tuple(sorted({int(part) for part in value.split(",")}))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of class ids") from None


def view_options(command: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option(
            "--augment",
            type=click.Choice(["none", "flip", "shift-flip", "crop-flip"]),
            default="none",
            help="Augmentation of each view: flips, whole-pixel shifts up to 1/8 of the side, "
            "or random-resized crops (area in --crop-scale), each with a random left-right flip.",
        ),
        click.option(
            "--crop-scale",
            type=click.FloatRange(0, 1, min_open=True),
            nargs=2,
            default=(0.25, 1.0),  # views.CROP_SCALE (not imported here: it imports torch)
            show_default=True,
            metavar="MIN MAX",
            help="crop-flip: each crop covers a random share of the image's area in this range.",
        ),
        click.option(
            "--mix",
            type=click.Choice(["none", "mixup", "cutmix"]),
            default="none",
            help="Mix each view with a random partner sample.",
        ),
        click.option(
            "--mix-alpha",
            type=POSITIVE,
            default=1.0,
            help="The mixing weight is drawn from Beta(MIX_ALPHA, MIX_ALPHA).",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def table_options(
    *, csv_help: str, section: str | None, section_help: str = "Name of the section's markers."
) -> Callable[..., Any]:
    """--csv, --markdown and --section: where a generated table goes."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        options = [
            click.option(
                "--csv",
                "csv_path",
                type=click.Path(dir_okay=False, path_type=Path),
                default=None,
                help=csv_help,
            ),
            click.option(
                "--markdown",
                "markdown_path",
                type=click.Path(dir_okay=False, path_type=Path),
                default=None,
                help="Replace this section of a Markdown file (or append it).",
            ),
            click.option("--section", default=section, help=section_help),
        ]
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def data_options(command: Callable[..., Any], required: bool = True) -> Callable[..., Any]:
    options = [
        click.option(
            "--data",
            required=required,
            help="'fashion-mnist', 'synthetic', or an image folder with train/ and test/.",
        ),
        click.option(
            "--data-root",
            default="data",
            type=click.Path(file_okay=False),
            help="Where named datasets live (fashion-mnist in DATA_ROOT/fashion-mnist).",
        ),
        click.option(
            "--image-size",
            type=click.IntRange(min=1),
            default=None,
            help="Image folders: resize to this size (default: the first image's).",
        ),
        click.option(
            "--channels",
            type=click.Choice(["1", "3"]),
            default=None,
            help="Image folders: 1 (grayscale) or 3 (RGB) (default: the first image's).",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def data_options_optional(command: Callable[..., Any]) -> Callable[..., Any]:
    """--data and its companions where the run's own dataset is the default."""
    return data_options(command, required=False)


DEVICE_OPTION = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto")
WORKERS_OPTION = click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=0,
    help="DataLoader worker processes that build batches ahead of the step "
    "(pinned for non-blocking copies on CUDA).",
)
PRECISION_OPTION = click.option(
    "--precision",
    type=click.Choice(["auto", "fp32", "bf16"]),
    default="auto",
    help="Forward passes in bf16 autocast or float32; auto: bf16 on CUDA, float32 on the CPU.",
)


def training_options(command: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option(
            "--model",
            "model",
            help="A timm architecture (resnet18, kd_cnn, kd_mlp_800x2, ...).",
        ),
        click.option("--epochs", type=click.IntRange(min=1), help="Number of epochs."),
        click.option("--out", type=click.Path(), help="Run directory to create."),
        click.option("--batch-size", type=click.IntRange(min=1), default=128),
        click.option(
            "--eval-every",
            type=click.IntRange(min=1),
            default=1,
            help="Score the test split every N epochs (always after the last).",
        ),
        click.option(
            "--val-fraction",
            type=click.FloatRange(0, 1, min_open=True, max_open=True),
            default=None,
            help="Hold out this fraction of the training split (one fixed split, the same for "
            "every run) and score it with the test split; its rows are never trained on.",
        ),
        click.option(
            "--early-stopping",
            type=click.IntRange(min=1),
            default=None,
            help="Stop after N evaluations in a row without fewer validation errors and keep "
            "the best epoch's weights (needs --val-fraction).",
        ),
        click.option("--opt", default="sgd", help="Optimizer name for timm's create_optimizer_v2."),
        click.option("--lr", type=POSITIVE, default=0.05, help="Peak learning rate."),
        click.option("--momentum", type=float, default=0.9),
        click.option("--weight-decay", type=click.FloatRange(min=0), default=0.0),
        click.option("--sched", default="cosine", help="Schedule for timm's create_scheduler_v2."),
        click.option("--warmup-epochs", type=click.IntRange(min=0), default=0),
        click.option("--seed", type=int, default=0),
        click.option(
            "--dropout",
            "drop_rate",
            type=click.FloatRange(0, 1, max_open=True),
            default=0.0,
            help="Dropout rate (timm's drop_rate).",
        ),
        click.option(
            "--jitter",
            type=click.IntRange(min=0),
            default=0,
            help="Random shifts of up to this many pixels (Hinton et al.'s input jitter).",
        ),
        click.option(
            "--subset",
            type=click.FloatRange(0, 1, min_open=True),
            default=None,
            help="Train on a random fraction of the samples, the rows cache-teacher --subset "
            "picks with the same --subset-seed (not with --cache: the cache holds its rows).",
        ),
        click.option("--subset-seed", type=int, default=0, help="Draws the --subset."),
        click.option(
            "--hidden-sizes",
            callback=parse_sizes,
            default=None,
            help="kd_mlp only: hidden layer widths, e.g. 800,800.",
        ),
        DEVICE_OPTION,
        PRECISION_OPTION,
        WORKERS_OPTION,
        click.option("--overwrite", is_flag=True, help="Replace --out if it exists."),
        click.option(
            "--resume",
            type=click.Path(),
            default=None,
            help="Continue the unfinished run in this directory from its last epoch checkpoint, "
            "with its saved configuration (give no other option).",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return data_options(view_options(command), required=False)


REQUIRED_TO_START = {
    "train-teacher": ("model", "data", "epochs", "out"),
    "train-student": ("model", "data", "epochs", "out", "cache", "alpha"),
    "distill-online": ("model", "data", "epochs", "out", "teacher", "alpha", "temperature"),
}


def _start_or_resume(command: str, options: dict, log: Callable[[str], None]) -> Any:
    """A new run from the options, or with --resume RUN_DIR alone, the unfinished run there."""
    from click.core import ParameterSource

    from pipeline.train import (
        TrainConfig,
        distill_online,
        resume_training,
        train_student,
        train_teacher,
    )

    context = click.get_current_context()
    resume = options.pop("resume")
    if resume is not None:
        given = [
            name
            for name in options
            if context.get_parameter_source(name) == ParameterSource.COMMANDLINE
        ]
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            raise click.UsageError(f"--resume continues with RUN_DIR/config.json; drop {flags}")
        return resume_training(Path(resume), log=log)
    for name in REQUIRED_TO_START[command]:
        if options[name] is None:
            raise click.UsageError(f"Missing option '--{name}' (required unless --resume).")
    channels = options.pop("channels")
    config = TrainConfig(**options, channels=int(channels) if channels else None)
    train = {
        "train-teacher": train_teacher,
        "train-student": train_student,
        "distill-online": distill_online,
    }[command]
    return train(config, log=log)


def _load_data(
    data: str, split: str, data_root: str, image_size: int | None, channels: str | None
) -> Any:
    """The dataset that --data and its companion options name."""
    from pipeline.data import load_dataset

    return load_dataset(
        data,
        split,
        data_root=Path(data_root),
        image_size=image_size,
        channels=int(channels) if channels else None,
    )


def _echo(line: str) -> None:
    click.echo(line, err=True)


def _say(line: str) -> None:
    """A command's closing line, printed once under torchrun (by rank 0)."""
    if os.environ.get("RANK", "0") == "0":
        click.echo(line)


@click.group(name="kdpipe", context_settings=CONTEXT)
@click.version_option(__version__, prog_name="kdpipe")
def main() -> None:
    """kdpipe: offline knowledge distillation.

    Train or bring a teacher, cache its soft labels once (cache-teacher), then
    train students from the cache (train-student) without loading the teacher.
    """


@main.command("fetch-data", context_settings=CONTEXT)
@click.option(
    "--dest",
    type=click.Path(file_okay=False),
    default="data/fashion-mnist",
    help="Folder for the four gzipped IDX files.",
)
@reports_errors
def fetch_data(dest: str) -> None:
    """Fetch Fashion-MNIST (Debian package or official URLs) and verify its checksums."""
    from pipeline.fetch import fetch_fashion_mnist

    fetch_fashion_mnist(Path(dest), log=_echo)


@main.command("train-teacher", context_settings=CONTEXT)
@training_options
@reports_errors
def train_teacher_command(**options: Any) -> None:
    """Train a model on hard labels; write a teacher run directory.

    The run directory holds model.safetensors, model.json (architecture, data
    config, weights hash: the teacher version), config.json and metrics.csv.
    --model, --data, --epochs and --out are required, unless --resume RUN_DIR.
    """
    card = _start_or_resume("train-teacher", options, _echo)
    _say(f"teacher {card.architecture}, weights {card.weights_sha256[:16]}")


@main.command("cache-teacher", context_settings=CONTEXT)
@click.option(
    "--teacher",
    "teachers",
    multiple=True,
    required=True,
    type=click.Path(),
    help="Teacher run directory; repeat for an ensemble.",
)
@data_options
@click.option("--split", type=click.Choice(["train", "test"]), default="train")
@click.option("--temperature", type=POSITIVE, required=True, help="Softmax temperature T.")
@click.option("--out", type=click.Path(), required=True, help="Cache (Zarr store) to create.")
@click.option(
    "--combine",
    type=click.Choice(["mean-probs", "mean-logits"]),
    default="mean-probs",
    help="How ensemble members are combined.",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=512)
@click.option(
    "--chunk-size", type=click.IntRange(min=1), default=4096, help="Samples per Zarr chunk."
)
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16")
@click.option(
    "--top-k",
    type=click.IntRange(min=1),
    default=None,
    help="Store only the K largest log-probabilities and their classes [default: all].",
)
@click.option(
    "--views",
    type=click.IntRange(min=1),
    default=1,
    help="Augmented views per sample, each with its parameters stored.",
)
@view_options
@click.option("--seed", type=int, default=0, help="Draws the views and the --subset.")
@click.option(
    "--subset",
    type=click.FloatRange(0, 1, min_open=True),
    default=None,
    help="Cache a random fraction of the samples (the transfer set) [default: all].",
)
@click.option(
    "--exclude-classes",
    callback=parse_classes,
    default=None,
    help="Leave these class ids out of the transfer set, e.g. 3 or 3,5.",
)
@click.option(
    "--ignore-labels",
    is_flag=True,
    help="Store no labels: students learn from the teacher alone (alpha 0).",
)
@DEVICE_OPTION
@PRECISION_OPTION
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@reports_errors
def cache_teacher_command(
    data: str,
    data_root: str,
    image_size: int | None,
    channels: str | None,
    split: str,
    augment: str,
    mix: str,
    mix_alpha: float,
    crop_scale: tuple[float, float],
    **options: Any,
) -> None:
    """Run the teacher(s) once over a dataset split; store log_softmax(z/T) in a Zarr cache.

    With --views V, each sample gets V augmented views (--augment, --mix): the
    teacher labels each, and their parameters are stored so that students
    replay exactly the images the teacher saw.
    """
    from pipeline.teach import CacheConfig, cache_teacher
    from pipeline.views import ViewPolicy

    config = CacheConfig(
        **{**options, "teachers": tuple(options["teachers"])},
        policy=ViewPolicy(augment, mix, mix_alpha, crop_scale),
    )
    dataset = _load_data(data, split, data_root, image_size, channels)
    cache_teacher(config, dataset, log=click.echo)


@main.command("train-student", context_settings=CONTEXT)
@click.option("--cache", type=click.Path(), help="Cache written by cache-teacher.")
@click.option(
    "--alpha",
    type=click.FloatRange(0, 1),
    help="Weight of the hard-label CE term; 1 trains on hard labels alone (baseline).",
)
@click.option(
    "--temperature",
    type=POSITIVE,
    default=None,
    help="Distillation temperature [default: the cache's]; re-tempered exactly.",
)
@click.option(
    "--cache-memory",
    callback=parse_bytes,
    metavar="SIZE",
    help="Memory budget for the cache (e.g. 512M, 2G): a cache larger than this, decoded, is "
    "streamed: chunks in a shuffled order, rows shuffled within windows of chunks  "
    "[default: read it whole].",
)
@training_options
@reports_errors
def train_student_command(**options: Any) -> None:
    """Train a student from a cache: α·CE + (1−α)·T²·KL(p_teacher ‖ p_student).

    --model, --data, --cache, --alpha, --epochs and --out are required, unless
    --resume RUN_DIR continues an unfinished run.
    """
    card = _start_or_resume("train-student", options, _echo)
    lineage = card.lineage or {}
    _say(
        f"student {card.architecture} from cache {lineage.get('cache_id')} "
        f"(teacher {lineage.get('teacher_id')})"
    )


@main.command("distill-online", context_settings=CONTEXT)
@click.option("--teacher", type=click.Path(), help="Teacher run directory, run on every batch.")
@click.option(
    "--alpha",
    type=click.FloatRange(0, 1),
    help="Weight of the hard-label term (timm's task_loss_weight).",
)
@click.option("--temperature", type=POSITIVE, default=None, help="Distillation temperature.")
@training_options
@reports_errors
def distill_online_command(**options: Any) -> None:
    """Online distillation with timm's LogitDistillationTask: the reference for a cache.

    The teacher runs on every training batch (fresh --augment/--mix views),
    which is what a cache avoids paying for. --model, --data, --teacher,
    --alpha, --temperature, --epochs and --out are required, unless --resume.
    """
    card = _start_or_resume("distill-online", options, _echo)
    click.echo(f"student {card.architecture} distilled online from {options['teacher']}")


@main.command("evaluate", context_settings=CONTEXT)
@click.argument("run_dir", type=click.Path())
@data_options
@click.option("--split", type=click.Choice(["train", "test"]), default="test")
@click.option(
    "--teacher",
    "teachers",
    multiple=True,
    type=click.Path(),
    help="Teacher run directory (repeat for an ensemble), for agreement.",
)
@click.option(
    "--cache",
    type=click.Path(),
    default=None,
    help="A cache of the same split, for agreement with its teacher.",
)
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table")
@click.option(
    "--output",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write the report to this file instead of the screen.",
)
@DEVICE_OPTION
@reports_errors
def evaluate_command(
    run_dir: str,
    data: str,
    data_root: str,
    image_size: int | None,
    channels: str | None,
    split: str,
    teachers: tuple[str, ...],
    cache: str | None,
    fmt: str,
    output: str | None,
    device: str,
) -> None:
    """Accuracy, agreement with the teacher, calibration (ECE), size and CPU speed of a run.

    RUN_DIR may also be an exported .onnx file: it then runs on ONNX Runtime's CPU
    provider with the file's own preprocessing (--device does not apply).
    """
    from pipeline.evaluate import evaluate_run, render

    dataset = _load_data(data, split, data_root, image_size, channels)
    frame = evaluate_run(
        Path(run_dir),
        dataset,
        teachers=[Path(t) for t in teachers],
        cache=cache,  # a folder or an fsspec URL
        device=device,
    )
    text = render(frame, fmt)
    if output:
        Path(output).write_text(text if text.endswith("\n") else text + "\n")
    else:
        click.echo(text)


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
    classes: tuple[int, ...],
    max_bias: float,
    step: float,
    device: str,
) -> None:
    """Choose a logit bias for CLASSES on the run's validation rows; score the test split.

    The run must have been trained with --val-fraction: its held-out rows choose
    the bias, never the test set. Writes RUN_DIR/bias.json.
    """
    from pipeline.bias import BIAS_FILE, tune_bias

    result = tune_bias(
        Path(run_dir),
        classes,
        _load_data(data, "train", data_root, image_size, channels),
        _load_data(data, "test", data_root, image_size, channels),
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
@table_options(csv_help="Write one row per run here.", section="results")
@click.option(
    "--temperature-plot",
    "plot_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also draw test errors against T per student architecture into this PNG (linked "
    "from the --markdown section).",
)
@reports_errors
def report_command(
    run_dirs: tuple[str, ...],
    baseline: str | None,
    csv_path: Path | None,
    markdown_path: Path | None,
    section: str,
    plot_path: Path | None,
) -> None:
    """Summarise runs (mean ± std over seeds) from their own metrics.csv and model.json.

    Runs whose directory names differ only by a trailing -s<seed> form one group. A
    cache of a labelled test split is a row too: its teacher's (or ensemble's) result.
    """
    from pipeline.report import report, to_markdown

    table = report(
        [Path(p) for p in run_dirs],
        baseline=baseline,
        csv_path=csv_path,
        markdown_path=markdown_path,
        section=section,
        plot_path=plot_path,
    )
    click.echo(to_markdown(table))


@main.command("storage", context_settings=CONTEXT)
@click.argument("cache_path", metavar="CACHE", type=click.Path())
@click.option(
    "--top-k",
    "ks",
    callback=parse_sizes,
    default="1,2,3,5",
    help="The K values to measure, comma-separated.",
)
@table_options(csv_help="Write one row per layout here.", section="storage")
@reports_errors
def storage_command(
    cache_path: str,
    ks: tuple[int, ...],
    csv_path: Path | None,
    markdown_path: Path | None,
    section: str,
) -> None:
    """Bytes per sample-view of a dense cache as float32, float16 and top-k, and what top-k
    loses (mean KL to the reconstruction)."""
    from pipeline.storage import storage_report, to_markdown

    table = storage_report(
        cache_path,  # a folder or an fsspec URL
        ks,
        csv_path=csv_path,
        markdown_path=markdown_path,
        section=section,
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
    help="The cache's teacher run directories, for --recompute.",
)
@click.option("--seed", type=int, default=0, help="Chooses the samples to recompute.")
@DEVICE_OPTION
@reports_errors
def verify_command(
    cache_path: str,
    data: str | None,
    data_root: str,
    image_size: int | None,
    channels: str | None,
    recompute: int,
    teachers: tuple[str, ...],
    seed: int,
    device: str,
) -> None:
    """Check a cache: manifest, completion, every chunk's checksum and values, labels.

    With --data, also the dataset's fingerprint and labels (the cache's split is used).
    Exits with status 1, naming the chunk or sample at fault, when a check fails.
    """
    from pipeline.verify import verify_cache

    dataset = None
    if data is not None:
        manifest_split = _cache_split(cache_path)
        dataset = _load_data(data, manifest_split, data_root, image_size, channels)
    report = verify_cache(
        cache_path,  # a folder or an fsspec URL
        dataset=dataset,
        recompute=recompute,
        teachers=[Path(t) for t in teachers],
        device=device,
        seed=seed,
    )
    click.echo(report.frame().to_string(index=False))
    if not report.ok:
        raise click.ClickException(
            f"{cache_path} failed verification: " + "; ".join(report.failures())
        )


def _cache_split(path: str) -> str:
    """The split a cache was made from, so --data loads the same one."""
    from pipeline.cache import read_manifest

    return read_manifest(path).dataset["split"]


@main.command("caches", context_settings=CONTEXT)
@click.argument("paths", nargs=-1, type=click.Path())
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table")
@reports_errors
def caches_command(paths: tuple[str, ...], fmt: str) -> None:
    """List the kdpipe caches under PATHS (default: the current folder) and what made each."""
    from pipeline.catalog import catalog
    from pipeline.evaluate import render_rows

    frame = catalog([Path(p) for p in paths] or [Path(".")])
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
    """The chain run -> cache -> teacher(s) -> dataset, each link verified or missing.

    RUN_DIR may also be an exported .onnx file: the chain then starts at the file.

    Hashes are recomputed wherever the files are present; exits with status 1
    when a file is present but does not match its record (MISMATCH).
    """
    from pipeline.catalog import lineage
    from pipeline.evaluate import render_rows

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
@click.option("--out", type=click.Path(), required=True, help="Work folder (replaced).")
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
    from pipeline.bench import BenchConfig, bench_report

    bench_report(BenchConfig(**options), markdown_path, csv_path, section=section, log=_echo)


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
@data_options_optional
@reports_errors
def export_command(
    run_dir: str, out: str, data: str | None, channels: str | None, **options: Any
) -> None:
    """Export a finished run to ONNX (dynamic batch), checked against PyTorch on test rows.

    The file's metadata records the preprocessing, the class names, the weights hash
    and the lineage (run, cache, teacher). --data defaults to the run's dataset.
    """
    from pipeline.export import export_run

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
    type=click.FloatRange(0, 1),
    default=None,
    help="Weight of the hard-label term [default: the float32 run's].",
)
@click.option(
    "--temperature",
    type=POSITIVE,
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
    from pipeline.export import INT8_FILE, QatConfig, qat_distill

    config = QatConfig(run=run_dir, channels=int(channels) if channels else None, **options)
    card = qat_distill(config, log=_echo)
    click.echo(
        f"qat-student {card.architecture} from {run_dir} (cache {card.lineage['cache_id']}); "
        f"int8 model {Path(config.out) / INT8_FILE}"
    )
