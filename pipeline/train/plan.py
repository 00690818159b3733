"""The run plan: everything a run decides before its first step, decided once.

:func:`plan_run` loads the training split, picks the training rows (all, a
``--subset``, or a cache's transfer set), checks a cache or an online teacher
against the data, resolves the loss's α and T, holds out validation rows, and
records the lineage. The loop and the model card read the plan; none of them
decides these again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from kdpipe.base.distributed import World
from kdpipe.base.errors import CacheMismatchError, DatasetError, UsageError
from kdpipe.base.runtime import resolve_device
from kdpipe.cache import CachedLayer, SoftLabels, StreamedSoftLabels
from kdpipe.data.datasets import (
    ImageSet,
    check_classes,
    check_same_dataset,
    class_mismatch,
    decode_options,
    has_split,
    select_rows,
    source_folder,
    take_rows,
    validation_rows,
)
from kdpipe.data.shards import is_shard_spec
from kdpipe.models.pretrained import Pretrained, create_pretrained, read_data_config
from kdpipe.models.runs import ModelCard, load_model
from kdpipe.train.batches import TrainData
from kdpipe.train.config import TrainConfig
from kdpipe.train.step import probe
from kdpipe.views.features import LayerRequest, resolve_layer
from kdpipe.views.inputs import DataConfig, size_note
from torch import nn

KINDS = ("teacher", "student", "online-student")


@dataclass(frozen=True)
class RunPlan:
    """A training run, resolved: its data, splits, loss weights and lineage."""

    config: TrainConfig
    kind: str  # teacher, student (from a cache) or online-student
    device: torch.device
    train_set: ImageSet
    classes: tuple[str, ...]
    data: TrainData  # the training rows, with their soft targets and views
    validation: ImageSet | None  # held-out training rows (--val-fraction)
    test_set: ImageSet | None  # scored each evaluation, when it has labels
    data_config: DataConfig  # the model's input: the training split's shape and statistics
    alpha: float  # weight of the hard-label term, as the loss uses it
    temperature: float
    lineage: dict | None  # what a student learned from: None for a teacher
    online_teacher: nn.Module | None = None
    inputs: tuple[str, ...] = ()  # files the run reads: its output may not touch them
    teacher_layer: CachedLayer | None = None  # the cached layer of --feature-loss
    pretrained: Pretrained | None = None  # train-teacher --pretrained: the starting weights

    @property
    def updates_per_epoch(self) -> int:
        """Optimizer updates an epoch makes (the last batch may be short): what a schedule
        stepped per update counts in. Every process steps on every batch (torchrun)."""
        return -(-len(self.data) // self.config.batch_size)


def plan_run(
    config: TrainConfig,
    kind: str,
    soft_labels: SoftLabels | StreamedSoftLabels | None,
    log: Callable[[str], None],
    world: World,
) -> RunPlan:
    """Resolve a run from its configuration, checking every input before anything is
    written."""
    if world.active and config.teacher is not None:
        raise UsageError("distill-online runs in one process (it is the reference, not a "
                         "scaled path); start it without torchrun")  # fmt: skip
    device = resolve_device(config.device)
    config = _decoded_as_recorded(config, soft_labels)
    train_set = config.load("train")
    if train_set.decode is not None:  # what config.json records: the test split, a resume
        decode = train_set.decode
        config = replace(config, image_size=tuple(decode["size"]), channels=decode["channels"],
                         resize=decode["resize"])  # fmt: skip
    data = TrainData.plain(train_set, config.policy)
    if config.subset is not None:
        data = _subset(config, data, train_set, soft_labels)
    classes, alpha, temperature = train_set.classes, config.alpha, config.temperature or 1.0
    lineage = online_teacher = teacher_layer = None
    if soft_labels is not None:
        data, classes, alpha = cache_data(config, soft_labels, train_set, log)
        temperature = config.temperature or soft_labels.manifest.temperature
        lineage = _cache_lineage(soft_labels, temperature, alpha)
        teacher_layer = _teacher_layer(config, soft_labels, world)
        if teacher_layer is not None:  # the teacher's layer for each row and view, as cached
            data = replace(data, layer_targets=soft_labels.features[teacher_layer.array])
    elif config.teacher is not None:
        online_teacher, teacher_card = load_model(Path(config.teacher), device)
        _check_online_teacher(config, teacher_card, train_set)
        teacher_layer = online_layer(online_teacher, teacher_card, config)
        lineage = {
            "online_teacher": config.teacher,
            "teacher_weights_sha256": teacher_card.weights_sha256,
            "temperature": temperature,
            "alpha": alpha,
        }
    elif not train_set.labeled:
        raise DatasetError(f"{config.data} train has no labels: a teacher needs labels to learn")
    else:
        alpha = 1.0  # no soft targets: the loss is the cross-entropy alone
    validation = None
    if config.val_fraction is not None:
        data, validation = _hold_out(data, train_set, config, soft_labels)
    test_set = _load_test_set(config, classes, log)
    mean, std = train_set.pixel_stats()
    input_size = train_set.input_size
    if config.input_size is not None:  # the model's own size: views rendered at it
        input_size = (input_size[0], config.input_size, config.input_size)
    data_config = DataConfig(input_size=input_size, mean=mean, std=std)
    pretrained = _pretrained(config, kind, train_set)
    if pretrained is not None:  # the weights' own preprocessing, not the dataset's statistics
        data_config = pretrained.data_config
        note = size_note(f"--pretrained {config.pretrained}", data_config, input_size[1:],
                         "--data-config FILE.json")  # fmt: skip
        for warning in (*pretrained.warnings, *([note] if note else [])):
            log(warning)
    if online_teacher is not None and teacher_card.data.input_size != data_config.input_size:
        raise UsageError(
            f"timm's LogitDistillationTask feeds the teacher the student's input: the teacher "
            f"takes {teacher_card.data.input_size}, the data is {data_config.input_size}"
        )
    inputs = [config.cache, config.teacher, config.weights, source_folder(train_set)]
    if soft_labels is not None:  # the cache's teachers: a student written over one destroys it
        inputs += [member.run_dir for member in soft_labels.manifest.teachers]
    return RunPlan(config=config, kind=kind, device=device, train_set=train_set,
                   classes=tuple(classes), data=data, validation=validation, test_set=test_set,
                   data_config=data_config, alpha=alpha, temperature=temperature,
                   lineage=lineage, online_teacher=online_teacher,
                   inputs=tuple(str(p) for p in inputs if p is not None),
                   teacher_layer=teacher_layer, pretrained=pretrained)  # fmt: skip


def _decoded_as_recorded(
    config: TrainConfig, soft: SoftLabels | StreamedSoftLabels | None
) -> TrainConfig:
    """The configuration with each decode setting not given taken from what the data was
    decoded with before: the cache's manifest (a student), or the online teacher's model
    card where it was trained on the same ``--data`` (distill-online); one given and
    different is a one-line error naming both values."""
    if soft is not None:
        record, what = soft.manifest.dataset, str(soft.path)
    elif config.teacher is not None and (Path(config.teacher) / "model.json").is_file():
        from kdpipe.models.runs import read_card

        record, what = read_card(Path(config.teacher)).dataset, f"teacher {config.teacher}"
        if record.get("name") != config.data:
            return config
    else:
        return config
    decode = decode_options(record, what, image_size=config.image_size,
                            channels=config.channels, resize=config.resize)  # fmt: skip
    return replace(config, **decode)


def _pretrained(config: TrainConfig, kind: str, train_set: ImageSet) -> Pretrained | None:
    """The pretrained model a teacher starts from (``--pretrained SOURCE [--weights FILE]``),
    taking the dataset's channels (timm adapts the first convolution)."""
    if config.pretrained is None:
        return None
    if kind != "teacher":
        raise UsageError("--pretrained starts a teacher (train-teacher); a student learns "
                         "from a cache")  # fmt: skip
    return create_pretrained(
        config.pretrained,
        weights=None if config.weights is None else Path(config.weights),
        in_chans=train_set.input_size[0],
        drop_rate=config.drop_rate,
        data_config=None
        if config.data_config is None
        else read_data_config(Path(config.data_config)),
    )


