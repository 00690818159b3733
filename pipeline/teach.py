"""Stage one: run the teacher (or an ensemble) once and store its soft labels.

This is the only place where teacher models meet the cache: models come from
run directories (``pipeline.runs``), values go to the store
(``pipeline.cache``), and neither knows about the other.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
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
from pipeline.cache.location import Location
from pipeline.cache.store import utc_now
from pipeline.data import ImageSet, select_rows
from pipeline.distributed import current_world
from pipeline.errors import (
    CacheMismatchError,
    ManifestError,
    NotACacheError,
    OutputExistsError,
    TeacherOutputError,
    UsageError,
)
from pipeline.models import DataConfig
from pipeline.runs import load_model
from pipeline.runtime import (
    autocast,
    check_channels,
    prepare_output,
    resolve_device,
    resolve_precision,
    software_versions,
)
from pipeline.views import PLAIN, ViewPolicy, sample_views, view_input


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
    precision: str = "auto"  # bf16 autocast on CUDA, float32 on the CPU
    overwrite: bool = False
    # views and the transfer set (issue: consistent teaching)
    views: int = 1
    policy: ViewPolicy = PLAIN
    seed: int = 0
    top_k: int | None = None
    subset: float | None = None
    exclude_classes: tuple[int, ...] = ()
    ignore_labels: bool = False

    def validate(self) -> None:
        if not self.teachers:
            raise UsageError("at least one --teacher run directory is needed")
        if self.views < 1:
            raise UsageError(f"--views must be >= 1, not {self.views}")
        if self.views > 1 and self.policy.is_identity:
            raise UsageError(
                f"--views {self.views} without --augment or --mix would store {self.views} "
                "identical copies: choose an --augment policy or --mix"
            )
        self.policy.validate()
        if self.top_k is not None and self.top_k < 1:
            raise UsageError(f"--top-k must be >= 1, not {self.top_k}")
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
    """Run the teacher(s) over the transfer set's views once and write the cache."""
    config.validate()
    world = current_world()
    if not world.is_main:
        log = _quiet
    out = Location(config.out)  # a folder or an fsspec URL (s3://...)
    device = resolve_device(config.device)
    members = [load_model(Path(run_dir), device) for run_dir in config.teachers]
    labeled = dataset.labeled and not config.ignore_labels
    classes = list(members[0][1].classes)
    for run_dir, (_, card) in zip(config.teachers, members, strict=True):
        if dataset.labeled and card.num_classes != dataset.num_classes:
            raise CacheMismatchError(
                f"teacher {run_dir} has {card.num_classes} classes but {dataset.name} has "
                f"{dataset.num_classes}"
            )
        if card.num_classes != len(classes):
            raise CacheMismatchError(
                f"teacher {run_dir} has {card.num_classes} classes, {config.teachers[0]} has "
                f"{len(classes)}: ensemble members must share their classes"
            )
        check_channels(f"teacher {run_dir}", card.data, dataset.images)
    if config.top_k is not None and config.top_k > len(classes):
        raise UsageError(f"--top-k {config.top_k} is more than the {len(classes)} classes")
    if config.exclude_classes and not labeled:
        raise UsageError("--exclude-classes needs labels (not --ignore-labels or unlabeled data)")
    rows = select_rows(
        dataset.labels,
        subset=config.subset,
        exclude_classes=config.exclude_classes,
        num_classes=len(classes),
        seed=config.seed,
    )
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
        classes=classes,
        transfer={
            "dataset_samples": len(dataset),
            "subset": config.subset,
            "exclude_classes": sorted(config.exclude_classes),
            "labeled": labeled,
        },
        seed=config.seed,
        views=config.policy.to_dict(),
        storage={"kind": "dense" if config.top_k is None else "top-k", "k": config.top_k},
        num_samples=len(rows),
        num_views=config.views,
        num_classes=len(classes),
        dtype=config.dtype,
        chunk_size=min(config.chunk_size, len(rows)),
        array_metadata_sha256={},
        teacher_accuracy=None,
        software=software_versions(),
        created=utc_now(),
        completed=None,
        precision=resolve_precision(device, config.precision),
    )
    manifest = replace(manifest, cache_id=derive_cache_id(manifest))

    # rank 0 creates (or checks) the store; the others open what it made
    opened = world.on_main(
        lambda: open_writer(out, manifest, overwrite=config.overwrite, log=log).manifest
    )
    if opened.status == STATUS_COMPLETE:
        return opened
    writer = CacheWriter(out, read_manifest(out), resume=True)
    params, partners = sample_views(
        len(rows),
        config.views,
        config.policy,
        image_size=tuple(dataset.images.shape[-2:]),
        partner_pool=rows,
        seed=config.seed,
    )
    labels = dataset.labels[torch.from_numpy(rows)] if labeled else torch.full((len(rows),), -1)
    finished = writer.finished_chunks()
    if finished:
        log(f"{out}: resuming, {len(finished)} of {writer.num_chunks} chunks already written")
    # each rank writes whole chunks of its own (a chunk is one object per array; zarr
    # loses data when two processes write parts of one), so any world size, and any
    # world size on resume, writes the same bytes
    mine = world.shares([i for i in range(writer.num_chunks) if i not in finished])
    step = manifest.chunk_size
    progress = tqdm(
        total=sum(len(rows[i * step : (i + 1) * step]) for i in mine) * config.views,
        desc="teacher pass" if not world.active else f"teacher pass, rank {world.rank}",
        unit="view",
        disable=None if world.is_main else True,
    )

    def compute(index: int) -> dict[str, np.ndarray]:
        """Chunk ``index``: the teacher's outputs for every view of its rows, checked."""
        chunk_rows = rows[index * step : (index + 1) * step]
        chunk_params = params[index * step : (index + 1) * step]
        chunk_partners = partners[index * step : (index + 1) * step]
        values = torch.empty(len(chunk_rows), config.views, len(classes))
        for view in range(config.views):
            member_logits = [
                predict_views(
                    model,
                    card.data,
                    dataset.images,
                    chunk_rows,
                    None if config.policy.is_identity else chunk_params[:, view],
                    chunk_partners[:, view],
                    device=device,
                    batch_size=config.batch_size,
                    precision=manifest.precision,
                )
                for model, card in members
            ]
            values[:, view] = combine_members(member_logits, config.temperature, config.combine)
            progress.update(len(chunk_rows))
        bad = (~torch.isfinite(values).all(dim=-1).all(dim=-1)).nonzero().flatten()
        if len(bad):
            samples = ", ".join(str(int(chunk_rows[int(i)])) for i in bad[:10])
            more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
            raise TeacherOutputError(
                f"the teacher produced NaN or Inf for sample(s) {samples}{more}; "
                f"{out} is left incomplete"
            )
        chunk = {
            "labels": labels[index * step : (index + 1) * step].numpy(),
            "indices": chunk_rows,
            "views": chunk_params,
            "partners": chunk_partners,
        }
        if config.top_k is None:
            chunk["logprobs"] = values.numpy()
        else:
            top = values.topk(config.top_k, dim=-1)  # sorted: index 0 is the argmax
            chunk["topk_logprobs"] = top.values.numpy()
            chunk["topk_indices"] = top.indices.numpy()
        return chunk

    # chunk k is written (compressed, checksummed, flushed) by a thread while the teacher
    # computes chunk k+1: the store's I/O hides behind the teacher instead of adding to it
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdpipe-writer") as pool:
        pending: Future | None = None
        for index in mine:
            chunk = compute(index)
            if pending is not None:
                pending.result()  # one chunk in flight at most: memory stays bounded
            pending = pool.submit(writer.write, index, chunk)
        if pending is not None:
            pending.result()
    progress.close()
    world.barrier()  # every rank's chunks are flagged: only now may the cache be complete
    manifest = world.on_main(
        lambda: writer.finish(teacher_accuracy=teacher_accuracy(writer) if labeled else None)
    )
    accuracy = (
        f"teacher accuracy {manifest.teacher_accuracy:.4f}"
        if manifest.teacher_accuracy is not None
        else "no labels"
    )
    log(
        f"{out}: {manifest.num_samples} rows x {manifest.num_views} view(s) x "
        f"{manifest.num_classes} classes at T={manifest.temperature:g}, {accuracy}, "
        f"cache_id {manifest.cache_id}, teacher_id {manifest.teacher_id}"
    )
    return manifest


