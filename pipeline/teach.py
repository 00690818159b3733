"""Stage one: run the teacher (or an ensemble) once and store its soft labels.

This is the only place where teacher models meet the cache: models come from
run directories (``pipeline.runs``), values go to the store
(``pipeline.cache``), and neither knows about the other.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from pipeline.cache import (
    CacheWriter,
    Manifest,
    TeacherMember,
    derive_cache_id,
    derive_teacher_id,
    read_manifest,
)
from pipeline.cache.format import (
    COMBINE_RULES,
    FORMAT_VERSION,
    PREPROCESSING,
    STATUS_COMPLETE,
    STATUS_WRITING,
    VALUES,
    describe_differences,
)
from pipeline.cache.store import utc_now
from pipeline.data import ImageSet
from pipeline.errors import (
    CacheMismatchError,
    ManifestError,
    NotACacheError,
    OutputExistsError,
    TeacherOutputError,
    UsageError,
)
from pipeline.runs import load_model
from pipeline.runtime import (
    check_channels,
    predict_logits,
    prepare_output,
    resolve_device,
    software_versions,
)


@dataclass(frozen=True, kw_only=True)
class CacheConfig:
    """The settings of one teacher pass (everything but the dataset)."""

    teachers: tuple[str, ...]
    out: str
    temperature: float = 4.0
    combine: str = "mean-probs"
    batch_size: int = 512
    chunk_size: int = 4096
    dtype: str = "float16"
    device: str = "auto"
    overwrite: bool = False

    def validate(self) -> None:
        if not self.teachers:
            raise UsageError("at least one --teacher run directory is needed")
        if not self.temperature > 0:
            raise UsageError(f"--temperature must be > 0, not {self.temperature}")
        if self.combine not in COMBINE_RULES:
            raise UsageError(f"--combine must be one of {', '.join(COMBINE_RULES)}")
        if self.batch_size < 1 or self.chunk_size < 1:
            raise UsageError("--batch-size and --chunk-size must be >= 1")


def combine_members(
    member_logits: Sequence[torch.Tensor], temperature: float, rule: str
) -> torch.Tensor:
    """Log-probabilities of the teacher at temperature T, one row per sample.

    ``mean-probs``: log of the arithmetic mean of the members' softmax(z/T)
    (Hinton et al. 2015); ``mean-logits``: log_softmax of the mean logits / T.
    With one member both are log_softmax(z / T).
    """
    stacked = torch.stack([logits.float() for logits in member_logits])  # (M, N, C)
    if rule == "mean-logits":
        return torch.log_softmax(stacked.mean(0) / temperature, dim=-1)
    logprobs = torch.log_softmax(stacked / temperature, dim=-1)
    return torch.logsumexp(logprobs, dim=0) - math.log(len(member_logits))


def cache_teacher(
    config: CacheConfig, dataset: ImageSet, log: Callable[[str], None] = print
) -> Manifest:
    """Run the teacher(s) over ``dataset`` once and write the cache at ``config.out``."""
    config.validate()
    out = Path(config.out)
    device = resolve_device(config.device)
    members = [load_model(Path(run_dir), device) for run_dir in config.teachers]
    for run_dir, (_, card) in zip(config.teachers, members, strict=True):
        if card.num_classes != dataset.num_classes:
            raise CacheMismatchError(
                f"teacher {run_dir} has {card.num_classes} classes but {dataset.name} has "
                f"{dataset.num_classes}"
            )
        check_channels(f"teacher {run_dir}", card.data, dataset.images)
    teacher_members = [
        TeacherMember(
            architecture=card.architecture,
            weights_sha256=card.weights_sha256,
            param_count=card.param_count,
            model_kwargs=card.model_kwargs,
            num_classes=card.num_classes,
            data_config=card.data_config,
            run_dir=str(run_dir),
        )
        for run_dir, (_, card) in zip(config.teachers, members, strict=True)
    ]
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        status=STATUS_WRITING,
        cache_id="",
        teacher_id=derive_teacher_id(teacher_members, config.combine),
        teachers=tuple(teacher_members),
        combine=config.combine,
        temperature=float(config.temperature),
        values=VALUES,
        preprocessing=PREPROCESSING,
        dataset={
            "name": dataset.name,
            "split": dataset.split,
            "fingerprint": dataset.fingerprint(),
        },
        num_samples=len(dataset),
        num_views=1,
        num_classes=dataset.num_classes,
        dtype=config.dtype,
        chunk_size=min(config.chunk_size, max(len(dataset), 1)),
        array_metadata_sha256={},
        teacher_accuracy=None,
        software=software_versions(),
        created=utc_now(),
        completed=None,
    )
    manifest = replace(manifest, cache_id=derive_cache_id(manifest))

    writer = open_writer(out, manifest, overwrite=config.overwrite, log=log)
    if writer.manifest.status == STATUS_COMPLETE:
        return writer.manifest
    finished = writer.finished_chunks()
    if finished:
        log(f"{out}: resuming, {len(finished)} of {writer.num_chunks} chunks already written")
    progress = tqdm(total=len(dataset), desc="teacher pass", unit="img", disable=None)
    for index in range(writer.num_chunks):
        start = index * manifest.chunk_size
        images = dataset.images[start : start + manifest.chunk_size]
        if index in finished:
            progress.update(len(images))
            continue
        member_logits = [
            predict_logits(model, images, card.data, device=device, batch_size=config.batch_size)
            for model, card in members
        ]
        logprobs = combine_members(member_logits, config.temperature, config.combine)
        bad = (~torch.isfinite(logprobs).all(dim=-1)).nonzero().flatten()
        if len(bad):
            rows = ", ".join(str(start + int(i)) for i in bad[:10])
            more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
            raise TeacherOutputError(
                f"the teacher produced NaN or Inf for sample(s) {rows}{more}; "
                f"{out} is left incomplete"
            )
        writer.write(
            index,
            logprobs.unsqueeze(1).numpy(),
            dataset.labels[start : start + len(images)].numpy(),
        )
        progress.update(len(images))
    progress.close()
    manifest = writer.finish(teacher_accuracy=teacher_accuracy(writer, dataset))
    log(
        f"{out}: {manifest.num_samples} samples x {manifest.num_classes} classes at "
        f"T={manifest.temperature:g}, teacher accuracy {manifest.teacher_accuracy:.4f}, "
        f"cache_id {manifest.cache_id}, teacher_id {manifest.teacher_id}"
    )
    return manifest


def open_writer(
    out: Path, manifest: Manifest, *, overwrite: bool, log: Callable[[str], None]
) -> CacheWriter:
    """A writer for ``out``: new, or resuming a partial cache made with the same arguments.

    A complete cache with the same arguments is left as it is (its writer's
    manifest says ``complete``); anything else at ``out`` is refused unless
    ``overwrite``, naming what differs.
    """
    if out.exists() and not overwrite:
        try:
            existing = read_manifest(out)
        except (NotACacheError, ManifestError) as exc:
            raise OutputExistsError(
                f"{out} already exists and is not a kdpipe cache to resume ({exc}): "
                "choose another path or pass --overwrite"
            ) from None
        differences = describe_differences(existing, manifest)
        if differences:
            raise CacheMismatchError(
                f"{out} holds a cache made with other arguments ({'; '.join(differences)}): "
                "choose another path or pass --overwrite to replace it"
            )
        if existing.status == STATUS_COMPLETE:
            log(f"{out}: already complete (cache_id {existing.cache_id}), nothing to do")
        try:
            return CacheWriter(out, existing, resume=True)
        except KeyError:
            # killed before its arrays were created: no chunk was flagged, start again
            overwrite = True
    prepare_output(out, overwrite)  # inputs are valid: only now touch the output
    return CacheWriter(out, manifest)


def teacher_accuracy(writer: CacheWriter, dataset: ImageSet) -> float | None:
    """Top-1 accuracy of the stored (combined) teacher, read back from the store, so that a
    resumed pass reports the same figure as an uninterrupted one."""
    if not len(dataset):
        return None
    step = writer.manifest.chunk_size
    correct = 0
    for start in range(0, len(dataset), step):
        stored = torch.from_numpy(writer.arrays["logprobs"][start : start + step, 0, :])
        correct += int((stored.float().argmax(-1) == dataset.labels[start : start + step]).sum())
    return correct / len(dataset)