def _subset(
    config: TrainConfig,
    data: TrainData,
    train_set: ImageSet,
    soft_labels: SoftLabels | StreamedSoftLabels | None,
) -> TrainData:
    """The ``--subset`` rows of the training split (the rows cache-teacher --subset picks)."""
    if soft_labels is not None:
        raise UsageError(
            f"{soft_labels.path} defines the training rows: --subset is for training "
            "without a cache (cache-teacher --subset picks a cache's rows)"
        )
    rows = torch.from_numpy(
        select_rows(
            train_set.labels,
            subset=config.subset,
            num_classes=train_set.num_classes,
            seed=config.subset_seed,
        )
    )
    return replace(data, rows=rows, labels=train_set.labels[rows])


def _cache_lineage(soft: SoftLabels | StreamedSoftLabels, temperature: float, alpha: float) -> dict:
    manifest = soft.manifest
    return {
        "cache_id": manifest.cache_id,
        "teacher_id": manifest.teacher_id,
        "cache_path": str(soft.path),
        "teacher_runs": [member.run_dir for member in manifest.teachers],
        "cache_temperature": manifest.temperature,
        "temperature": temperature,
        "alpha": alpha,
        "views": manifest.num_views,
        "rows": manifest.num_samples,
    }


def _teacher_layer(
    config: TrainConfig, soft: SoftLabels | StreamedSoftLabels, world: World
) -> CachedLayer | None:
    """The cached layer ``--feature-loss`` learns from, or a clear line on why there is
    none: the teacher is never loaded, so the layer must be in the cache."""
    if config.feature_loss is None:
        return None
    kind = "attention" if config.feature_loss == "attention" else "features"
    manifest = soft.manifest
    if not manifest.features:
        raise UsageError(f"--feature-loss {config.feature_loss}: {soft.path} holds no cached "
                         "layers; make one with cache-teacher --features NAME (or --attention "
                         "NAME for attention)")  # fmt: skip
    layer = manifest.layer(kind, config.teacher_layer)
    if layer is None:
        raise UsageError(f"--teacher-layer {config.teacher_layer}: {soft.path} has no cached "
                         f"{kind} of that layer (--feature-loss {config.feature_loss}); it "
                         f"has {manifest.describe_layers()}")  # fmt: skip
    if isinstance(soft, StreamedSoftLabels):
        raise UsageError("--feature-loss reads the cached layers whole: raise --cache-memory "
                         "so that the cache fits, or drop it")  # fmt: skip
    if world.active:
        raise UsageError("--feature-loss trains its projector in one process: start it "
                         "without torchrun")  # fmt: skip
    return layer


