"""What every command shares: the ``kdpipe`` group, its context settings, option
parsers and option groups, and the turning of library errors into click errors."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from kdpipe import __version__
from kdpipe.base.checks import alpha_problem, temperature_problem
from kdpipe.base.errors import KdpipeError
from kdpipe.base.flags import CLIP_MODES, SCHED_ON, flag

CONTEXT = {
    "help_option_names": ["-h", "--help"],
    "show_default": True,
    "terminal_width": 100,
    "max_content_width": 100,
}
POSITIVE = click.FloatRange(min=0, min_open=True)


def _checked(problem: Callable[[object, str], str | None]) -> Callable[..., Any]:
    """An option callback that asks the library's own check (:mod:`kdpipe.base.checks`), so the
    command line refuses what the Python API refuses, with the same message."""

    def callback(_ctx: click.Context, param: click.Parameter, value: float | None) -> Any:
        message = None if value is None else problem(value, param.opts[0])
        if message:
            raise click.BadParameter(message)
        return value

    return callback


# --temperature and --alpha, wherever a command takes them
TEMPERATURE = {"type": float, "metavar": "T (0.01-1000)", "callback": _checked(temperature_problem)}
ALPHA = {"type": float, "metavar": "A (0-1)", "callback": _checked(alpha_problem)}


def reports_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn kdpipe's own errors into ``Error: <message>`` and exit status 1."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from kdpipe.base.outputs import forget_outputs, writing

        forget_outputs()
        try:
            return command(*args, **kwargs)
        except KdpipeError as exc:
            raise click.ClickException(str(exc)) from exc
        except OSError as exc:  # a full disk, a read-only folder: the file and the reason
            # a write that fails for lack of space names no file: name what was being written
            outputs = writing()
            where = (f"{exc.filename}: " if exc.filename else
                     f"writing {outputs[-1]}: " if outputs else "")  # fmt: skip
            raise click.ClickException(f"{where}{exc.strerror or exc}") from exc
        except RuntimeError as exc:
            message = lost_peer(exc)
            if message is None:
                raise
            raise click.ClickException(message) from exc

    return wrapper


# what torch.distributed's backends say when the process at the other end has gone
_LOST = ("connection reset by peer", "connection closed by peer", "broken pipe",
         "connection refused")  # fmt: skip


def lost_peer(exc: BaseException) -> str | None:
    """One line for a process of a torchrun job whose peer died (a node lost, a rank
    killed): gloo's or NCCL's error, first line only, and what to do; None for any other
    error. Read from the exception alone: no torch import for the light commands."""
    import os

    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    text = str(exc)
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    distributed = type(exc).__name__ in ("DistBackendError", "DistNetworkError") or "gloo" in text
    if size <= 1 or not (distributed and any(sign in text.lower() for sign in _LOST)):
        return None
    if "]" in first:  # gloo's "[path/pair.cc:545] Read error ...": the source path goes
        first = first.split("]", 1)[1].strip()
    return (
        f"rank {os.environ.get('RANK', '?')} of {size}: another process of this run "
        f"stopped ({first[:160]}); what was written is kept: run the same command again "
        "on every node to resume (train-student: --resume RUN_DIR)"
    )


def parse_sizes(_ctx: click.Context, _param: click.Parameter, value: str | None) -> tuple | None:
    """``800,800`` (--hidden-sizes) or ``1,2,3,5`` (storage --top-k): positive integers."""
    if value is None:
        return None
    try:
        sizes = tuple(int(part) for part in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers") from None
    if not sizes or min(sizes) < 1:
        raise click.BadParameter(f"{value!r}: every value must be an integer >= 1")
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
    except (ValueError, OverflowError):  # "nan", "inf", "1e400"
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


def parse_names(_ctx: click.Context, _param: click.Parameter, value: str | None) -> tuple:
    """``a,b`` as ('a', 'b'): layer names, in the order given."""
    if not value:
        return ()
    names = tuple(part.strip() for part in value.split(","))
    if not all(names):
        raise click.BadParameter(f"{value!r} is not a comma-separated list of layer names")
    return names


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
    *,
    csv_help: str,
    section: str | None,
    section_help: str = "Name of the section's markers.",
    overwrite_help: str = "Replace an existing --csv (or plot) that kdpipe wrote.",
) -> Callable[..., Any]:
    """--csv, --markdown, --section and --overwrite: where a generated table goes."""

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
            click.option(
                "--overwrite",
                is_flag=True,
                help=overwrite_help,
            ),
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
            help="'fashion-mnist', 'synthetic', an image folder with train/ and test/, or a "
            "folder or fsspec URL of WebDataset shards (train-*.tar, test-*.tar, classes.txt).",
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
            help="Image folders and shards: decode at S x S (default: what the cache or run "
            "was made with, else the train split's own size, or S x S at the median shorter "
            "side when its sizes differ).",
        ),
        click.option(
            "--channels",
            type=click.Choice(["1", "3"]),
            default=None,
            help="Image folders and shards: 1 (grayscale) or 3 (RGB) (default: the cache's or "
            "run's, else 3 when any train image is in colour).",
        ),
        click.option(
            "--resize",
            type=click.Choice(["crop", "squash"]),
            default=None,
            help="Image folders and shards: a file of another size keeps its aspect ratio "
            "(crop: shorter side, then the centre, as timm's eval transform) or is stretched "
            "(squash) (default: the cache's or run's, else crop).",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


DEVICE_OPTION = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto")
INPUT_SIZE_OPTION = click.option(
    "--input-size",
    type=click.IntRange(min=1),
    default=None,
    help="The model's input size S: every image and stored view is rendered at S x S from "
    "the decoded data (default: the data's size), e.g. a student smaller than its teacher.",
)
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


def log_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """--log and --log-dir: the run watched in TensorBoard or MLflow (train.watch)."""
    options = [
        click.option(
            "--log",
            type=click.Choice(["none", "tensorboard", "mlflow"]),
            default="none",
            help="Also send each epoch's metrics.csv row to TensorBoard (event files) or MLflow "
            "(a local store), with the configuration and lineage as parameters "
            "(pip install 'kdpipe[log]').",
        ),
        click.option(
            "--log-dir",
            default=None,
            help="Where --log writes: a folder, or for MLflow a tracking URI (sqlite:///..., "
            "http://...)  [default: the run directory; RUN_DIR/mlruns for MLflow].",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def clip_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """--clip-grad and --clip-mode: the gradient clipped before each step (timm's
    dispatch_clip_grad), what keeps a high-temperature student from diverging."""
    options = [
        click.option(
            "--clip-grad",
            type=click.FloatRange(min=0, min_open=True),
            default=None,
            metavar="VALUE",
            help="Clip the gradient before each optimizer step (timm's dispatch_clip_grad): "
            "its global L2 norm to VALUE, each element to [-VALUE, VALUE], or by AGC with clip "
            "factor VALUE, as --clip-mode says  [default: no clipping].",
        ),
        click.option(
            "--clip-mode",
            type=click.Choice(CLIP_MODES),
            default="norm",
            help="How --clip-grad clips: norm, value or agc (adaptive, Brock et al. 2021).",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


OPT_HELP = (
    "Optimizer name for timm's create_optimizer_v2 (a detection student: auto, sgd or "
    "adamw; auto, its default, picks the optimizer and lr as Ultralytics' trainer does)."
)
WARMUP_HELP = "Epochs of linear warm-up (a detection student: Ultralytics' warm-up, default 3)."


def training_options(command: Callable[..., Any]) -> Callable[..., Any]:
    # longer than a screen on purpose: one entry per option of the three training commands
    options = [
        click.option(
            "--model",
            "model",
            help="A timm architecture (resnet18, kd_cnn, kd_mlp_800x2, ...).",
        ),
        INPUT_SIZE_OPTION,
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
        click.option("--opt", default="sgd", help=OPT_HELP),
        click.option("--lr", type=POSITIVE, default=0.05, help="Peak learning rate."),
        click.option("--momentum", type=float, default=0.9),
        click.option("--weight-decay", type=click.FloatRange(min=0), default=0.0),
        click.option("--sched", default="cosine", help="Schedule for timm's create_scheduler_v2."),
        click.option("--warmup-epochs", type=click.IntRange(min=0), default=0, help=WARMUP_HELP),
        click.option(
            "--sched-on",
            type=click.Choice(SCHED_ON),
            default="update",
            help="Move the --sched schedule and its warm-up after every optimizer update "
            "(timm's step_update) or once per epoch, as runs did before this option (a run "
            "saved without it resumes so).",
        ),
        click.option("--seed", type=int, default=0),
        click.option(
            flag("drop_rate"),
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
    command = clip_options(log_options(command))  # listed last
    for option in reversed(options):
        command = option(command)
    return data_options(view_options(command), required=False)


def load_data(
    data: str, split: str, data_root: str, image_size: int | None, channels: str | None,
    resize: str | None = None, recorded: dict | None = None, what: str = "",
) -> Any:  # fmt: skip
    """The dataset that --data and its companion options name; the decode settings not
    given are those of ``recorded`` (the dataset record of the cache or run ``what``)."""
    from kdpipe.data.datasets import decode_options, load_dataset

    given = {"image_size": image_size, "channels": int(channels) if channels else None,
             "resize": resize}  # fmt: skip
    return load_dataset(data, split, data_root=Path(data_root),
                        **decode_options(recorded, what, **given))  # fmt: skip


def echo(line: str) -> None:
    click.echo(line, err=True)


def say(line: str) -> None:
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
