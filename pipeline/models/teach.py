"""Stage one: run the teacher (or an ensemble) once and store its soft labels.

This is where a teacher meets the cache: the teacher is loaded and run by
:mod:`kdpipe.models.teacher`, values go to the store (:mod:`kdpipe.cache`), and
neither knows about the other.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO

import numpy as np
import torch
from kdpipe.base.distributed import World, current_world
from kdpipe.base.errors import (
    CacheMismatchError,
    ManifestError,
    NotACacheError,
    OutputExistsError,
    TeacherOutputError,
    UsageError,
)
from kdpipe.base.outputs import CACHE
from kdpipe.base.runtime import (
    check_disjoint,
    kill_point,
    prepare_output,
    quiet,
    resolve_device,
    software_versions,
)
from kdpipe.cache import (
    COMBINE_RULES,
    FORMAT_VERSION,
    STATUS_COMPLETE,
    STATUS_WRITING,
    UNIFORM_SHARE,
    VALUES,
    CachedLayer,
    CacheWriter,
    DetectionManifest,
    Layout,
    Location,
    Manifest,
    derive_cache_id,
    derive_teacher_id,
    describe_differences,
    layout_for,
    preprocessing_for,
    read_cache_manifest,
    read_manifest,
    stored_teacher_accuracy,
    temperature_problem,
    utc_now,
)
from kdpipe.data.datasets import ImageSet, select_rows, source_folder
from kdpipe.models.teacher import Teacher, load_teacher
from kdpipe.views.features import LayerRequest, LayerTaps
from kdpipe.views.inputs import resolve_precision, size_note
from kdpipe.views.policy import PLAIN, ViewPolicy, sample_views
from tqdm.auto import tqdm


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
    # intermediate outputs cached beside the logits (issue 16): layer names of the teacher
    features: tuple[str, ...] = ()
    attention: tuple[str, ...] = ()
    feature_grid: int | None = None  # spatial maps average-pooled to G x G

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
        problem = temperature_problem(self.temperature)
        if problem:
            raise UsageError(problem)
        if self.combine not in COMBINE_RULES:
            raise UsageError(f"--combine must be one of {', '.join(COMBINE_RULES)}")
        if self.batch_size < 1 or self.chunk_size < 1:
            raise UsageError("--batch-size and --chunk-size must be >= 1")


def cache_teacher(
    config: CacheConfig, dataset: ImageSet, log: Callable[[str], None] = print
) -> Manifest:
    """Run the teacher(s) over the transfer set's views once and write the cache."""
    config.validate()
    world = current_world()
    if not world.is_main:
        log = quiet
    out = Location(config.out)  # a folder or an fsspec URL (s3://...)
    device = resolve_device(config.device)
    teacher = load_teacher(config.teachers, device)
    teacher.check(dataset)
    for source, card in zip(teacher.sources, teacher.cards, strict=True):
        note = size_note(f"teacher {source}", card.data, dataset.input_size[1:],
                         "import-teacher --input-size or --data-config")  # fmt: skip
        if note:
            log(note)
    requests = teacher.layer_requests(config.features, config.attention, config.feature_grid)
    layers = teacher.layer_records(requests, device)
    check_disjoint(out, [*config.teachers, source_folder(dataset)])
    layout = layout_for(config.top_k, teacher.num_classes)
    labeled = dataset.labeled and not config.ignore_labels
    if config.exclude_classes and not labeled:
        raise UsageError("--exclude-classes needs labels (not --ignore-labels or unlabeled data)")
    rows = select_rows(
        dataset.labels,
        subset=config.subset,
        exclude_classes=config.exclude_classes,
        num_classes=teacher.num_classes,
        seed=config.seed,
    )
    manifest = _new_manifest(config, dataset, teacher, layout, rows, labeled, device, layers)
    with single_writer(out, world):
        manifest, wrote = _pass(config, out, manifest, teacher, layout, dataset, rows, labeled,
                                device, world, log, requests)  # fmt: skip
    if not wrote:
        return manifest  # complete already: open_writer said so
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


