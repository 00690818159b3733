"""The one path from stored pixels to a model's input.

Every model input kdpipe makes, for the teacher pass, training, evaluation and
verification, comes from here: uint8 images (and, for an augmented view, its
stored parameters) are rendered, resized to the model's input size, normalised
with the model's own mean and std, laid out channels_last, and run under the
chosen precision. A teacher and a student given the same view parameters see the
same view, each at its own size and normalisation. Nothing here knows which
model or stage is asking.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kdpipe.base.errors import UsageError
from kdpipe.cache import IDENTITY_VIEW, PRECISIONS, VIEW_COLUMNS

if TYPE_CHECKING:  # for annotations: imported where they are used, so that a command
    # that reads records only loads no deep-learning library
    import torch
    from kdpipe.data.imagefolder import LazyImages

# the --precision words a user types, and the resolved precision each means (None: decide
# by the device); the resolved words are the manifest's (cache.format.PRECISIONS)
PRECISION_CHOICES = {"auto": None, "fp32": "float32", "bf16": "bfloat16"}


# timm's eval crop modes (timm.data.transforms_factory.transforms_imagenet_eval)
CROP_MODES = ("center", "squash", "border")
# timm's interpolation names (timm.data.transforms.str_to_interp_mode)
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")


@dataclass(frozen=True)
class DataConfig:
    """What a model expects as input: its input size and normalisation, and for a pretrained
    model its own eval resize (``interpolation``, ``crop_pct``, ``crop_mode`` of its
    ``pretrained_cfg``).

    Without the eval fields (every model kdpipe trains itself) a stored image is resized
    straight to ``input_size``; with them, it goes through timm's own eval transform
    (:func:`eval_transform`), so that the values are the ones the model's authors
    measured. The eval fields are written only when set, so records made before they
    existed keep their digests.
    """

    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str | None = None
    crop_pct: float | None = None
    crop_mode: str | None = None

    def to_dict(self) -> dict:
        data = {"input_size": list(self.input_size), "mean": list(self.mean),
                "std": list(self.std)}  # fmt: skip
        for name in ("interpolation", "crop_pct", "crop_mode"):
            if getattr(self, name) is not None:
                data[name] = getattr(self, name)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> DataConfig:
        crop_pct = data.get("crop_pct")
        return cls(
            input_size=tuple(int(v) for v in data["input_size"]),
            mean=tuple(float(v) for v in data["mean"]),
            std=tuple(float(v) for v in data["std"]),
            interpolation=data.get("interpolation"),
            crop_pct=None if crop_pct is None else float(crop_pct),
            crop_mode=data.get("crop_mode"),
        )

    @property
    def eval_resize(self) -> bool:
        """True when images go through the model's own eval transform (resize, crop)."""
        return self.interpolation is not None or self.crop_pct is not None

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """Float pixels in [0, 1] ``(N, C, H, W)`` to the input the model was trained on."""
        import torch

        mean = torch.tensor(self.mean, device=pixels.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=pixels.device).view(1, -1, 1, 1)
        return (pixels - mean) / std


@functools.lru_cache(maxsize=8)
def eval_transform(data_config: DataConfig) -> Callable:
    """timm's own eval transform for a data config, up to the uint8 crop: Resize(floor(size /
    crop_pct), interpolation, antialias) then CenterCrop(size) (or timm's squash and border
    modes). Normalisation is :meth:`DataConfig.normalize`, the one every path shares."""
    from timm.data import create_transform

    return create_transform(
        input_size=data_config.input_size,
        is_training=False,
        use_prefetcher=True,  # stops at the uint8 tensor: no ToTensor, no Normalize
        interpolation=data_config.interpolation or "bilinear",
        crop_pct=data_config.crop_pct or 1.0,
        crop_mode=data_config.crop_mode or "center",
        mean=data_config.mean,
        std=data_config.std,
    )