def online_layer(teacher: nn.Module, card: ModelCard, config: TrainConfig) -> CachedLayer | None:
    """The layer ``--feature-loss`` taps from the teacher at every step of distill-online,
    described as a cache would record it (its whole output: nothing is pooled), so that the
    online and the cached feature terms are the same computation."""
    if config.feature_loss is None:
        return None
    kind = "attention" if config.feature_loss == "attention" else "features"
    name = resolve_layer(teacher, config.teacher_layer, f"teacher {config.teacher}")
    request = LayerRequest(name, kind)
    shape = probe(teacher, request, card.data.input_size)
    return request.record(shape, spatial=len(shape) == 3)


def _check_online_teacher(config: TrainConfig, card: ModelCard, train_set: ImageSet) -> None:
    # a pretrained teacher imported without --classes knows its classes by index only
    if card.num_classes != train_set.num_classes:
        raise CacheMismatchError(f"teacher {config.teacher} has {card.num_classes} classes "
                                 f"but {config.data} has {train_set.num_classes}")  # fmt: skip
    if card.classes:
        check_classes(card.classes, train_set.classes, f"teacher {config.teacher}",
                      f"{config.data} (train)")  # fmt: skip
    if not train_set.labeled:
        raise UsageError("distill-online needs labels (timm's task always has a CE term)")