def _pass(
    config: CacheConfig,
    out: Location,
    manifest: Manifest,
    teacher: Teacher,
    layout: Layout,
    dataset: ImageSet,
    rows: np.ndarray,
    labeled: bool,
    device: torch.device,
    world: World,
    log: Callable[[str], None],
    requests: list[LayerRequest],
) -> tuple[Manifest, bool]:
    """Open (or resume) the store, write every chunk still to write, mark it complete:
    (the manifest, whether anything was written)."""
    # rank 0 creates (or checks) the store; the others open what it made
    opened = world.on_main(
        lambda: open_writer(out, manifest, overwrite=config.overwrite, log=log).manifest
    )
    if opened.status == STATUS_COMPLETE:
        return opened, False
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
    chunks = TeacherChunks(config, teacher, layout, dataset, rows, labels, params, partners,
                           manifest, device, tuple(requests))  # fmt: skip
    write_chunks(writer, chunks, world, log)
    manifest = world.on_main(
        lambda: writer.finish(teacher_accuracy=teacher_accuracy(writer) if labeled else None)
    )
    return manifest, True


@contextlib.contextmanager
def single_writer(out: Location, world: World) -> Iterator[None]:
    """Hold a lock beside a local output for the whole pass, so that a second cache-teacher
    started on the same --out is refused (it would be told to --overwrite the live store)
    instead of writing into it. A hidden ``.NAME.lock`` file beside the store holds it,
    and goes when the pass ends (a refused output leaves nothing behind, not even the
    folders made to hold it); object-store URLs have no such lock."""
    if not out.local or not world.is_main:
        yield
        return
    path = out.path
    made = [folder for folder in (path.parent, *path.parent.parents) if not folder.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.parent / f".{path.name}.lock"
    try:
        handle = _take_lock(lock, out)
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)  # while held: one that opened it before sees a stale inode
            handle.close()
    finally:
        for folder in made:  # deepest first; one that now holds something stays
            try:
                folder.rmdir()
            except OSError:
                break


def _take_lock(lock: Path, out: Location) -> IO[str]:
    """``lock`` opened and flocked, or the refusal. A lock file unlinked by the writer
    that held it between this open and this flock is not the lock any more: open again."""
    while True:
        handle = open(lock, "a+")  # noqa: SIM115 - held open for the whole pass
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise OutputExistsError(
                f"{out} is being written by another cache-teacher right now: wait for it to "
                "finish (then run again to resume or reuse it) or choose another --out"
            ) from None
        try:
            same = os.stat(lock).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return handle
        handle.close()


def _new_manifest(
    config: CacheConfig,
    dataset: ImageSet,
    teacher: Teacher,
    layout: Layout,
    rows: np.ndarray,
    labeled: bool,
    device: torch.device,
    layers: list[CachedLayer],
) -> Manifest:
    """The manifest of the cache these arguments make, its ``cache_id`` derived."""
    members = teacher.records()
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        status=STATUS_WRITING,
        cache_id="",
        teacher_id=derive_teacher_id(members, config.combine),
        teachers=tuple(members),
        combine=config.combine,
        temperature=float(config.temperature),
        values=VALUES,
        preprocessing=preprocessing_for([m.data_config for m in members]),
        dataset=dataset.record(),  # name, split, fingerprint and, for files, decode
        classes=teacher.class_names(dataset),
        transfer={
            "dataset_samples": len(dataset),
            "subset": config.subset,
            "exclude_classes": sorted(config.exclude_classes),
            "labeled": labeled,
        },
        seed=config.seed,
        views=config.policy.to_dict(),
        storage=layout.storage,
        num_samples=len(rows),
        num_views=config.views,
        num_classes=teacher.num_classes,
        dtype=config.dtype,
        chunk_size=min(config.chunk_size, len(rows)),
        array_metadata_sha256={},
        teacher_accuracy=None,
        software=software_versions(),
        created=utc_now(),
        completed=None,
        precision=resolve_precision(device, config.precision),
        features=tuple(layers),
    )
    return replace(manifest, cache_id=derive_cache_id(manifest))


# the share of a chunk's rows and views whose stored values may lose the teacher's top
# class (a near-tie rounded the other way) before the temperature is refused as too high
# for the dtype; at a usable T it is 0 on kdpipe's caches, at T = 1000 in float16 nearly 1
LOST_RANKING_SHARE = 0.25  # near-ties of an unsure teacher tie in float16: harmless


