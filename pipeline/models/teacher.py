"""The teacher: its members loaded and checked once, one batched inference loop, and how
an ensemble's members are combined.

Every pass of a model over images or stored views goes through
:func:`predict_logits`: the teacher pass that writes a cache, ``verify
--recompute``, agreement in ``evaluate``, and the scoring of students during
training. Its inputs come from :mod:`kdpipe.views.inputs`, the function the student's
training loop calls with the same view parameters. Nothing here writes a cache.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from kdpipe.base.errors import CacheMismatchError, KdpipeError, UsageError
from kdpipe.cache import COMBINE_RULES, TeacherMember, Upstream, read_manifest
from kdpipe.data.datasets import ImageSet, check_classes
from kdpipe.data.imagefolder import LazyImages, batches_of
from kdpipe.models.pretrained import looks_like_source
from kdpipe.models.runs import ModelCard, load_model, open_pretrained
from kdpipe.views.features import LayerRequest, LayerTaps, resolve_layer
from kdpipe.views.inputs import (
    DataConfig,
    autocast,
    check_channels,
    is_identity,
    model_rows,
    view_input,
)
from torch import nn
from tqdm.auto import tqdm


@dataclass(frozen=True)
class Teacher:
    """One model or an ensemble, loaded from run directories, with their model cards."""

    sources: tuple[str, ...]  # where each member was loaded from, as given
    models: tuple[nn.Module, ...]
    cards: tuple[ModelCard, ...]

    @property
    def num_classes(self) -> int:
        return self.cards[0].num_classes

    def class_names(self, dataset: ImageSet) -> list[str]:
        """The names of the classes the teacher predicts: its members' (a pretrained teacher
        imported without --classes knows them by index only: then the dataset's, the counts
        being checked, or the indices for unlabeled data)."""
        named = [card.classes for card in self.cards if card.classes]
        if named:
            return list(named[0])
        if dataset.classes and len(dataset.classes) == self.num_classes:
            return list(dataset.classes)
        return [str(i) for i in range(self.num_classes)]

    def check(self, dataset: ImageSet) -> None:
        """Every member predicts the dataset's classes (when it has labels), by name and in
        order where both name them (:func:`kdpipe.data.datasets.check_classes`), the members share
        their classes, and each takes the dataset's channels."""
        count = self.num_classes
        for source, card in zip(self.sources, self.cards, strict=True):
            if dataset.labeled and card.num_classes != dataset.num_classes:
                raise CacheMismatchError(
                    f"teacher {source} has {card.num_classes} classes but {dataset.name} has "
                    f"{dataset.num_classes}"
                )
            if card.num_classes != count:
                raise CacheMismatchError(
                    f"teacher {source} has {card.num_classes} classes, {self.sources[0]} has "
                    f"{count}: ensemble members must share their classes"
                )
            named = [(s, c) for s, c in zip(self.sources, self.cards, strict=True) if c.classes]
            if card.classes and named:
                check_classes(card.classes, named[0][1].classes, f"teacher {source}",
                              f"teacher {named[0][0]}")  # fmt: skip
            if card.classes and dataset.classes:
                check_classes(card.classes, dataset.classes, f"teacher {source}",
                              f"{dataset.name} ({dataset.split})")  # fmt: skip
            check_channels(f"teacher {source}", card.data, dataset.images)

    def records(self) -> list[TeacherMember]:
        """The manifest's record of each member: what it computes, its weights' hash, and for
        a student, the chain it learned from (:func:`upstream_of`)."""
        return [
            TeacherMember(
                architecture=card.architecture,
                weights_sha256=card.weights_sha256,
                param_count=card.param_count,
                model_kwargs=card.model_kwargs,
                num_classes=card.num_classes,
                data_config=card.data_config,
                run_dir=str(source),
                lineage=upstream_of(card),
                source=card.source,
            )
            for source, card in zip(self.sources, self.cards, strict=True)
        ]

    def log_probs(
        self,
        images: torch.Tensor,
        temperature: float,
        combine: str,
        taps: LayerTaps | None = None,
        **views: object,
    ) -> torch.Tensor:
        """The combined teacher's ``log_softmax(z / T)`` for one view per row (the
        keyword arguments of :func:`predict_logits`); ``taps`` (one member only) collect
        its layers' outputs in the same forward passes."""
        member_logits = [
            predict_logits(model, images, card.data, taps=taps, **views)
            for model, card in zip(self.models, self.cards, strict=True)
        ]
        return combine_members(member_logits, temperature, combine)

    def layer_requests(
        self, features: Sequence[str], attention: Sequence[str], grid: int | None
    ) -> list[LayerRequest]:
        """The layers asked for, by their canonical names; an unknown name, a layer asked
        twice, or an ensemble is one clear line."""
        if not features and not attention:
            return []
        if len(self.models) > 1:
            raise UsageError("--features and --attention need a single teacher, not an "
                             f"ensemble of {len(self.models)}")  # fmt: skip
        if grid is not None and grid < 1:
            raise UsageError(f"--feature-grid must be >= 1, not {grid}")
        model, who = self.models[0], f"teacher {self.sources[0]} ({self.cards[0].architecture})"
        requests = [LayerRequest(resolve_layer(model, name, who), kind, grid)
                    for kind, names in (("features", features), ("attention", attention))
                    for name in names]  # fmt: skip
        arrays = [r.array for r in requests]
        if len(set(arrays)) != len(arrays):
            raise UsageError(f"a layer is asked for twice ({', '.join(arrays)})")
        return requests

    @torch.inference_mode()
    def layer_records(self, requests: Sequence[LayerRequest], device: torch.device) -> list:
        """The manifest's record of each requested layer: its shape per row and view, from
        one forward pass of a blank input (an attention request of a layer that is not a
        spatial map is refused here)."""
        if not requests:
            return []
        model, card = self.models[0], self.cards[0]
        blank = torch.zeros(1, *card.data.input_size, device=device)
        with LayerTaps(model.eval(), requests) as taps:
            model(blank.to(memory_format=torch.channels_last))
            spatial = {name: value.dim() == 4 for name, value in taps.captured.items()}
            outputs = taps.outputs()
        return [r.record(outputs[r.array].shape[1:], spatial[r.name]) for r in requests]