def _to_host(values: torch.Tensor) -> torch.Tensor:
    if values.device.type != "cuda":
        return values.cpu()
    host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
    return host.copy_(values, non_blocking=True)


def _quiet(line: str) -> None:
    """The log of ranks other than 0: one process speaks for all."""


@torch.inference_mode()
def predict_views(
    model: nn.Module,
    data_config: DataConfig,
    images: torch.Tensor,
    rows: np.ndarray,
    params: np.ndarray | None,
    partners: np.ndarray,
    *,
    device: torch.device,
    batch_size: int = 512,
    precision: str = "float32",
) -> torch.Tensor:
    """float32 logits ``(len(rows), C)`` of one view per row (``params`` None: plain images).

    The input of each view comes from :func:`pipeline.views.view_input`, the
    function the student's training loop calls with the same parameters.
    """
    model.eval()
    outputs = []
    for start in range(0, len(rows), batch_size):
        batch = torch.from_numpy(rows[start : start + batch_size])
        view_params = partner_images = None
        if params is not None:
            view_params = torch.from_numpy(params[start : start + batch_size])
            partner_index = torch.from_numpy(partners[start : start + batch_size])
            if bool((partner_index >= 0).any()):
                partner_images = images[partner_index.clamp_min(0)]
        inputs = view_input(images[batch], view_params, partner_images, data_config, device)
        with autocast(device, "bf16" if precision == "bfloat16" else "fp32"):
            logits = model(inputs)
        # to the CPU without a sync per batch: pinned memory, non-blocking copy
        outputs.append(_to_host(logits.float()))
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()  # the copies above have landed
    return torch.cat(outputs) if outputs else torch.empty(0)


