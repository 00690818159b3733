"""kdpipe in your own code: a cache opened for reading, and a Dataset over it.

A training loop of your own (timm's, Lightning's, a plain one) gets what
``train-student`` gets, from the same parts: :class:`Cache` reads the teacher's
log-probabilities through the cache package's readers (decoded by its storage
layout, re-tempered exactly, checked against checksums), and
:class:`DistillationDataset` pairs each cache row with its sample of your
dataset, replays the stored view through :mod:`kdpipe.views.inputs` (the renderer
training uses) and refuses a dataset whose fingerprint is not the cache's, with
the message the command line gives.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from kdpipe.base.distributed import SINGLE
from kdpipe.base.errors import DatasetError, UsageError
from kdpipe.base.runtime import quiet
from kdpipe.cache import (
    VIEW_COLUMNS,
    CachedLayer,
    Manifest,
    SoftLabels,
    StreamedRows,
    StreamedSoftLabels,
    open_soft_labels,
)
from kdpipe.data.datasets import ImageSet, check_same_dataset, recorded_decode
from kdpipe.train.batches import EpochBatches, TrainData
from kdpipe.views.inputs import DataConfig, prepare_input, render
from kdpipe.views.policy import view_schedule
from tqdm.auto import tqdm

Rows = Sequence[int] | np.ndarray | torch.Tensor


class Cache:
    """A complete kdpipe cache, opened for reading: its manifest, rows and soft targets.

    Read whole into memory, or, with ``memory`` (bytes) smaller than the cache
    decoded, streamed chunk by chunk as ``train-student --cache-memory`` does.
    Opening checks completion and every checksum it reads.
    """

    def __init__(self, path: str | Path, memory: int | None = None) -> None:
        self.path = str(path)
        self.memory = memory
        self._soft = open_soft_labels(self.path, memory, quiet)
        # decoded log-probabilities per temperature (None: the stored one)
        self._targets: dict[float | None, torch.Tensor | StreamedRows] = {}

    @property
    def manifest(self) -> Manifest:
        """What made the cache: teacher(s), dataset fingerprint, temperature, views, ids."""
        return self._soft.manifest

    def __len__(self) -> int:
        return self.manifest.num_samples

    @property
    def num_views(self) -> int:
        """Stored views per row (1 for a fixed-teacher cache)."""
        return self.manifest.num_views

    @property
    def num_classes(self) -> int:
        """Classes of each soft target, named by ``manifest.classes``."""
        return self.manifest.num_classes

    @property
    def temperature(self) -> float:
        """The temperature the values were stored at."""
        return self.manifest.temperature

    @property
    def streamed(self) -> bool:
        """True when the cache is read chunk by chunk rather than held in memory."""
        return isinstance(self._soft, StreamedSoftLabels)

    @property
    def indices(self) -> torch.Tensor:
        """``(N,)`` int64: row ``r`` is sample ``indices[r]`` of the dataset's order."""
        return self._soft.indices

    @property
    def labels(self) -> torch.Tensor:
        """``(N,)`` int64 labels of the rows, -1 for a transfer set cached without labels."""
        return self._soft.labels

    @property
    def decode(self) -> dict:
        """``load_dataset``'s keywords (``image_size``, ``channels``, ``resize``) that decode
        an image folder or shards as the cache was made from them (its ``dataset.decode``):
        ``load_dataset(folder, split, **cache.decode)``; empty for a set held in memory."""
        return recorded_decode(self.manifest.dataset)

    @property
    def has_views(self) -> bool:
        """False when every view is the plain image (nothing to render)."""
        return self.manifest.has_views

    def view_params(self, rows: Rows, views: int | Rows) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored parameters ``(n, 10)`` of ``views`` of ``rows`` and their mix partners
        ``(n,)`` (dataset indices, -1 for none): the columns of ``docs/cache-format.md``."""
        rows, views = _rows_and_views(rows, views)
        return self._soft.views[rows, views], self._soft.partners[rows, views]

    def soft_targets(
        self, rows: Rows, views: int | Rows, temperature: float | None = None
    ) -> torch.Tensor:
        """float32 ``log_softmax(z / T)`` ``(n, C)`` of the teacher for ``views`` (one index,
        or one per row) of cache ``rows``, at ``temperature`` (default: the stored one).

        A dense cache is re-tempered exactly (``log_softmax(z / T)`` holds ``z`` up to a
        constant); a top-k cache is reconstructed by its documented rule (the leftover mass
        spread uniformly over the other classes) and refused at another temperature.
        """
        rows, views = _rows_and_views(rows, views)
        return self._log_probs(temperature)[rows, views]

    @property
    def layers(self) -> list[CachedLayer]:
        """The teacher's cached intermediate outputs (``cache-teacher --features`` and
        ``--attention``): name, kind, array, per-row shape, pooling; ``[]`` for none."""
        return list(self.manifest.features)

    def layer_targets(self, name: str, rows: Rows, views: int | Rows,
                      kind: str = "features") -> torch.Tensor:  # fmt: skip
        """float32 ``(n, *shape)``: the teacher's output at layer ``name`` (``features``) or
        its attention map (``attention``) for ``views`` of cache ``rows``, from the very
        pass that gave the soft targets; what a hint or attention loss of your own needs."""
        layer = self.manifest.layer(kind, name)
        if layer is None:
            raise UsageError(f"{self.path} has no cached {kind} of layer {name!r}; it has "
                             f"{self.manifest.describe_layers()}")  # fmt: skip
        if self.streamed:
            raise UsageError(f"{self.path}: cached layers are read whole; open it without memory=")
        rows, views = _rows_and_views(rows, views)
        return self._soft.features[layer.array][rows, views].float()

    def _log_probs(self, temperature: float | None) -> torch.Tensor | StreamedRows:
        key = None if temperature is None or temperature == self.temperature else temperature
        if key not in self._targets:
            source: SoftLabels | StreamedSoftLabels = self._soft
            if self.streamed and self._targets:
                # a streaming reader's buffers hold one temperature's values: one reader each
                source = StreamedSoftLabels(self.path, self.memory)
            self._targets[key] = source.log_probs(key)
        return self._targets[key]

    def __repr__(self) -> str:
        m = self.manifest
        return (
            f"Cache({self.path!r}: {len(self)} rows, {m.num_views} view(s), {m.num_classes} "
            f"classes, T={m.temperature:g}, {m.layout.describe()}, cache_id {m.cache_id})"
        )


def open_cache(path: str | Path, *, memory: int | None = None) -> Cache:
    """Open a complete cache (a folder or an fsspec URL such as ``s3://...``) for reading;
    with ``memory`` bytes, a larger cache is streamed instead of read whole."""
    return Cache(path, memory)


def _rows_and_views(rows: Rows, views: int | Rows) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.as_tensor(rows, dtype=torch.long).reshape(-1)
    views = torch.as_tensor(views, dtype=torch.long).reshape(-1).expand(len(rows))
    return rows, views


def as_image(image: Any, index: int) -> torch.Tensor:
    """A sample's image as uint8 ``(C, H, W)``: from a uint8 tensor (CHW, or HW for one
    channel) or a PIL image (mode L, RGB, ...: as its pixels are)."""
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8 or image.ndim not in (2, 3):
            raise DatasetError(
                f"sample {index}: the image is a {image.dtype} tensor of shape "
                f"{tuple(image.shape)}; give uint8 pixels (C, H, W), before any normalisation"
            )
        return image[None] if image.ndim == 2 else image
    if hasattr(image, "mode") and hasattr(image, "size"):  # a PIL image
        pixels = np.array(image, dtype=np.uint8)  # a copy: PIL's buffer is read-only
        pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
        return torch.from_numpy(np.ascontiguousarray(pixels))
    raise DatasetError(
        f"sample {index}: the image is a {type(image).__name__}; give a uint8 tensor (C, H, W) "
        "or a PIL image"
    )


def read_samples(dataset: Any, name: str, split: str, classes: Sequence[str]) -> ImageSet:
    """Every sample of an indexable ``(image, label)`` dataset, once, as an :class:`ImageSet`
    (the fingerprint covers every pixel)."""
    if len(dataset) == 0:
        raise DatasetError(f"{name} is empty")
    first = as_image(dataset[0][0], 0)
    images = torch.empty((len(dataset), *first.shape), dtype=torch.uint8)
    labels = torch.empty(len(dataset), dtype=torch.long)
    for index in tqdm(range(len(dataset)), desc=f"reading {name}", disable=None, leave=False):
        image, label = dataset[index][:2]
        image = as_image(image, index)
        if image.shape != first.shape:
            raise DatasetError(
                f"{name}: sample {index} is {tuple(image.shape)}, sample 0 {tuple(first.shape)}: "
                "every image of a cached dataset has one shape"
            )
        images[index] = image
        labels[index] = int(label)
    return ImageSet(name, split, images, labels, tuple(classes))


class _Items:
    """An :class:`ImageSet` as an indexable ``(image, label)`` dataset: one row decoded
    per item (an image folder is never decoded whole)."""

    def __init__(self, samples: ImageSet) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.samples.images[index], int(self.samples.labels[index])


class DistillationDataset(torch.utils.data.Dataset):
    """Your dataset, aligned with a cache: item ``r`` is ``(image, label, soft_target)``.

    ``dataset`` is any indexable dataset whose item ``i`` is ``(image, label)``
    (more fields are ignored), the image a uint8 tensor ``(C, H, W)`` or a PIL image,
    in the order the cache was made from: item ``r`` is its sample
    ``cache.indices[r]``. Its fingerprint (count, every label and pixel) must be the
    cache's, or the dataset is refused with the command line's message; reading it
    for that takes one pass over the samples, at construction. A kdpipe dataset
    (``load_dataset(...)``: an image folder among them) is taken as it is, its
    fingerprint its own and its images decoded one item at a time.

    ``image`` is the model's input: the stored view of the row, replayed by
    :func:`kdpipe.views.inputs.render` (crop, flip, mix), resized to
    ``data_config.input_size`` and normalised, float32 ``(C, H, W)``. ``label`` is
    the row's label (-1 in a cache without labels), ``soft_target`` the teacher's
    float32 log-probabilities for that view at ``temperature``. From a cache that
    mixes samples (mixup, cutmix) an item is
    ``(image, label, soft_target, partner_label, lam)``, what
    :func:`kdpipe.tasks.classify.loss.distillation_loss` takes for the hard term.

    Views: with ``view`` every row uses that stored view; otherwise epoch ``e``
    (:meth:`set_epoch`, 1-based like training's, as with DistributedSampler) uses
    view ``view_schedule(len, V, seed, e)[r]``, the rows' views in ``train-student
    --seed SEED``.

    Items one at a time suit a ``DataLoader`` of your own; :meth:`batches` gives the
    same items a whole batch at a time by ``train-student``'s own path (one batched
    decode of an image folder, one read of the cache per batch), several times faster.
    """

    def __init__(
        self,
        dataset: Any,
        cache: Cache | str | Path,
        *,
        temperature: float | None = None,
        view: int | None = None,
        seed: int = 0,
        data_config: DataConfig | None = None,
        classes: Sequence[str] | None = None,
        name: str | None = None,
        split: str | None = None,
    ) -> None:
        self.dataset = dataset
        self.cache = cache if isinstance(cache, Cache) else open_cache(cache)
        manifest = self.cache.manifest
        if view is not None and not 0 <= view < manifest.num_views:
            raise UsageError(
                f"view {view}: {self.cache.path} holds views 0..{manifest.num_views - 1}"
            )
        # class names are not part of what an (image, label) dataset can show: the
        # cache's unless given; the count, labels and pixels are checked
        # a kdpipe dataset (an image folder from load_dataset: decoded per item, its
        # fingerprint from its index) is used as it is; any other is read once
        samples = dataset if isinstance(dataset, ImageSet) else read_samples(
            dataset,
            name or getattr(dataset, "name", type(dataset).__name__),
            split or manifest.dataset["split"],
            manifest.classes if classes is None else classes,
        )  # fmt: skip
        self.dataset = _Items(samples) if isinstance(dataset, ImageSet) else dataset
        self.samples = samples
        check_same_dataset(manifest.dataset, samples, self.cache.path)
        if data_config is None:  # the dataset's own statistics, as train-student uses
            mean, std = samples.pixel_stats()
            data_config = DataConfig(input_size=samples.input_size, mean=mean, std=std)
        self.data_config = data_config
        self.temperature = self.cache.temperature if temperature is None else temperature
        self.cache.soft_targets([0], [0], temperature)  # a top-k cache refuses another T now
        self.view, self.seed = view, seed
        self.mixed = manifest.views["mix"] != "none"
        self.set_epoch(1)

    def __len__(self) -> int:
        return len(self.cache)

    def set_epoch(self, epoch: int) -> None:
        """Use epoch ``epoch``'s views (1-based): call it before each epoch's iteration."""
        self.epoch = epoch
        rows, views = len(self.cache), self.cache.num_views
        self._views = (
            torch.full((rows,), self.view)
            if self.view is not None
            else view_schedule(rows, views, self.seed, epoch)
        )

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = True,
        generator: torch.Generator | None = None,
        workers: int = 0,
    ) -> Iterator[tuple]:
        """This epoch's items (:meth:`set_epoch`), stacked ``batch_size`` rows at a time:
        ``(images, labels, soft_targets)`` (mixing caches: ``partner_labels, lam`` too),
        each item equal to ``self[row]`` of its row.

        Built by ``train-student``'s own path (:class:`kdpipe.train.batches.TrainData`):
        a batch's images decoded together (an image folder by ``workers`` DataLoader
        processes ahead of the loop), its soft targets read in one indexing of the cache
        (a streamed cache chunk by chunk), its views rendered together. Order: a
        permutation drawn from ``generator`` (``torch.randperm``, as ``train-student``
        draws it), or for a streamed cache whole chunks shuffled within windows; the rows
        in cache order without ``shuffle``.
        """
        if self.view is not None:
            raise UsageError(
                f"batches() replays each row's view of the epoch's schedule; this dataset "
                f"fixes view {self.view}: iterate its items instead"
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise UsageError(f"batch_size must be a positive integer, not {batch_size!r}")
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            raise UsageError(f"workers must be an integer >= 0, not {workers!r}")
        # the rows as train-student holds them (TrainData.cached, as kdpipe.train.plan)
        data = TrainData.cached(self.samples.with_workers(workers), self.cache._soft,
                                self.cache._log_probs(self.temperature))  # fmt: skip
        order = (
            data.epoch_order(generator, self.seed, self.epoch)
            if shuffle
            else torch.arange(len(data))
        )
        epoch = EpochBatches(data, order, batch_size, self.epoch, self.seed, SINGLE)
        cpu = torch.device("cpu")
        for gathered in epoch.load(workers, pin_memory=False):
            batch = TrainData.to_model(gathered, self.data_config, cpu)
            labels = batch["labels"]  # the inputs channels_last, as train-student's
            item = (batch["inputs"], labels, batch["targets"])
            if not self.mixed:
                yield item
                continue
            if batch["lam"] is None:  # no row of this batch is mixed: as the items say
                yield (*item, labels.clone(), torch.ones(len(labels)))
            else:
                yield (*item, batch["partner_labels"], batch["lam"])

    def __getitem__(self, row: int) -> tuple:
        view = self._views[row]
        index = int(self.cache.indices[row])
        image = as_image(self.dataset[index][0], index)[None]
        params = partner_image = None
        partner_label = label = self.cache.labels[row]
        if self.cache.has_views:
            params, partner = self.cache.view_params([row], view)
            if int(partner) >= 0:
                partner_sample = self.dataset[int(partner)]
                partner_image = as_image(partner_sample[0], int(partner))[None]
                partner_label = torch.as_tensor(int(partner_sample[1]))
            # rendered even where the view is the plain image, as in a batch of train-student
            # with other views in it (a batch of plain views only takes prepare_input's path
            # there: the two differ by float rounding, under 1e-5)
            size = self.data_config.input_size[1:]
            inputs = self.data_config.normalize(render(image, params, partner_image, size))
        else:
            inputs = prepare_input(image, self.data_config, torch.device("cpu"))
        target = self.cache.soft_targets([row], view, self.temperature)[0]
        item = (inputs[0].contiguous(), label, target)
        if not self.mixed:
            return item
        lam = params[0, VIEW_COLUMNS["lam"]] if params is not None else torch.tensor(1.0)
        return (*item, partner_label, lam)


class Run:
    """A finished run directory loaded for use: its model (rebuilt through timm, weights
    hash and card digest checked, in eval mode), its card and its preprocessing, so that
    code outside kdpipe gets the same inputs ``evaluate`` gives the model."""

    def __init__(self, path: str | Path, device: torch.device | str = "cpu") -> None:
        from kdpipe.models.runs import load_model

        self.path = Path(path)
        self.device = torch.device(device)
        self.model, self.card = load_model(self.path, self.device)

    @property
    def data_config(self) -> DataConfig:
        """The input the model expects (size, mean, std and, for a pretrained model, its
        own eval resize), as its card records it."""
        return self.card.data

    @property
    def classes(self) -> list[str]:
        return list(self.card.classes)

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``(N, C, H, W)`` images to the model's input, by the one path every stage
        uses (:func:`kdpipe.views.inputs.prepare_input`)."""
        return prepare_input(images, self.data_config, self.device)

    @torch.inference_mode()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """The model's logits for uint8 ``(N, C, H, W)`` images."""
        return self.model(self.inputs(images)).float()


def load_run(path: str | Path, device: torch.device | str = "cpu") -> Run:
    """A run directory that ``train-teacher``, ``train-student``, ``qat`` or
    ``import-teacher`` wrote, as a :class:`Run` (model, card, preprocessing); a run that
    is unfinished, edited or whose weights do not match its card is refused, named."""
    return Run(path, device)