def cache_data(
    config: TrainConfig,
    soft: SoftLabels | StreamedSoftLabels,
    train_set: ImageSet,
    log: Callable[[str], None],
) -> tuple[TrainData, tuple[str, ...], float]:
    """The training rows of a cache, checked against the dataset: (data, classes, alpha)."""
    manifest = soft.manifest
    check_same_dataset(manifest.dataset, train_set, str(soft.path))
    if train_set.classes:  # the teacher's names (cached before teachers were compared)
        check_classes(manifest.classes, train_set.classes, f"{soft.path} (its teacher)",
                      f"{config.data} (train)")  # fmt: skip
    indices = soft.indices
    if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= len(train_set)):
        raise CacheMismatchError(
            f"{soft.path}: row indices outside the dataset's 0..{len(train_set) - 1}"
        )
    if manifest.labeled and not torch.equal(soft.labels, train_set.labels[indices]):
        raise CacheMismatchError(
            f"{soft.path}: stored labels differ from the dataset's at its rows"
        )
    if soft.has_views and (not config.policy.is_identity or config.jitter):
        raise UsageError(
            f"{soft.path} holds augmented views ({manifest.views['augment']}, mix "
            f"{manifest.views['mix']}): the student replays them, so --augment, --mix and "
            "--jitter must stay off"
        )
    if not soft.has_views and not config.policy.is_identity and config.alpha < 1:
        log(
            f"note: {soft.path} holds the teacher's outputs for the plain images: with --augment "
            "or --mix the student sees views the teacher never labelled (inconsistent teaching, "
            "Beyer et al. 2022); cache-teacher --views N --augment ... makes consistent ones"
        )
    alpha = config.alpha
    if not manifest.labeled and alpha != 0.0:
        log(
            f"note: {soft.path} has no labels (an unlabeled transfer set): --alpha {alpha:g} "
            "becomes 0, the student learns from the teacher alone"
        )
        alpha = 0.0
    targets = soft.log_probs(config.temperature) if alpha < 1 else None
    data = TrainData.cached(train_set, soft, targets, config.policy)
    return data, tuple(manifest.classes), alpha


def _hold_out(
    data: TrainData, train_set: ImageSet, config: TrainConfig, soft: SoftLabels | None
) -> tuple[TrainData, ImageSet]:
    """Training rows without the validation split, and the split itself (with its labels)."""
    if not train_set.labeled or (soft is not None and not soft.manifest.labeled):
        raise UsageError("--val-fraction scores held-out rows against their labels: "
                         "this transfer set has none")  # fmt: skip
    held_out = torch.from_numpy(validation_rows(len(train_set), config.val_fraction))
    kept = data.without(held_out)
    if not len(kept):
        raise UsageError(
            f"--val-fraction {config.val_fraction} holds out every training row of this "
            "transfer set"
        )
    validation = ImageSet(
        train_set.name,
        "validation",
        take_rows(train_set.images, held_out),
        train_set.labels[held_out],
        train_set.classes,
    )
    return kept, validation


def _load_test_set(
    config: TrainConfig, classes: tuple[str, ...], log: Callable[[str], None]
) -> ImageSet | None:
    """The test split to report on each epoch. An image folder may have no test/ folder (or
    shards no test-*.tar), or one without labels: then there is nothing to score, and the
    run says so. A test split that is there but cannot be read (a damaged image, a class
    train/ lacks) is an error, never skipped."""
    if not has_split(config.data, "test"):
        missing = "test shards (test-*.tar)" if is_shard_spec(config.data) else "test/ folder"
        log(f"note: {config.data} has no {missing}: no test accuracy will be measured")
        return None
    test_set = config.load("test")
    if not test_set.labeled:
        log(f"note: {Path(config.data) / 'test'} has no class folders (no labels): no test "
            "accuracy is measured")  # fmt: skip
        return None
    differ = class_mismatch(test_set.classes, classes, f"{config.data} (test)", "the model")
    if differ is not None:
        raise DatasetError(differ)
    return test_set