def eval_resize(images: torch.Tensor, data_config: DataConfig) -> torch.Tensor:
    """uint8 images ``(N, C, H, W)`` through the model's eval transform, one PIL image each
    (as timm's own loader does), to uint8 ``(N, C, *input_size[1:])``."""
    import torch
    from PIL import Image

    transform = eval_transform(data_config)
    pixels = images.cpu().permute(0, 2, 3, 1).numpy()
    mode = "L" if pixels.shape[-1] == 1 else "RGB"
    # the transform ends in timm's MaybePILToTensor: uint8 (C, H, W), values unscaled
    return torch.stack(
        [
            transform(Image.fromarray(image[..., 0] if mode == "L" else image, mode))
            for image in pixels
        ]
    )


def resolve_precision(device: torch.device, precision: str) -> str:
    """A --precision word to ``float32`` or ``bfloat16``. ``auto`` is bfloat16 on CUDA
    (tensor cores, no loss scaling) and float32 on the CPU, where bf16 matmuls are
    emulated and slower. A resolved word is returned as it is."""
    if precision in PRECISIONS:
        return precision
    if precision not in PRECISION_CHOICES:
        raise UsageError(
            f"unknown precision {precision!r}: choose one of {', '.join(PRECISION_CHOICES)}"
        )
    resolved = PRECISION_CHOICES[precision]
    if resolved is None:
        resolved = "bfloat16" if device.type == "cuda" else "float32"
    return resolved


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for forward passes, or nothing for float32. Losses and soft labels are
    computed from ``.float()`` outputs either way."""
    import torch

    if resolve_precision(device, precision) == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def check_channels(model_name: str, data_config: DataConfig, images: torch.Tensor) -> None:
    """A clear error before a model meets images with the wrong number of channels."""
    if int(images.shape[1]) != data_config.input_size[0]:
        raise UsageError(
            f"{model_name} takes {data_config.input_size[0]}-channel input but the dataset has "
            f"{int(images.shape[1])} channel(s)"
        )


def size_note(
    what: str, data_config: DataConfig, data_size: tuple[int, int], hint: str
) -> str | None:
    """A warning when a pretrained model's input side is more than twice the data's shorter
    side (``data_size``, H x W as decoded): a weights file trained at the data's own small
    size but recorded with a tag's 176 or 224 px is scored and cached at the wrong scale,
    and the pass costs the square of the factor. None otherwise: downscaling large photos
    is what eval transforms do, and kdpipe's own models are sized for the data."""
    if not data_config.eval_resize:
        return None
    side, data_side = max(data_config.input_size[1:]), min(data_size)
    if data_side <= 0 or side / data_side <= 2:
        return None
    size = "x".join(str(v) for v in data_config.input_size[1:])
    return (
        f"warning: {what} takes {size} px and the data is {data_size[0]}x{data_size[1]}: each "
        f"image is resized {side / data_side:.2g}x; if its weights were trained at another "
        f"size, give it ({hint})"
    )


def model_rows(
    images: torch.Tensor | LazyImages, data_config: DataConfig
) -> tuple[torch.Tensor | LazyImages, DataConfig]:
    """The rows a model with its own eval transform (a pretrained teacher) reads, and the
    config that finishes them: an image folder's or shards' files each through that
    transform (:meth:`~kdpipe.data.imagefolder.LazyImages.through_model`), so a teacher
    sees what timm's loader gives it from the file, not the row decoded at the dataset's
    size and resized again; everything else as it is (then :func:`prepare_input` resizes)."""
    from dataclasses import replace

    from kdpipe.data.imagefolder import LazyImages

    if not data_config.eval_resize or not isinstance(images, LazyImages):
        return images, data_config
    done = replace(data_config, interpolation=None, crop_pct=None, crop_mode=None)
    return images.through_model(data_config), done


