"""The run entry points: train a teacher, a student from a cache, a student online, or
resume an unfinished run. Each validates, plans (:mod:`kdpipe.train.plan`), creates
the model and the run directory, fits (:mod:`kdpipe.train.loop`) and writes the
model card that marks the run finished."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import torch
from kdpipe.base.distributed import World, current_world
from kdpipe.base.errors import CacheMismatchError, ManifestError, UsageError
from kdpipe.base.runtime import prepare_output, quiet, software_versions
from kdpipe.base.spec import check_keys
from kdpipe.cache import SoftLabels, StreamedSoftLabels, open_soft_labels, utc_now
from kdpipe.models.pretrained import source_architecture
from kdpipe.models.registry import create_model, param_count, resolve_model_kwargs, weights_sha256
from kdpipe.models.runs import (
    CONFIG_FILE,
    RUN_FORMAT_VERSION,
    ModelCard,
    read_config,
    save_model,
    write_json,
)
from kdpipe.train.checkpoint import refuse_finished, remove_checkpoint
from kdpipe.train.config import LEGACY_DEFAULTS, TrainConfig
from kdpipe.train.loop import early_stop, feature_term, fit
from kdpipe.train.plan import KINDS, RunPlan, plan_run
from torch import nn


def train_teacher(config: TrainConfig, log: Callable[[str], None] = quiet) -> ModelCard:
    """Train a model on hard labels and save it as a teacher run directory."""
    config.validate()
    if config.cache is not None or config.teacher is not None:
        raise UsageError("train-teacher learns from labels; --cache is for train-student")
    if config.pretrained is not None:
        architecture = source_architecture(config.pretrained)
        if config.model not in (None, architecture):
            raise UsageError(f"--pretrained {config.pretrained} is a {architecture}, not "
                             f"--model {config.model}: give one of them")  # fmt: skip
        config = replace(config, model=architecture)
    elif config.model is None:
        raise UsageError("train-teacher needs --model ARCH or --pretrained SOURCE")
    return _run(config, "teacher", None, log)


def train_student(config: TrainConfig, log: Callable[[str], None] = quiet) -> ModelCard:
    """Train a student from a cache: α·CE + (1−α)·T²·KL, never loading the teacher."""
    config.validate()
    if config.cache is None:
        raise UsageError("train-student needs --cache (a cache written by cache-teacher)")
    soft_labels = open_soft_labels(config.cache, config.cache_memory, log)
    return _run(config, "student", soft_labels, log)


def distill_online(config: TrainConfig, log: Callable[[str], None] = quiet) -> ModelCard:
    """Online distillation through timm's ``LogitDistillationTask``: the teacher runs on
    every batch. The reference that a cache is compared with, not kdpipe's way."""
    config.validate()
    if config.teacher is None or config.cache is not None:
        raise UsageError("distill-online needs --teacher (a run directory) and no --cache")
    return _run(config, "online-student", None, log)


def resume_training(run_dir: Path, log: Callable[[str], None] = quiet) -> ModelCard:
    """Continue an unfinished run from its last epoch checkpoint, with its saved config."""
    run_dir = Path(run_dir)
    refuse_finished(run_dir)
    saved = read_config(run_dir)
    kind = saved.pop("kind", None)
    if kind == "qat-student":
        raise UsageError(
            f"{run_dir} is an unfinished QAT run: kdpipe qat does not resume; run it again "
            "with --overwrite"
        )
    resolved = saved.pop("resolved", None) or {}
    # a run started before an option existed resumes with that option's default
    try:
        check_keys(saved, TrainConfig, str(run_dir / CONFIG_FILE))
    except ManifestError as exc:
        raise ManifestError(f"{run_dir / CONFIG_FILE} is not a kdpipe training configuration "
                            f"({exc})") from None  # fmt: skip
    if kind not in KINDS:
        raise ManifestError(f"{run_dir / CONFIG_FILE} is not a kdpipe training configuration "
                            f"(kind {kind!r})")  # fmt: skip
    # an option whose default changed: an older config.json meant the old behaviour
    saved = {**{k: v for k, v in LEGACY_DEFAULTS.items() if k not in saved}, **saved}
    # JSON has no tuples: the tuple fields (hidden_sizes, crop_scale) come back as lists
    saved = {name: tuple(v) if isinstance(v, list) else v for name, v in saved.items()}
    # a run directory is relocatable: it resumes where it is now (a copy resumes the copy,
    # a moved run the moved one), and its relative inputs are found from where it started
    saved = _relocated(saved, run_dir, Path(resolved.get("cwd", ".")))
    config = TrainConfig(**saved)
    config.validate()
    soft_labels = (
        open_soft_labels(config.cache, config.cache_memory, log) if kind == "student" else None
    )
    return _run(config, kind, soft_labels, log, resume=True)