def upstream_of(card: ModelCard) -> Upstream | None:
    """The record of the cache a student-teacher learned from, read from that cache's
    manifest (and so carrying that cache's teachers' own records, recursively). When the
    cache cannot be read or is another cache now, only what the card says is recorded."""
    lineage = card.lineage
    if lineage is None or "cache_id" not in lineage:  # trained on labels (or online)
        return None
    known = {"cache_id": lineage["cache_id"], "teacher_id": lineage["teacher_id"],
             "cache_path": str(lineage["cache_path"])}  # fmt: skip
    try:
        manifest = read_manifest(lineage["cache_path"])
    except KdpipeError:
        manifest = None
    if manifest is None or manifest.cache_id != lineage["cache_id"]:
        return Upstream(**known, combine=None, dataset=None, teachers=None)
    return Upstream(**known, combine=manifest.combine, dataset=manifest.dataset,
                    teachers=manifest.teachers)  # fmt: skip


def load_teacher(sources: Sequence[str | Path], device: torch.device) -> Teacher:
    """Load every member once: a run directory (weights hash checked by
    :func:`kdpipe.models.runs.load_model`), or a SOURCE (``timm:ARCH``, ``hf-hub:ORG/NAME``,
    ``local-dir:PATH``) imported on the fly through timm, its source recorded in its card."""
    if not sources:
        raise UsageError("at least one --teacher run directory or SOURCE is needed")
    loaded = [_load_member(source, device) for source in sources]
    first: dict[str, int] = {}
    for index, (source, (_, card)) in enumerate(zip(sources, loaded, strict=True)):
        same = first.setdefault(card.weights_sha256, index)
        if same != index:
            raise UsageError(
                f"teachers {sources[same]} and {source} have the same weights (hash "
                f"{card.weights_sha256[:16]}): an ensemble of a model with itself is that "
                "model, under another teacher_id; give each member once"
            )
    return Teacher(
        sources=tuple(str(source) for source in sources),
        models=tuple(model for model, _ in loaded),
        cards=tuple(card for _, card in loaded),
    )


