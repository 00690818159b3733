"""Augmented views as explicit parameters: sampled once, stored, replayed exactly.

A *view* of sample *i* is a crop box and a flip in normalised source
coordinates, optionally mixed with a *partner* sample (mixup: a weight λ;
cutmix: a box in output coordinates). The parameters are numbers, not RNG
seeds, so the same view is rendered again by another process, another worker
count or another library version, and at another input resolution: the
teacher labels a view at its input size, the student replays it at its own.

One view is a row of the cache format's ``VIEW_FIELDS`` (float32) plus a partner
index (int64, -1 when there is no mixing). ``docs/cache-format.md`` documents both;
:func:`kdpipe.views.inputs.render` replays a view at any model's input size.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from kdpipe.base.errors import UsageError
from kdpipe.cache import IDENTITY_VIEW, VIEW_COLUMNS

if TYPE_CHECKING:  # for annotations: imported where they are used, so that a command
    # that reads records only loads no deep-learning library
    import torch

AUGMENTS = ("none", "flip", "shift-flip", "crop-flip")
MIXES = ("none", "mixup", "cutmix")
SHIFT_FRACTION = 0.125  # shift-flip: up to 1/8 of the side, like pad 4 + crop on 32 px
CROP_SCALE = (0.25, 1.0)  # crop-flip: area fraction, as RandomResizedCrop's scale
CROP_RATIO = (3 / 4, 4 / 3)


@dataclass(frozen=True)
class ViewPolicy:
    """How views are drawn: geometry, mixing, and the Beta(α, α) of the mix weight."""

    augment: str = "none"
    mix: str = "none"
    mix_alpha: float = 1.0
    crop_scale: tuple[float, float] = CROP_SCALE  # crop-flip: range of the crop's area

    def validate(self) -> None:
        if self.augment not in AUGMENTS:
            raise UsageError(
                f"--augment must be one of {', '.join(AUGMENTS)}, not {self.augment!r}"
            )
        if self.mix not in MIXES:
            raise UsageError(f"--mix must be one of {', '.join(MIXES)}, not {self.mix!r}")
        if not (math.isfinite(self.mix_alpha) and self.mix_alpha > 0):
            raise UsageError(f"--mix-alpha must be a finite number > 0, not {self.mix_alpha}")
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise UsageError(
                f"--crop-scale must be two area fractions 0 < MIN <= MAX <= 1, not {low:g} {high:g}"
            )
        if self.crop_scale != CROP_SCALE and self.augment != "crop-flip":
            raise UsageError(
                f"--crop-scale sets the crops of --augment crop-flip, not of {self.augment!r}"
            )

    @property
    def is_identity(self) -> bool:
        return self.augment == "none" and self.mix == "none"

    def to_dict(self) -> dict:
        """The manifest's ``views``; ``crop_scale`` only when not the default, so that the
        ``cache_id`` of every cache made before the option existed stays the same."""
        data: dict = {"augment": self.augment, "mix": self.mix, "mix_alpha": self.mix_alpha}
        if self.crop_scale != CROP_SCALE:
            data["crop_scale"] = list(self.crop_scale)
        return data


PLAIN = ViewPolicy()  # plain images: no augmentation, no mixing


def sample_views(
    num_rows: int,
    num_views: int,
    policy: ViewPolicy,
    *,
    image_size: tuple[int, int],
    partner_pool: np.ndarray,
    seed: int | list[int],
) -> tuple[np.ndarray, np.ndarray]:
    """View parameters ``(rows, views, len(VIEW_FIELDS))`` and partners ``(rows, views)``.

    Drawn all at once from one numpy PCG64 stream, so they depend only on the
    seed and the shapes, never on how the work is later split. ``partner_pool``
    holds the dataset indices a partner is drawn from (the transfer set);
    ``image_size`` (H, W) of the source makes shifts whole pixels.
    """
    policy.validate()
    rng = np.random.default_rng(seed)
    shape = (num_rows, num_views)
    identity = np.asarray(IDENTITY_VIEW, dtype=np.float64)
    params = np.broadcast_to(identity, (*shape, len(identity))).copy()
    height, width = image_size
    column = VIEW_COLUMNS
    if policy.augment == "shift-flip":
        for axis, side in ((column["top"], height), (column["left"], width)):
            limit = max(1, round(SHIFT_FRACTION * side))
            params[..., axis] = rng.integers(-limit, limit + 1, shape) / side
    elif policy.augment == "crop-flip":
        crop = slice(column["top"], column["width"] + 1)  # top, left, height, width
        params[..., crop] = _random_resized_crops(rng, shape, policy.crop_scale)
    if policy.augment in ("flip", "shift-flip", "crop-flip"):
        params[..., column["flip"]] = rng.random(shape) < 0.5
    partners = np.full(shape, -1, dtype=np.int64)
    if policy.mix != "none":
        if len(partner_pool) < 2:
            raise UsageError(f"--mix {policy.mix} needs at least two samples to mix")
        partners = partner_pool[rng.integers(0, len(partner_pool), shape)].astype(np.int64)
        lam = rng.beta(policy.mix_alpha, policy.mix_alpha, shape)
        if policy.mix == "mixup":
            params[..., column["lam"]] = lam
        else:  # cutmix: a box of area 1 - λ, centred uniformly, clipped; λ follows the clip
            cut = np.sqrt(1.0 - lam)
            centre_y, centre_x = rng.random(shape), rng.random(shape)
            top = np.clip(centre_y - cut / 2, 0, 1)
            left = np.clip(centre_x - cut / 2, 0, 1)
            bottom = np.clip(centre_y + cut / 2, 0, 1)
            right = np.clip(centre_x + cut / 2, 0, 1)
            box = slice(column["box_top"], column["box_width"] + 1)
            params[..., box] = np.stack([top, left, bottom - top, right - left], axis=-1)
            params[..., column["lam"]] = 1.0 - (bottom - top) * (right - left)
    return params.astype(np.float32), partners


def _random_resized_crops(
    rng: np.random.Generator, shape: tuple[int, int], scale: tuple[float, float]
) -> np.ndarray:
    """Boxes (top, left, height, width) like torchvision's RandomResizedCrop, vectorised:
    10 tries per view of an area and a log-uniform aspect ratio, else the whole image."""
    boxes = np.broadcast_to(np.asarray([0.0, 0.0, 1.0, 1.0]), (*shape, 4)).copy()
    pending = np.ones(shape, dtype=bool)
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    for _ in range(10):
        area = rng.uniform(*scale, shape)
        ratio = np.exp(rng.uniform(*log_ratio, shape))
        width = np.sqrt(area * ratio)
        height = np.sqrt(area / ratio)
        top = rng.random(shape) * (1 - height)
        left = rng.random(shape) * (1 - width)
        ok = pending & (width <= 1) & (height <= 1)
        boxes[ok] = np.stack([top, left, height, width], axis=-1)[ok]
        pending &= ~ok
    return boxes


def view_schedule(
    num_rows: int, num_views: int, seed: int, epoch: int, positions: torch.Tensor | None = None
) -> torch.Tensor:
    """Which view each row uses in ``epoch`` (1-based): a per-row random offset plus the
    epoch, so any ``num_views`` consecutive epochs use every view of every row once. With
    ``positions``, those rows' views only (a batch's: the whole schedule of a 1.28M-row
    cache, computed per batch, took three quarters of a streamed epoch)."""
    offsets = _view_offsets(num_rows, num_views, seed)
    if positions is not None:
        offsets = offsets[positions]
    return (offsets + epoch - 1) % num_views


@functools.lru_cache(maxsize=4)
def _view_offsets(num_rows: int, num_views: int, seed: int) -> torch.Tensor:
    """Drawn once per training run (the schedule asks for it on every batch)."""
    import torch

    return torch.randint(
        0, num_views, (num_rows,), generator=torch.Generator().manual_seed(seed + 7919)
    )