def _relocated(saved: dict, run_dir: Path, started_in: Path) -> dict:
    """The saved configuration with ``out`` the run directory as named now, and each relative
    input path that is not found from here taken from the folder the run started in."""
    moved = {"out": str(run_dir)}
    for name in ("cache", "teacher", "data", "data_root"):
        value = saved.get(name)
        if not value or "://" in str(value) or Path(value).is_absolute() or Path(value).exists():
            continue
        if (started_in / value).exists():
            moved[name] = str(started_in / value)
    return {**saved, **moved}


def _run(
    config: TrainConfig,
    kind: str,
    soft_labels: SoftLabels | StreamedSoftLabels | None,
    log: Callable[[str], None],
    resume: bool = False,
) -> ModelCard:
    """Shared body of the entry points: plan, model, run directory, fit, model card."""
    world = current_world()
    if not world.is_main:
        log = quiet
    plan = plan_run(config, kind, soft_labels, log, world)
    torch.manual_seed(config.seed)
    if plan.pretrained is not None:
        model = plan.pretrained.model  # a new head for the dataset's classes, timm's way
        model.reset_classifier(len(plan.classes))
    else:
        model = create_model(
            config.model,
            num_classes=len(plan.classes),
            data_config=plan.data_config,
            drop_rate=config.drop_rate,
            model_kwargs=config.model_kwargs(),
        )
    feature = feature_term(model, plan)  # its projector's weights drawn after the model's
    out = Path(config.out)
    if resume:  # every rank: each refuses alike, before any work
        check_same_inputs(out, plan, log)
    else:
        world.on_main(_start, out, plan, world)
    rows = fit(model, plan, out, resume=resume, log=log, world=world, feature=feature)
    card = world.on_main(_finish, out, model, plan, rows)
    teacher_accuracy = None if soft_labels is None else soft_labels.manifest.teacher_accuracy
    note = chance_note(card, teacher_accuracy, config.lr)
    if note:
        log(note)
    return card


def chance_note(card: ModelCard, teacher_accuracy: float | None, lr: float) -> str | None:
    """A warning when a student ends near chance while its teacher is well above it: the
    run finished, but learned nothing (a loss that exploded, then stuck, below the
    divergence guard's bar); None when the result is not that."""
    result, classes = card.result, card.num_classes
    if result is None or teacher_accuracy is None or classes < 2:
        return None
    chance = 1 / classes
    student = result["test_accuracy"]
    if student > chance + 0.1 * (1 - chance) or teacher_accuracy < chance + 0.5 * (1 - chance):
        return None
    return (
        f"warning: the student's test accuracy {student:.4f} is at chance ({classes} "
        f"classes: {chance:.4f}) while its teacher's is {teacher_accuracy:.4f} on the "
        "cache: it learned nothing; see metrics.csv for a loss that grew, then clip the "
        f"gradient (--clip-grad 1) or lower --lr (was {lr:g})"
    )


# what each input of input_ids is called in a refusal, and the option that names it
_INPUTS = {"cache": "--cache", "teacher": "teacher", "data": "--data",
           "test data": "--data (test split)", "pretrained": "--pretrained"}  # fmt: skip


def input_ids(plan: RunPlan) -> dict[str, str]:
    """The identity of every input the run learns from, as its own records give it: the
    cache's ``cache_id`` and ``teacher_id``, an online teacher's weights hash, a
    pretrained start's weights hash, the training and test splits' fingerprints. Stored
    in ``config.json`` at the start, so that a resumed run learns from the same ones."""
    lineage = plan.lineage or {}
    ids = {"data": plan.train_set.fingerprint()["sha256"]}
    if plan.test_set is not None:
        ids["test data"] = plan.test_set.fingerprint()["sha256"]
    if "cache_id" in lineage:
        ids["cache"], ids["teacher"] = lineage["cache_id"], lineage["teacher_id"]
    if "teacher_weights_sha256" in lineage:
        ids["teacher"] = lineage["teacher_weights_sha256"]
    if plan.pretrained is not None:
        ids["pretrained"] = plan.pretrained.source["weights_sha256"]
    return ids