def _load_member(source: str | Path, device: torch.device) -> tuple[nn.Module, ModelCard]:
    if looks_like_source(source):
        model, card = open_pretrained(str(source))
        return model.to(device).to(memory_format=torch.channels_last).eval(), card
    return load_model(Path(source), device)


def combine_members(
    member_logits: Sequence[torch.Tensor], temperature: float, rule: str
) -> torch.Tensor:
    """Log-probabilities of the teacher at temperature T, one row per sample.

    ``mean-probs``: log of the arithmetic mean of the members' softmax(z/T)
    (Hinton et al. 2015); ``mean-logits``: log_softmax of the mean logits / T.
    With one member both are log_softmax(z / T).
    """
    if rule not in COMBINE_RULES:
        raise UsageError(f"--combine must be one of {', '.join(COMBINE_RULES)}")
    stacked = torch.stack([logits.float() for logits in member_logits])  # (M, N, C)
    if rule == "mean-logits":
        return torch.log_softmax(stacked.mean(0) / temperature, dim=-1)
    logprobs = torch.log_softmax(stacked / temperature, dim=-1)
    return torch.logsumexp(logprobs, dim=0) - math.log(len(member_logits))


def _to_host(values: torch.Tensor) -> torch.Tensor:
    if values.device.type != "cuda":
        return values.cpu()
    host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
    return host.copy_(values, non_blocking=True)


@torch.inference_mode()
def predict_logits(
    model: nn.Module,
    images: torch.Tensor | LazyImages,
    data_config: DataConfig,
    *,
    device: torch.device,
    batch_size: int = 512,
    precision: str = "float32",
    rows: np.ndarray | None = None,
    params: np.ndarray | None = None,
    partners: np.ndarray | None = None,
    progress: str | None = None,
    taps: LayerTaps | None = None,
) -> torch.Tensor:
    """float32 logits on the CPU, the model in eval mode, its forward passes in
    ``precision`` (:func:`kdpipe.views.inputs.autocast`).

    One row per image of ``images``, or per dataset index of ``rows``; with
    ``params`` (and ``partners``), each row is the stored view those parameters
    describe, rendered by :func:`kdpipe.views.inputs.view_input`. ``progress`` names the pass
    in a progress bar. With ``taps`` (hooks on ``model``), each batch's layer outputs
    are collected from the same forward as its logits (:meth:`LayerTaps.take`).
    """
    model.eval()
    if params is None or is_identity(torch.from_numpy(params)):  # plain images: the files
        images, data_config = model_rows(images, data_config)
    outputs = []
    count = len(images) if rows is None else len(rows)
    starts = range(0, count, batch_size)
    # one request per batch: its rows, then its mix partners' rows (an image folder's are
    # decoded together, ahead in DataLoader workers when it has them: batches_of)
    requests, mixed = [], []
    for start in starts:
        stop = min(start + batch_size, count)
        request = torch.arange(start, stop) if rows is None else torch.from_numpy(rows[start:stop])
        partner_index = None if params is None else torch.from_numpy(partners[start:stop])
        mixed.append(partner_index is not None and bool((partner_index >= 0).any()))
        if mixed[-1]:
            request = torch.cat([request, partner_index.clamp_min(0)])
        requests.append(request)
    fetched = zip(starts, mixed, batches_of(images, requests), strict=True)
    # a progress bar (at a terminal) when the caller names the pass
    bar = {"total": len(starts), "desc": progress, "unit": "batch"}
    for start, mix, pixels in tqdm(fetched, **bar, disable=None if progress else True):
        stop = min(start + batch_size, count)
        batch, partner_images = (
            (pixels[: stop - start], pixels[stop - start :]) if mix else (pixels, None)
        )
        view_params = None if params is None else torch.from_numpy(params[start:stop])
        inputs = view_input(batch, view_params, partner_images, data_config, device)
        with autocast(device, precision):
            logits = model(inputs)
        if taps is not None:
            taps.collect()
        # to the CPU without a sync per batch: pinned memory, non-blocking copy
        outputs.append(_to_host(logits.float()))
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()  # the copies above have landed
    return torch.cat(outputs) if outputs else torch.empty(0)