def open_writer(
    out: Location, manifest: Manifest, *, overwrite: bool, log: Callable[[str], None]
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


def teacher_accuracy(writer: CacheWriter) -> float | None:
    """Top-1 accuracy of the stored (combined) teacher over every view, read back from the
    store, so that a resumed pass reports the same figure as an uninterrupted one.

    A mixed view counts as right when the teacher's top class is the label of the
    sample with the larger share of the mix.
    """
    manifest = writer.manifest
    arrays = writer.arrays
    step = manifest.chunk_size
    indices = arrays["indices"][:]
    labels = arrays["labels"][:]
    label_of = np.full(manifest.transfer["dataset_samples"], -1, dtype=np.int64)
    label_of[indices] = labels
    correct = total = 0
    for start in range(0, manifest.num_samples, step):
        if manifest.top_k is None:
            top = arrays["logprobs"][start : start + step].argmax(-1)
        else:
            top = arrays["topk_indices"][start : start + step][..., 0]
        lam = arrays["views"][start : start + step][..., 5]
        partners = arrays["partners"][start : start + step]
        own = labels[start : start + step, None]
        # a partner outside the labeled rows (never, for kdpipe's own caches) counts as -1
        partner_labels = np.where(partners >= 0, label_of[np.clip(partners, 0, None)], -1)
        target = np.where(lam >= 0.5, np.broadcast_to(own, top.shape), partner_labels)
        correct += int((top == target).sum())
        total += top.size
    return correct / total if total else None