@dataclass(frozen=True)
class TeacherChunks:
    """What the teacher pass computes, one chunk of rows at a time: every view of each row
    through every member, combined, checked and encoded by the storage layout."""

    config: CacheConfig
    teacher: Teacher
    layout: Layout
    dataset: ImageSet
    rows: np.ndarray  # dataset indices of the transfer set
    labels: torch.Tensor
    params: np.ndarray  # (rows, views, fields)
    partners: np.ndarray  # (rows, views)
    manifest: Manifest
    device: torch.device
    requests: tuple[LayerRequest, ...] = ()  # the teacher's layers cached beside the logits

    def rows_of(self, index: int) -> slice:
        step = self.manifest.chunk_size
        return slice(index * step, (index + 1) * step)

    def compute(self, index: int, progress: tqdm) -> dict[str, np.ndarray]:
        """Chunk ``index``: the teacher's outputs for every view of its rows, checked."""
        config, mine = self.config, self.rows_of(index)
        chunk_rows, chunk_params, chunk_partners = (
            self.rows[mine],
            self.params[mine],
            self.partners[mine],
        )
        values = torch.empty(len(chunk_rows), config.views, self.teacher.num_classes)
        layers = {layer.array: torch.empty(len(chunk_rows), config.views, *layer.shape)
                  for layer in self.manifest.features}  # fmt: skip
        with contextlib.ExitStack() as stack:
            taps = (stack.enter_context(LayerTaps(self.teacher.models[0], self.requests))
                    if self.requests else None)  # fmt: skip
            for view in range(config.views):
                values[:, view] = self.teacher.log_probs(
                    self.dataset.images,
                    config.temperature,
                    config.combine,
                    taps=taps,
                    rows=chunk_rows,
                    params=None if config.policy.is_identity else chunk_params[:, view],
                    partners=chunk_partners[:, view],
                    device=self.device,
                    batch_size=config.batch_size,
                    precision=self.manifest.precision,
                )
                for array, collected in (taps.take() if taps else {}).items():
                    layers[array][:, view] = collected  # the same forward's outputs
                progress.update(len(chunk_rows))
        # as stored: a float32 value beyond float16's range is stored as an infinity
        stored = [values.to(getattr(torch, config.dtype))]
        stored += [value.to(torch.float16) for value in layers.values()]
        bad = torch.zeros(len(chunk_rows), dtype=torch.bool)
        for value in stored:
            bad |= ~torch.isfinite(value.flatten(1)).all(dim=1)
        bad = bad.nonzero().flatten()
        if len(bad):
            samples = ", ".join(str(int(chunk_rows[int(i)])) for i in bad[:10])
            more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
            where = " (in its logits or cached layers)" if layers else ""
            raise TeacherOutputError(
                f"the teacher produced NaN or Inf{where} for sample(s) {samples}{more}; "
                f"{config.out} is left incomplete"
            )
        encoded = self.layout.encode(values)
        self._check_ranking(index, chunk_rows, values, encoded)
        return {
            **encoded,
            "labels": self.labels[mine].numpy(),
            "indices": chunk_rows,
            "views": chunk_params,
            "partners": chunk_partners,
            **{array: value.numpy() for array, value in layers.items()},
        }

    def _check_ranking(
        self,
        index: int,
        chunk_rows: np.ndarray,
        values: torch.Tensor,
        encoded: dict[str, np.ndarray],
    ) -> None:
        """Refuse a chunk whose stored values no longer hold the teacher's top class.

        ``log_softmax(z / T)`` squeezes the classes together as T grows: at T = 1000 a
        5-class teacher's log-probabilities differ by thousandths, below float16's step
        near log(1/5), and every row is stored as the same uniform distribution (teacher
        accuracy 0.72 became 0.21). Measured here, as stored, before the chunk is
        written: the layout's arrays in the cache's dtype, decoded as every reader
        decodes them. A row and view is lost when its decoded maximum is not the
        teacher's top class alone (another class above it, or tied with it); rows where
        the float32 teacher itself ties are not counted.
        """
        dtype = self.config.dtype
        stored = {name: torch.from_numpy(array.astype(dtype) if array.dtype.kind == "f" else array)
                  for name, array in encoded.items()}  # fmt: skip
        decoded = self.layout.decode(stored)
        top = values.argmax(-1, keepdim=True)
        full_ties = (values == values.gather(-1, top)).sum(-1) > 1
        best = decoded.max(-1, keepdim=True).values
        lost = (decoded.gather(-1, top) < best)[..., 0] | ((decoded == best).sum(-1) > 1)
        lost &= ~full_ties
        share = float(lost.float().mean()) if lost.numel() else 0.0
        uniform = int((decoded.amax(-1) == decoded.amin(-1)).sum())
        if share <= LOST_RANKING_SHARE and uniform <= UNIFORM_SHARE * max(lost.numel(), 1):
            return
        first, last = int(chunk_rows[0]), int(chunk_rows[-1])
        raise TeacherOutputError(
            f"--temperature {self.config.temperature:g} is too high for --dtype {dtype}: "
            f"in chunk {index} (samples {first}-{last}) {share:.0%} of the rows and views "
            f"stored no longer have the teacher's top class ({uniform} exactly uniform); "
            f"lower --temperature or pass --dtype float32 (train-student --temperature "
            f"re-tempers a dense cache exactly); {self.config.out} is left incomplete"
        )