def prepare_input(
    images: torch.Tensor, data_config: DataConfig, device: torch.device
) -> torch.Tensor:
    """uint8 images to the normalised float input a model expects, resized if need be (by
    the model's own eval transform when its data config has one: :func:`eval_resize`)."""
    import torch
    import torch.nn.functional as F

    if data_config.eval_resize:
        images = eval_resize(images, data_config)
    x = images.to(device, non_blocking=True)
    height, width = data_config.input_size[1:]
    x = data_config.normalize(x.float() / 255.0)
    if x.shape[-2:] != (height, width):
        x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)
    # channels_last: on CPU, convolutions ran 2.3x faster with it here (kd_cnn,
    # batch 256); it changes nothing for MLPs. Models are converted to match.
    return x.contiguous(memory_format=torch.channels_last)


def is_identity(params: torch.Tensor) -> bool:
    """True when every view in the batch is the plain image (no crop, flip or mix)."""
    import torch

    return bool((params == torch.tensor(IDENTITY_VIEW, dtype=params.dtype)).all())


def render(
    images: torch.Tensor,
    params: torch.Tensor,
    partner_images: torch.Tensor | None,
    size: tuple[int, int],
) -> torch.Tensor:
    """Float pixels in [0, 1], ``(B, C, *size)``: each view rendered from uint8 sources.

    Crop and flip are one affine resampling (bilinear, zeros outside the
    image), so the same parameters give the same view at any output size and
    pixel-identical views at the same size. The partner goes through the same
    crop and flip, then is blended (mixup) or pasted into the box (cutmix).
    """
    import torch
    import torch.nn.functional as F

    x = images.float() / 255.0
    params = params.to(device=x.device, dtype=torch.float32)
    column = VIEW_COLUMNS
    top, left, height, width, flip, lam = (
        params[:, column[name]] for name in ("top", "left", "height", "width", "flip", "lam")
    )
    n, c = x.shape[:2]
    theta = torch.zeros(n, 2, 3, device=x.device)
    theta[:, 0, 0] = width * (1 - 2 * flip)
    theta[:, 0, 2] = 2 * left + width - 1
    theta[:, 1, 1] = height
    theta[:, 1, 2] = 2 * top + height - 1
    grid = F.affine_grid(theta, [n, c, *size], align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if partner_images is None:
        return out
    partner = F.grid_sample(
        partner_images.float() / 255.0,
        grid,
        mode="bilinear",
        padding_mode="zeros",
        align_corners=False,
    )
    box_top, box_left, box_height, box_width = (
        params[:, column[name]] for name in ("box_top", "box_left", "box_height", "box_width")
    )
    cut = (box_height * box_width) > 0
    rows = (torch.arange(size[0], device=x.device) + 0.5) / size[0]
    cols = (torch.arange(size[1], device=x.device) + 0.5) / size[1]
    inside = (
        (rows[None, :, None] >= box_top[:, None, None])
        & (rows[None, :, None] < (box_top + box_height)[:, None, None])
        & (cols[None, None, :] >= box_left[:, None, None])
        & (cols[None, None, :] < (box_left + box_width)[:, None, None])
    ).unsqueeze(1)  # (B, 1, H, W)
    blended = lam.view(-1, 1, 1, 1) * out + (1 - lam.view(-1, 1, 1, 1)) * partner
    pasted = torch.where(inside, partner, out)
    return torch.where(cut.view(-1, 1, 1, 1), pasted, blended)


def view_input(
    images: torch.Tensor,
    params: torch.Tensor | None,
    partner_images: torch.Tensor | None,
    data_config: DataConfig,
    device: torch.device,
) -> torch.Tensor:
    """The normalised model input for a batch of views (channels_last).

    Plain images (no params, or identity views only) take the exact path of
    an unaugmented pass, so a ``--views 1`` cache without augmentation holds
    the same values as a fixed-teacher cache.
    """
    import torch

    if params is None or is_identity(params):
        return prepare_input(images, data_config, device)
    pixels = render(
        images.to(device, non_blocking=True),
        params,
        None if partner_images is None else partner_images.to(device, non_blocking=True),
        data_config.input_size[1:],
    )
    return data_config.normalize(pixels).contiguous(memory_format=torch.channels_last)