def check_same_inputs(out: Path, plan: RunPlan, log: Callable[[str], None]) -> None:
    """Refuse to resume a run on other inputs than it started with (a cache remade at the
    same path, other data, another teacher): the epochs before and after would have
    learned from two sources while the model card names only the second."""
    started = (read_config(out).get("resolved") or {}).get("inputs")
    if started is None:
        log(f"{out} was started before kdpipe recorded its inputs' ids: they are not checked")
        return
    now = input_ids(plan)
    changed = [
        f"{name} ({_INPUTS.get(name, name)}) was {started.get(name)}, is now {now.get(name)}"
        for name in sorted(set(started) | set(now))
        if started.get(name) != now.get(name)
    ]
    if changed:
        raise CacheMismatchError(
            f"{out} cannot resume on other inputs than it started with: {'; '.join(changed)}; "
            "give it back the inputs it started with, or start again with --overwrite"
        )


def _start(out: Path, plan: RunPlan, world: World) -> None:
    """The run directory and its config.json: only now, every input being valid."""
    prepare_output(out, plan.config.overwrite, plan.inputs)
    out.mkdir(parents=True)
    resolved = {"device": str(plan.device), "temperature": plan.temperature,
                "alpha": plan.alpha, "processes": world.size,
                "schedule": plan.config.schedule_record(plan.updates_per_epoch),
                "cwd": os.getcwd(),  # relative paths above are relative to it
                "inputs": input_ids(plan)}  # what --resume must find again  # fmt: skip
    write_json(out / CONFIG_FILE, {**asdict(plan.config), "kind": plan.kind, "resolved": resolved})


def final_result(rows: list[dict], selection: dict | None) -> dict | None:
    """The kept epoch's test result (the last epoch's, or early stopping's choice), for the
    model card: the run's own record of its result, kept beside metrics.csv."""
    kept = (selection or {}).get("kept_epoch") or rows[-1]["epoch"]
    row = next((r for r in rows if r["epoch"] == kept), None)
    if row is None or row.get("test_errors") is None or row["test_errors"] != row["test_errors"]:
        return None  # no test split scored (an unlabeled one)
    return {"epoch": int(kept), "test_accuracy": float(row["test_accuracy"]),
            "test_errors": int(row["test_errors"])}  # fmt: skip


def _finish(out: Path, model: nn.Module, plan: RunPlan, rows: list[dict]) -> ModelCard:
    """The model card and weights that mark a run complete; its resume state goes."""
    config, data_config = plan.config, plan.data_config
    selection = None
    if config.early_stopping is not None:
        epochs_run = int(rows[-1]["epoch"])
        selection = {
            "rule": "fewest validation errors",
            "kept_epoch": early_stop(rows, config.early_stopping)[0],
            "epochs_run": epochs_run,
            "stopped_early": epochs_run < config.epochs,
        }
    model = model.cpu().to(memory_format=torch.contiguous_format)
    card = ModelCard(
        format_version=RUN_FORMAT_VERSION,
        kind=plan.kind,
        architecture=config.model,
        model_kwargs=resolve_model_kwargs(
            config.model,
            data_config,
            {**(plan.pretrained.model_kwargs if plan.pretrained else {}), **config.model_kwargs()},
        ),
        num_classes=len(plan.classes),
        in_chans=data_config.input_size[0],
        classes=list(plan.classes),
        data_config=data_config.to_dict(),
        weights_sha256=weights_sha256(model),
        param_count=param_count(model),
        dataset={
            **plan.train_set.record(),  # name, split, fingerprint and, for files, decode
            "rows": len(plan.data),
            "validation_rows": 0 if plan.validation is None else len(plan.validation),
        },
        lineage=plan.lineage,
        selection=selection,
        created=utc_now(),
        software=software_versions(),
        source=None if plan.pretrained is None else dict(plan.pretrained.source),
        result=final_result(rows, selection),
    )
    save_model(out, model, card)
    remove_checkpoint(out)
    return card