def write_chunks(
    writer: CacheWriter, chunks: TeacherChunks, world: World, log: Callable[[str], None]
) -> None:
    """Compute and write this rank's chunks still to write, then wait for every rank. Shared
    by the detection pass (``kdpipe.tasks.detect.teach``): ``chunks`` is anything with
    ``rows``, ``rows_of(index)``, ``compute(index, progress)`` and ``config.views``."""
    # rank 0 reads what is done and every rank takes its answer: read by each rank, a rank
    # still starting would count a chunk another rank has just written, and the ranks
    # would share out different lists (a chunk left out, or written twice)
    finished = world.on_main(writer.finished_chunks)
    if finished:
        log(f"{writer.location}: resuming, {len(finished)} of {writer.num_chunks} chunks "
            "already written")  # fmt: skip
    # each rank writes whole chunks of its own (a chunk is one object per array; zarr
    # loses data when two processes write parts of one), so any world size, and any
    # world size on resume, writes the same bytes
    mine = world.shares([i for i in range(writer.num_chunks) if i not in finished])
    progress = tqdm(
        total=sum(len(chunks.rows[chunks.rows_of(i)]) for i in mine) * chunks.config.views,
        desc="teacher pass" if not world.active else f"teacher pass, rank {world.rank}",
        unit="view",
        disable=None if world.is_main else True,
    )
    # chunk k is written (compressed, checksummed, flushed) by a thread while the teacher
    # computes chunk k+1: the store's I/O hides behind the teacher instead of adding to it
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdpipe-writer") as pool:
        pending: Future | None = None
        durable = 0
        for index in mine:
            chunk = chunks.compute(index, progress)
            if pending is not None:
                pending.result()  # one chunk in flight at most: memory stays bounded
                durable += 1
                kill_point("chunks", durable)  # tests only (KDPIPE_TEST_KILL_AFTER)
            pending = pool.submit(writer.write, index, chunk)
        if pending is not None:
            pending.result()
            kill_point("chunks", durable + 1)
    progress.close()
    world.barrier()  # every rank's chunks are flagged: only now may the cache be complete


def open_writer(
    out: Location,
    manifest: Manifest | DetectionManifest,
    *,
    overwrite: bool,
    log: Callable[[str], None],
) -> CacheWriter:
    """A writer for ``out``: new, or resuming a partial cache made with the same arguments.

    A complete cache with the same arguments is left as it is (its writer's
    manifest says ``complete``); anything else at ``out`` is refused unless
    ``overwrite``, naming what differs.
    """
    if out.exists() and not overwrite:
        try:
            existing = read_cache_manifest(out)  # a detection cache is another cache, named
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
    prepare_output(out, overwrite, kind=CACHE)  # inputs are valid: only now touch the output
    return CacheWriter(out, manifest)


def teacher_accuracy(writer: CacheWriter) -> float | None:
    """Top-1 accuracy of the stored (combined) teacher over every view, read back from the
    store (:func:`kdpipe.cache.stored_teacher_accuracy`, which ``verify`` recomputes too),
    so that a resumed pass reports the same figure as an uninterrupted one."""
    return stored_teacher_accuracy(writer.manifest, writer.arrays)
