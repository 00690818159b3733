"""What an epoch iterates over: the rows, their soft targets and views, and its batches.

:class:`TrainData` holds the training rows of a dataset with what each row learns
from (its label, the teacher's log-probabilities, the stored view the teacher saw),
decides the epoch's order, and builds a batch in two steps: :meth:`TrainData.gather`
(CPU tensors, a pure function of seed, epoch and rows, so DataLoader workers can
build batches ahead) and :meth:`TrainData.to_model` (the model's input through
:mod:`kdpipe.views.inputs`, and the loss's tensors, on the device).
:class:`EpochBatches` serves one epoch's batches in order, each process its share.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace

import torch
from kdpipe.base.distributed import World
from kdpipe.base.errors import DatasetError
from kdpipe.cache import (
    VIEW_COLUMNS,
    SoftLabels,
    StreamedRows,
    StreamedSoftLabels,
    chunk_plan,
    windowed_order,
)
from kdpipe.data.datasets import ImageSet
from kdpipe.views.inputs import DataConfig, view_input
from kdpipe.views.policy import PLAIN, ViewPolicy, sample_views, view_schedule


def random_shift(
    images: torch.Tensor,
    max_shift: int,
    generator: torch.Generator,
    *,
    size: int | None = None,
    share: slice = slice(None),
) -> torch.Tensor:
    """Translate each image by up to ±max_shift pixels, filling with zeros.

    Hinton et al. (2015) trained their MNIST teacher with input jitter of up
    to two pixels; this is that augmentation, on uint8 images before normalising.
    ``images`` may be the ``share`` of a batch of ``size``: shifts are drawn for
    all ``size`` images and the share's are applied.
    """
    if max_shift == 0:
        return images
    n, _, height, width = images.shape
    size = n if size is None else size
    padded = torch.nn.functional.pad(images, (max_shift,) * 4)
    dy = torch.randint(0, 2 * max_shift + 1, (size,), generator=generator)[share]
    dx = torch.randint(0, 2 * max_shift + 1, (size,), generator=generator)[share]
    rows = (dy[:, None] + torch.arange(height))[:, :, None]  # (n, H, 1)
    cols = (dx[:, None] + torch.arange(width))[:, None, :]  # (n, 1, W)
    shifted = padded[torch.arange(n)[:, None, None], :, rows, cols]  # (n, H, W, C)
    return shifted.permute(0, 3, 1, 2).contiguous()


@dataclass(frozen=True)
class TrainData:
    """What one epoch iterates over: rows of a dataset, with their soft targets and views.

    Row ``r`` is dataset sample ``rows[r]``. With stored ``views`` (a cache's),
    row r uses view ``view_schedule(...)[r]`` in each epoch, its soft target is
    the teacher's output for exactly that view; without them, ``policy`` draws
    fresh views for every batch (or none, for the plain images).
    """

    images: torch.Tensor  # uint8 (N, C, H, W): the whole dataset
    dataset_labels: torch.Tensor  # (N,): partners' labels come from here
    rows: torch.Tensor  # (R,) int64 dataset indices
    labels: torch.Tensor  # (R,) int64, -1 where unknown
    # per-view arrays: tensors, or StreamedRows read chunk by chunk from a large cache
    targets: torch.Tensor | StreamedRows | None = None  # (R, V, C) teacher log-probabilities
    views: torch.Tensor | StreamedRows | None = None  # (R, V, 10) stored view parameters
    partners: torch.Tensor | StreamedRows | None = None  # (R, V) dataset indices, -1: no mix
    policy: ViewPolicy = PLAIN
    # --feature-loss: the teacher's cached layer, float16 (R, V, *shape), view-aligned
    layer_targets: torch.Tensor | None = None

    @classmethod
    def plain(cls, dataset: ImageSet, policy: ViewPolicy = PLAIN) -> TrainData:
        rows = torch.arange(len(dataset))
        return cls(dataset.images, dataset.labels, rows, dataset.labels, policy=policy)

    @classmethod
    def cached(
        cls,
        dataset: ImageSet,
        soft: SoftLabels | StreamedSoftLabels,
        targets: torch.Tensor | StreamedRows | None,
        policy: ViewPolicy = PLAIN,
    ) -> TrainData:
        """The rows of a cache over ``dataset`` (its indices, labels and stored views, when
        it has any), learning from ``targets``: the cache's log-probabilities at the run's
        temperature, or None for a loss without them."""
        views = soft.has_views
        return cls(
            images=dataset.images,
            dataset_labels=dataset.labels,
            rows=soft.indices,
            labels=soft.labels,
            targets=targets,
            views=soft.views if views else None,
            partners=soft.partners if views else None,
            policy=policy,
        )

    def __len__(self) -> int:
        return len(self.rows)

    def epoch_order(self, generator: torch.Generator, seed: int, epoch: int) -> torch.Tensor:
        """The order of the epoch's rows: a permutation drawn from the loop's generator, or,
        for a streamed cache, chunks in a random order and rows shuffled within windows
        of chunks (:func:`windowed_order`), so that reads stay whole chunks."""
        streamed = next(
            (a for a in (self.targets, self.views) if isinstance(a, StreamedRows)), None
        )
        if streamed is None:
            return torch.randperm(len(self), generator=generator)
        reader = streamed.reader
        order = windowed_order(streamed.rows, reader.chunk_size, reader.window, seed, epoch)
        reader.plan = chunk_plan(streamed.rows, order, reader.chunk_size)  # read ahead in it
        return order

    def on_device(self, device: torch.device, jitter: int) -> TrainData | None:
        """This data moved whole onto a GPU, or None where that does not pay or cannot be.

        On CUDA a small model's step is bound by the host: per-batch gathers, pinning
        and copies cost more than the step itself. Plain images and their soft targets
        (a fixed-teacher cache, hard labels) are then moved once and gathered on the
        GPU. Stored or fresh views and jitter are drawn and rendered from host-side
        parameters and keep the host path (pinned, non-blocking copies), as do caches
        that are streamed or would take more than a quarter of the free GPU memory.
        """
        tensors = (self.images, self.dataset_labels, self.rows, self.labels, self.targets,
                   self.layer_targets)  # fmt: skip
        if (
            device.type != "cuda"
            or self.views is not None
            or not self.policy.is_identity
            or jitter
            or not all(t is None or isinstance(t, torch.Tensor) for t in tensors)
        ):
            return None
        size = sum(t.element_size() * t.nelement() for t in tensors if t is not None)
        free, _ = torch.cuda.mem_get_info(device)
        if size > free // 4:
            return None

        def moved(values: torch.Tensor | None) -> torch.Tensor | None:
            return None if values is None else values.to(device)

        return replace(
            self,
            images=moved(self.images),
            dataset_labels=moved(self.dataset_labels),
            rows=moved(self.rows),
            labels=moved(self.labels),
            targets=moved(self.targets),
            layer_targets=moved(self.layer_targets),
        )

    def without(self, held_out: torch.Tensor) -> TrainData:
        """These rows minus the dataset indices ``held_out`` (a validation split)."""
        keep = ~torch.isin(self.rows, held_out)

        def kept(values: torch.Tensor | None) -> torch.Tensor | None:
            return None if values is None else values[keep]

        return replace(
            self,
            rows=self.rows[keep],
            labels=self.labels[keep],
            targets=kept(self.targets),
            views=kept(self.views),
            partners=kept(self.partners),
            layer_targets=kept(self.layer_targets),
        )

    def gather(
        self,
        positions: torch.Tensor,
        epoch: int,
        batch_index: int,
        seed: int,
        share: slice = slice(None),
    ) -> dict[str, torch.Tensor | None]:
        """CPU tensors of one batch: uint8 images, view parameters, partners, labels, soft
        targets; ``share`` picks this process's rows of it (under torchrun). The step's
        tensors come from :meth:`to_model`.

        Everything is a function of (seed, epoch, rows): the same call returns
        the same batch in another process, after a resume, in a DataLoader
        worker, so workers can build batches ahead of the training step.
        """
        params = partners = targets = layer_targets = None
        if self.views is not None:
            chosen = view_schedule(len(self), self.views.shape[1], seed, epoch, positions)
            params = self.views[positions, chosen]
            partners = self.partners[positions, chosen]
            if self.targets is not None:
                targets = self.targets[positions, chosen]
            if self.layer_targets is not None:  # the same view's layer as its soft target's
                layer_targets = self.layer_targets[positions, chosen]
        else:
            if self.targets is not None:
                targets = self.targets[positions, 0]
            if self.layer_targets is not None:
                layer_targets = self.layer_targets[positions, 0]
            if not self.policy.is_identity:
                fresh, fresh_partners = sample_views(
                    len(positions),
                    1,
                    self.policy,
                    image_size=tuple(self.images.shape[-2:]),
                    partner_pool=self.rows.numpy(),
                    seed=[seed, epoch, batch_index],
                )
                params = torch.from_numpy(fresh[:, 0])
                partners = torch.from_numpy(fresh_partners[:, 0])
        size = len(positions)
        positions = positions[share]
        params = None if params is None else params[share]
        partners = None if partners is None else partners[share]
        mixed = partners is not None and bool((partners >= 0).any())
        return {
            "images": self.images[self.rows[positions]],
            "params": params,
            "partner_images": self.images[partners.clamp_min(0)] if mixed else None,
            "labels": self.labels[positions],
            "partner_labels": self.dataset_labels[partners.clamp_min(0)] if mixed else None,
            "lam": params[:, VIEW_COLUMNS["lam"]].contiguous() if mixed else None,
            "targets": None if targets is None else targets[share],
            "layer_targets": None if layer_targets is None else layer_targets[share],
            "size": torch.tensor(size),  # the whole batch's: jitter is drawn for all of it
            "share": torch.tensor([share.start or 0, share.step or 1]),
        }

    @staticmethod
    def to_model(
        gathered: dict[str, torch.Tensor | None],
        data_config: DataConfig,
        device: torch.device,
        jitter: int = 0,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor | None]:
        """The model's input and the loss's tensors on ``device`` (non-blocking copies, from
        pinned memory when a DataLoader pinned them). ``jitter`` (plain images only)
        shifts the images with ``generator``, the training loop's, as Hinton et al.'s
        input jitter: drawn for the whole batch, so that every process's generator
        stays in step."""
        images, params = gathered["images"], gathered["params"]
        if jitter and params is None:
            start, step = (int(v) for v in gathered["share"])
            images = random_shift(
                images,
                jitter,
                generator,
                size=int(gathered["size"]),
                share=slice(start, None, step),
            )

        def moved(name: str) -> torch.Tensor | None:
            value = gathered[name]
            return None if value is None else value.to(device, non_blocking=True)

        return {
            "inputs": view_input(images, params, gathered["partner_images"], data_config, device),
            "labels": moved("labels"),
            "partner_labels": moved("partner_labels"),
            "lam": moved("lam"),
            "targets": moved("targets"),
            "layer_targets": None
            if gathered.get("layer_targets") is None
            else moved("layer_targets").float(),
        }


class EpochBatches(torch.utils.data.Dataset):
    """One epoch's batches, in order: batch ``i`` is rows ``order[i*B:(i+1)*B]`` (this
    process's share of them, and the weight of its loss), gathered on the CPU.

    A map-style dataset of whole batches, so that DataLoader workers can build
    them ahead of the training step (``TrainData.gather`` is a pure function of
    its arguments) and its pin-memory thread can pin them for non-blocking copies.
    """

    def __init__(
        self,
        data: TrainData,
        order: torch.Tensor,
        batch_size: int,
        epoch: int,
        seed: int,
        world: World,
    ) -> None:
        self.data, self.order, self.batch_size = data, order, batch_size
        self.epoch, self.seed, self.world = epoch, seed, world

    def __len__(self) -> int:
        return -(-len(self.order) // self.batch_size)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | None]:
        positions = self.order[index * self.batch_size : (index + 1) * self.batch_size]
        share, weight = share_of(len(positions), self.world)
        gathered = self.data.gather(positions, self.epoch, index, self.seed, share)
        gathered["weight"] = torch.tensor(weight)
        return gathered

    def _item(self, index: int) -> dict[str, torch.Tensor | None] | str:
        """A batch, or in a DataLoader worker the message of a dataset error (an image
        folder's unreadable file): a worker's exception would arrive as a traceback."""
        try:
            return self[index]
        except DatasetError as exc:
            return str(exc)

    def load(self, workers: int, pin_memory: bool) -> Iterable[dict[str, torch.Tensor | None]]:
        if workers == 0 and not pin_memory:
            return (self[index] for index in range(len(self)))
        loader = torch.utils.data.DataLoader(
            _Items(self),
            batch_size=None,  # items are batches already
            num_workers=workers,
            pin_memory=pin_memory,
            prefetch_factor=4 if workers else None,
        )
        return _raising(loader)


class _Items(torch.utils.data.Dataset):
    """An epoch's batches as a DataLoader reads them (:meth:`EpochBatches._item`)."""

    def __init__(self, batches: EpochBatches) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | None] | str:
        return self.batches._item(index)


def _raising(loader: Iterable) -> Iterator[dict[str, torch.Tensor | None]]:
    """The loader's batches; a worker's dataset error raised here, as its one line."""
    for batch in loader:
        if isinstance(batch, str):
            raise DatasetError(batch)
        yield batch


def share_of(size: int, world: World) -> tuple[slice, float]:
    """This rank's rows of a batch of ``size`` and the weight of its mean loss, so that
    the gradient averaged over ranks is the whole batch's mean. A rank left without a
    row (a last batch smaller than the world) steps on one row at weight 0."""
    if not world.active:
        return slice(None), 1.0
    mine = len(range(world.rank, size, world.size))
    if not mine:
        return slice(0, 1), 0.0
    return slice(world.rank, None, world.size), mine * world.size / size
