"""The pipeline's stages as commands: fetch the data, train a teacher, cache it, train
students (from the cache, or online as the reference)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from kdpipe.base.flags import REQUIRED_TO_START, flag
from kdpipe.cli.base import (
    ALPHA,
    CONTEXT,
    DEVICE_OPTION,
    PRECISION_OPTION,
    TEMPERATURE,
    data_options,
    echo,
    load_data,
    main,
    parse_bytes,
    parse_classes,
    parse_names,
    reports_errors,
    say,
    training_options,
    view_options,
)


def parse_floats(text: str, option: str) -> list[float]:
    """``0.5,0.4,0.3`` as numbers, or a usage error naming the option."""
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is not comma-separated numbers", param_hint=option
        ) from None


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
    from kdpipe.data.fetch import fetch_fashion_mnist

    fetch_fashion_mnist(Path(dest), log=echo)


@main.command("pack-shards", context_settings=CONTEXT)
@click.argument("folder", type=click.Path(file_okay=False))
@click.option(
    "--out",
    type=click.Path(),
    required=True,
    help="Folder to create for the shards (new or empty).",
)
@click.option(
    "--shard-size", type=click.IntRange(min=1), default=10000, help="Samples per shard at most."
)
@reports_errors
def pack_shards(folder: str, out: str, shard_size: int) -> None:
    """Write an image folder as WebDataset tar shards (train-NNNNNN.tar, test-NNNNNN.tar,
    classes.txt) in its canonical order: each file's bytes as they are, keyed by position,
    so --data OUT gives the same rows, pixels and cache values as --data FOLDER."""
    from kdpipe.data.datasets import pack_image_folder

    counts = pack_image_folder(Path(folder), Path(out), shard_size)
    shards = ", ".join(f"{split}: {count} shard(s)" for split, count in counts.items())
    say(f"wrote {out} ({shards})")


@main.command("train-teacher", context_settings=CONTEXT)
@training_options
@click.option(
    "--pretrained",
    default=None,
    metavar="SOURCE",
    help="Fine-tune pretrained weights (timm:ARCH, hf-hub:ORG/NAME, local-dir:PATH) with a new "
    "head for the dataset's classes, at the weights' own preprocessing.",
)
@click.option(
    "--weights",
    type=click.Path(dir_okay=False),
    default=None,
    help="With --pretrained: its weights from this file (safetensors or a torch checkpoint), "
    "not from timm's download.",
)
@click.option(
    "--data-config",
    type=click.Path(dir_okay=False),
    default=None,
    help="With --pretrained: a JSON file of the preprocessing its weights were trained with, "
    "in timm's data-config keys (input_size, mean, std, interpolation, crop_pct, crop_mode) "
    "[default: the pretrained_cfg's].",
)
@reports_errors
def train_teacher_command(**options: Any) -> None:
    """Train a model on hard labels; write a teacher run directory.

    The run directory holds model.safetensors, model.json (architecture, data
    config, weights hash: the teacher version), config.json and metrics.csv.
    --model (or --pretrained), --data, --epochs and --out are required, unless
    --resume RUN_DIR. With --data DATA.yaml (a YOLO data YAML) and --model an
    Ultralytics model YAML (yolo11s.yaml), a detection teacher trained by
    Ultralytics' own trainer (the detect extra).
    """
    card = start_or_resume("train-teacher", options, echo)
    say(f"teacher {card.architecture}, weights {card.weights_sha256[:16]}")


@main.command("import-teacher", context_settings=CONTEXT)
@click.argument("source")
@click.option("--out", type=click.Path(), required=True, help="Teacher run directory to create.")
@click.option(
    "--weights",
    type=click.Path(dir_okay=False),
    default=None,
    help="Weights file (safetensors, or a torch checkpoint read with weights_only=True) "
    "instead of timm's download.",
)
@click.option(
    "--num-classes",
    type=click.IntRange(min=1),
    default=None,
    help="Classes the head predicts: checked against the weights [default: the weights'].",
)
@click.option(
    "--classes",
    "classes_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="File of the class names the head predicts, one per line [default: by index].",
)
@click.option(
    "--data-config",
    "data_config_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="JSON file of the preprocessing the weights were trained with, in timm's "
    "data-config keys (input_size, mean, std, interpolation, crop_pct, crop_mode) "
    "[default: the pretrained_cfg's].",
)
@click.option(
    "--input-size",
    type=click.IntRange(min=1),
    default=None,
    help="Input side S (S x S) the weights were trained at [default: the pretrained_cfg's].",
)
@click.option("--mean", default=None, help="Per-channel mean, e.g. 0.5,0.5,0.5.")
@click.option("--std", default=None, help="Per-channel std, e.g. 0.25,0.25,0.25.")
@click.option(
    "--interpolation", default=None, help="timm's name of the eval resize: bicubic, bilinear..."
)
@click.option(
    "--crop-pct",
    type=click.FloatRange(0, 4, min_open=True),
    default=None,
    help="Eval resize to S / crop_pct, then centre crop S (1: no crop).",
)
@click.option("--crop-mode", default=None, help="timm's eval crop: center, squash or border.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@reports_errors
def import_teacher_command(
    source: str,
    out: str,
    weights: str | None,
    num_classes: int | None,
    classes_file: str | None,
    data_config_file: str | None,
    overwrite: bool,
    **preprocessing: Any,
) -> None:
    """Write a teacher run directory from pretrained weights: SOURCE is timm:ARCH[.TAG],
    hf-hub:ORG/NAME or local-dir:PATH, or a detection teacher's ultralytics:PATH.pt (an
    Ultralytics checkpoint, read with torch.load(weights_only=True); --input-size only).

    Weights come through timm.create_model(pretrained=True) (downloaded when a network
    exists, or the local-dir folder's file) or from --weights FILE. The preprocessing
    (input size, mean, std, interpolation, crop_pct) is the model's pretrained_cfg, with
    the values of --data-config FILE.json, then of --input-size, --mean, --std,
    --interpolation, --crop-pct and --crop-mode in their place; it is recorded in
    model.json. A --weights file given none of them is evaluated at the pretrained_cfg's
    and a warning says so. Class names: --classes, else the config's label_names.
    """
    from kdpipe.models.runs import import_teacher

    if source.startswith("ultralytics:"):
        from kdpipe.tasks.detect.runs import import_from_source

        others = {"weights": weights, "num_classes": num_classes, "classes": classes_file,
                  "data_config": data_config_file, "overwrite": overwrite}  # fmt: skip
        card = import_from_source(source, out, {**preprocessing, **others})
        say(f"detection teacher {card.architecture} from {source}: {len(card.classes)} "
            f"classes, {card.image_size} px, strides {card.strides}, reg_max {card.reg_max}, "
            f"weights {card.weights_sha256[:16]}")  # fmt: skip
        return
    given = dict(preprocessing)
    side = given.pop("input_size")
    given["img_size"] = side
    for key in ("mean", "std"):
        given[key] = None if given[key] is None else parse_floats(given[key], f"--{key}")
    card = import_teacher(
        source,
        Path(out),
        weights=None if weights is None else Path(weights),
        num_classes=num_classes,
        classes_file=None if classes_file is None else Path(classes_file),
        data_config=given,
        data_config_file=None if data_config_file is None else Path(data_config_file),
        overwrite=overwrite,
        log=echo,
    )
    size = "x".join(str(v) for v in card.data_config["input_size"][1:])
    say(
        f"teacher {card.architecture} from {source}: {card.num_classes} classes, input {size} "
        f"({card.data_config['interpolation']}, crop_pct {card.data_config['crop_pct']}), "
        f"weights {card.weights_sha256[:16]}"
    )


@main.command("cache-teacher", context_settings=CONTEXT)
@click.option(
    "--teacher",
    "teachers",
    multiple=True,
    required=True,
    help="Teacher run directory, or a pretrained SOURCE (timm:ARCH, hf-hub:ORG/NAME, "
    "local-dir:PATH) imported on the fly; repeat for an ensemble.",
)
@data_options
@click.option("--split", type=click.Choice(["train", "test"]), default="train")
@click.option(
    "--temperature", **TEMPERATURE, help="Softmax temperature T (required; not for detection)."
)
@click.option("--out", type=click.Path(), required=True, help="Cache (Zarr store) to create.")
@click.option(
    "--combine",
    type=click.Choice(["mean-probs", "mean-logits"]),
    default="mean-probs",
    help="How ensemble members are combined.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=None,
    help="Teacher batch [default: 512; 32 for a detection teacher].",
)
@click.option(
    "--chunk-size",
    type=click.IntRange(min=1),
    default=None,
    help="Samples per Zarr chunk [default: 4096; 64 for a detection teacher].",
)
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16")
@click.option(
    "--top-k",
    type=click.IntRange(min=1),
    default=None,
    help="Store only the K largest log-probabilities and their classes (a detection teacher: "
    "the K anchors with the highest class logit) [default: all].",
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
@click.option(
    "--features",
    callback=parse_names,
    default=None,
    metavar="NAME[,NAME...]",
    help="Also store the teacher's outputs at these layers (feature_info module names, their "
    "indices, or pre_logits), float16, per sample and view.",
)
@click.option(
    "--attention",
    callback=parse_names,
    default=None,
    metavar="NAME[,NAME...]",
    help="Also store the attention map (channel mean of squares, L2-normalised) of these "
    "spatial layers.",
)
@click.option(
    "--feature-grid",
    type=click.IntRange(min=1),
    default=None,
    metavar="G",
    help="Average-pool spatial maps (and attention maps) to G x G [default: as they are].",
)
@DEVICE_OPTION
@PRECISION_OPTION
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=0,
    help="DataLoader worker processes that decode an image folder's batches ahead of the "
    "teacher (Fashion-MNIST and the synthetic set are held in memory).",
)
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@reports_errors
def cache_teacher_command(
    data: str,
    data_root: str,
    image_size: int | None,
    channels: str | None,
    resize: str | None,
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
    replay exactly the images the teacher saw. --features and --attention store
    intermediate layers of the same forward passes beside the log-probabilities.

    A detection teacher run with --data DATA.yaml (a YOLO data YAML): its raw head
    outputs (class and box logits per anchor, dense or --top-k anchors) and each
    view's ground truth over the train split; view 0 is the plain letterbox, the
    others drawn from --seed; --image-size is the views' canvas [default: the
    teacher's]. --temperature and the classification options do not apply.
    """
    from kdpipe.models.teach import CacheConfig, cache_teacher
    from kdpipe.tasks.detect.teach import teacher_task
    from kdpipe.views.policy import ViewPolicy

    if teacher_task(options["teachers"], data) == "detect":
        _cache_detection(data, image_size, options)
        return
    if options["temperature"] is None:
        raise click.UsageError("Missing option '--temperature'.")
    for name in ("batch_size", "chunk_size"):  # the dataclass's defaults, per task
        if options[name] is None:
            options.pop(name)
    workers = options.pop("workers")
    config = CacheConfig(
        **{**options, "teachers": tuple(options["teachers"])},
        policy=ViewPolicy(augment, mix, mix_alpha, crop_scale),
    )
    dataset = load_data(data, split, data_root, image_size, channels, resize).with_workers(workers)
    cache_teacher(config, dataset, log=click.echo)


DETECTION_OPTIONS = ("data", "teachers", "out", "views", "top_k", "seed", "image_size",
                     "batch_size", "chunk_size", "dtype", "device", "overwrite")  # fmt: skip


def _cache_detection(data: str, image_size: int | None, options: dict[str, Any]) -> None:
    """cache-teacher with a detection teacher: the options it takes, any other given one
    refused by name."""
    from click.core import ParameterSource
    from kdpipe.tasks.detect.teach import DetectCacheConfig, cache_detection_teacher

    context = click.get_current_context()
    given = [p for p in context.command.params if p.name not in DETECTION_OPTIONS
             and context.get_parameter_source(p.name) == ParameterSource.COMMANDLINE]  # fmt: skip
    if given:
        names = ", ".join(p.opts[0] for p in given)
        raise click.UsageError(f"{names}: not an option of a detection teacher's cache "
                               "(raw head outputs; T is chosen when a student trains)")  # fmt: skip
    keys = ("out", "views", "top_k", "seed", "batch_size", "chunk_size", "dtype", "device",
            "overwrite")  # fmt: skip
    wanted = {key: options[key] for key in keys}
    config = DetectCacheConfig(teacher=options["teachers"][0], data=data, image_size=image_size,
                               **{k: v for k, v in wanted.items() if v is not None})  # fmt: skip
    cache_detection_teacher(config, log=click.echo)


def feature_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The feature term's options, shared by train-student (the teacher's layer from the
    cache) and distill-online (the same layer tapped from the teacher at every step)."""
    options = [
        click.option(
            "--feature-loss",
            type=click.Choice(["hint", "cosine", "attention"]),
            default=None,
            help="Add a feature term: FitNets hint (MSE), cosine, or attention transfer, between "
            "--student-layer (through a learned projector) and the teacher's --teacher-layer.",
        ),
        click.option(
            "--feature-weight",
            type=click.FloatRange(min=0),
            default=1.0,
            metavar="BETA",
            help="Weight of the feature term: loss = distillation loss + BETA * feature loss.",
        ),
        click.option(
            "--student-layer",
            default=None,
            metavar="NAME",
            help="The student's layer (feature_info module name, its index, or pre_logits).",
        ),
        click.option(
            "--teacher-layer",
            default=None,
            metavar="NAME",
            help="The teacher's layer: as the cache names it (cache-teacher --features or "
            "--attention), or, online, as the teacher names it.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def detection_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """A detection student's own options (--data a data YAML: kdpipe.tasks.detect.train)."""
    options = [
        click.option(
            "--views",
            type=click.IntRange(min=1),
            default=None,
            help="Detection: views drawn per training image, view 0 the plain letterbox "
            "[default: 4].",
        ),
        click.option(
            "--view-seed",
            type=click.IntRange(min=0),
            default=None,
            help="Detection, hard labels or online: the seed the views' parameters are drawn "
            "from; a cache's --seed renders that cache's views (the same pixels, a like-for-like "
            "reference) [default: --seed].",
        ),
        click.option(
            "--box-weight",
            type=click.FloatRange(min=0),
            default=None,
            metavar="BETA",
            help="Detection: weight of the box distillation term beside the class term "
            "[default: 1].",
        ),
        click.option(
            "--ema-decay",
            type=click.FloatRange(0, 1, max_open=True),
            default=None,
            help="Detection: the student saved is a moving average of its weights (Ultralytics' "
            "ModelEMA: this decay times 1 - exp(-updates / --ema-tau)); 0 saves the last weights "
            "[default: 0.9999].",
        ),
        click.option(
            "--ema-tau",
            type=click.FloatRange(min=0, min_open=True),
            default=None,
            metavar="UPDATES",
            help="Detection: the moving average's ramp, in updates (the tau above): a run of "
            "fewer updates than it averages little [default: 2000, Ultralytics'].",
        ),
        click.option(
            "--positive-score",
            type=click.FloatRange(0, 1, max_open=True),
            default=None,
            help="Detection: the teacher's score above which an anchor's box is distilled "
            "(a teacher's scores are IoU-aware, rarely near 1) [default: 0.1].",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@main.command("train-student", context_settings=CONTEXT)
@click.option("--cache", type=click.Path(), help="Cache written by cache-teacher.")
@click.option(
    "--alpha",
    **ALPHA,
    help="Weight of the hard-label CE term; 1 trains on hard labels alone (baseline).",
)
@click.option(
    "--temperature",
    **TEMPERATURE,
    default=None,
    help="Distillation temperature [default: the cache's]; re-tempered exactly.",
)
@click.option(
    "--logit-standardize",
    is_flag=True,
    help="Soft term on per-row z-scored teacher and student logits (Sun et al., CVPR 2024, "
    "Logit Standardization in KD); --temperature is then a base temperature: each row is "
    "softened at T times its own logits' standard deviation.",
)
@click.option(
    "--cache-memory",
    callback=parse_bytes,
    metavar="SIZE",
    help="Memory budget for the cache (e.g. 512M, 2G): a cache larger than this, decoded, is "
    "streamed: chunks in a shuffled order, rows shuffled within windows of chunks; a detection "
    "cache keeps the decoded chunks that fit, the last read  [default: read it whole].",
)
@feature_options
@training_options
@click.option(
    "--hard-labels",
    is_flag=True,
    help="Detection (a data YAML as --data): the reference student, on the views' ground "
    "truth alone (no cache, no teacher).",
)
@detection_options
@reports_errors
def train_student_command(**options: Any) -> None:
    """Train a student from a cache: α·CE + (1−α)·T²·KL(p_teacher ‖ p_student).

    With --feature-loss, plus β times a loss between a student layer, mapped by a
    learned projector (trained with the student, not saved), and the teacher's
    layer cached for the same view. The teacher is never loaded.

    --model, --data, --cache, --alpha, --epochs and --out are required, unless
    --resume RUN_DIR continues an unfinished run. With --data DATA.yaml (a YOLO
    data YAML), a detection student from a detection cache (--temperature
    required too) or, with --hard-labels, from the views' ground truth alone.
    """
    card = start_or_resume("train-student", options, echo)
    lineage = card.lineage or {}
    if getattr(card, "task", None) == "detect":
        origin = (f"from cache {lineage['cache_id']} (teacher {lineage['teacher_id']})"
                  if "cache_id" in lineage else "on hard labels")  # fmt: skip
        say(f"detection student {card.architecture} {origin}, weights "
            f"{card.weights_sha256[:16]}")  # fmt: skip
        return
    say(
        f"student {card.architecture} from cache {lineage.get('cache_id')} "
        f"(teacher {lineage.get('teacher_id')})"
    )


@main.command("distill-online", context_settings=CONTEXT)
@click.option("--teacher", type=click.Path(), help="Teacher run directory, run on every batch.")
@click.option(
    "--alpha",
    **ALPHA,
    help="Weight of the hard-label term (timm's task_loss_weight).",
)
@click.option("--temperature", **TEMPERATURE, default=None, help="Distillation temperature.")
@feature_options
@training_options
@detection_options
@reports_errors
def distill_online_command(**options: Any) -> None:
    """Online distillation with timm's LogitDistillationTask: the reference for a cache.

    The teacher runs on every training batch (fresh --augment/--mix views),
    which is what a cache avoids paying for. --model, --data, --teacher,
    --alpha, --temperature, --epochs and --out are required, unless --resume.
    """
    card = start_or_resume("distill-online", options, echo)
    click.echo(f"student {card.architecture} distilled online from {options['teacher']}")


def start_or_resume(command: str, options: dict, log: Callable[[str], None]) -> Any:
    """A new run from the options, or with --resume RUN_DIR alone, the unfinished run there."""
    from click.core import ParameterSource
    from kdpipe.models.runs import CONFIG_FILE, is_detection_run
    from kdpipe.train import (
        TrainConfig,
        distill_online,
        resume_training,
        train_student,
        train_teacher,
    )

    context = click.get_current_context()
    detection = ("views", "view_seed", "box_weight", "positive_score", "hard_labels", "ema_decay",
                 "ema_tau")  # fmt: skip
    if str(options.get("data") or "").endswith((".yaml", ".yml")):
        from kdpipe.tasks.detect.runs import teacher_from_options
        from kdpipe.tasks.detect.train import student_from_options

        given = {name: value for name, value in options.items()
                 if context.get_parameter_source(name) == ParameterSource.COMMANDLINE}  # fmt: skip
        if command == "train-teacher":
            return teacher_from_options(given)
        return student_from_options(command, given, log)
    for name in detection:
        if options.pop(name, None) not in (None, False):
            raise click.UsageError(f"{flag(name)} is for detection students (--data DATA.yaml)")
    resume = options.pop("resume")
    if resume is not None:
        given = [
            name
            for name in options
            if context.get_parameter_source(name) == ParameterSource.COMMANDLINE
        ]
        if given:
            flags = ", ".join(flag(name) for name in given)
            raise click.UsageError(f"--resume continues with RUN_DIR/config.json; drop {flags}")
        if is_detection_run(Path(resume), CONFIG_FILE):
            from kdpipe.tasks.detect.runs import read_detection_card
            from kdpipe.tasks.detect.train import resume_detection_student

            return read_detection_card(resume_detection_student(Path(resume), log))
        return resume_training(Path(resume), log=log)
    for name in REQUIRED_TO_START[command]:
        if options[name] is None and not (name == "model" and options.get("pretrained")):
            other = (
                " (or --pretrained SOURCE)" if "pretrained" in options and name == "model" else ""
            )
            raise click.UsageError(
                f"Missing option '{flag(name)}'{other} (required unless --resume)."
            )
    channels = options.pop("channels")
    config = TrainConfig(**options, channels=int(channels) if channels else None)
    train = {
        "train-teacher": train_teacher,
        "train-student": train_student,
        "distill-online": distill_online,
    }[command]
    return train(config, log=log)
