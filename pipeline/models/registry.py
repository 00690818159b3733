"""Models: kdpipe's small networks in timm's registry, creation, and weight hashing.

Every model, teacher or student, comes from ``timm.create_model``. kdpipe adds
the networks of Hinton et al. (2015) (ReLU MLPs with chosen hidden sizes and
dropout) and a small two-convolution CNN, registered the way timm registers
its own: a tiny ``@register_model`` function that builds a kwargs dict and
calls one private builder.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence
from dataclasses import asdict

import timm
import torch
from kdpipe.base.errors import ModelError
from kdpipe.views.inputs import DataConfig
from timm.layers import to_2tuple
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn


class _FeaturesThenHead(nn.Module):
    """timm's model interface for kdpipe's small networks: ``self.features`` (a Sequential
    whose named children ``feature_info`` lists) then ``self.head``."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.head(x)

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class MLP(_FeaturesThenHead):
    """A ReLU multilayer perceptron on flattened pixels (Hinton et al. 2015, MNIST)."""

    def __init__(
        self,
        hidden_sizes: Sequence[int] = (800, 800),
        num_classes: int = 10,
        in_chans: int = 1,
        img_size: int | Sequence[int] = 28,
        drop_rate: float = 0.0,
        **_: object,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.in_chans = in_chans  # timm models carry it; timm.task reads it
        height, width = to_2tuple(img_size)
        layers: list[nn.Module] = [nn.Flatten()]
        width_in = in_chans * height * width
        for width_out in hidden_sizes:
            # Dropout is always there (p = 0 is the identity) so that the state-dict
            # layout does not depend on a training-only setting
            layers += [nn.Linear(width_in, width_out), nn.ReLU(inplace=True), nn.Dropout(drop_rate)]
            width_in = width_out
        self.features = nn.Sequential(*layers)
        self.num_features = width_in
        self.head = nn.Linear(width_in, num_classes)
        # timm's description of the named layers (each hidden layer's ReLU output), so that
        # cache-teacher --features and train-student --student-layer can name them
        self.feature_info = [
            {"module": f"features.{2 + 3 * i}", "num_chs": width, "reduction": 1}
            for i, width in enumerate(hidden_sizes)
        ]


class SmallCNN(_FeaturesThenHead):
    """Two 3x3 convolutions with max pooling, then one hidden fully connected layer."""

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 1,
        img_size: int | Sequence[int] = 28,
        channels: Sequence[int] = (32, 64),
        hidden: int = 128,
        drop_rate: float = 0.0,
        drop_before_hidden: bool = False,
        **_: object,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.in_chans = in_chans  # timm models carry it; timm.task reads it
        height, width = to_2tuple(img_size)
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, c1, 3, padding=1),
            nn.BatchNorm2d(c1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.BatchNorm2d(c2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Flatten(),
            # dropout on the flattened conv features too (kd_cnn256): a new module only
            # where asked, so kd_cnn's state-dict layout and published weights stay as they are
            *([nn.Dropout(drop_rate)] if drop_before_hidden else []),
            nn.Linear(c2 * (height // 4) * (width // 4), hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(drop_rate),
        )
        self.num_features = hidden
        self.head = nn.Linear(hidden, num_classes)
        # the output of each conv stage (after its pooling), as timm names stages
        self.feature_info = [
            {"module": "features.3", "num_chs": c1, "reduction": 2},
            {"module": "features.7", "num_chs": c2, "reduction": 4},
        ]


def _cfg(**kwargs: object) -> dict:
    # Defaults for 28x28 grayscale (Fashion-MNIST statistics); kdpipe overrides
    # them with the dataset's own shape and statistics at creation.
    return {
        "num_classes": 10,
        "input_size": (1, 28, 28),
        "mean": (0.286,),
        "std": (0.353,),
        "classifier": "head",
        "first_conv": "",
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "url": "",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "kd_mlp.untrained": _cfg(),
        "kd_mlp_1200x2.untrained": _cfg(),
        "kd_mlp_800x2.untrained": _cfg(),
        "kd_mlp_30x2.untrained": _cfg(),
        "kd_cnn.untrained": _cfg(first_conv="features.0"),
        "kd_cnn256.untrained": _cfg(first_conv="features.0"),
        "kd_cnn_mid.untrained": _cfg(first_conv="features.0"),
        "kd_cnn_tiny.untrained": _cfg(first_conv="features.0"),
    }
)


def _create(cls: type[nn.Module], variant: str, pretrained: bool, **kwargs: object) -> nn.Module:
    return build_model_with_cfg(cls, variant, pretrained, **kwargs)


@register_model
def kd_mlp(pretrained: bool = False, **kwargs: object) -> MLP:
    """ReLU MLP; choose the layers with ``hidden_sizes`` (default 800-800)."""
    return _create(MLP, "kd_mlp", pretrained, **kwargs)


@register_model
def kd_mlp_1200x2(pretrained: bool = False, **kwargs: object) -> MLP:
    """Hinton et al.'s MNIST teacher body: 784-1200-1200-10."""
    return _create(MLP, "kd_mlp_1200x2", pretrained, **{"hidden_sizes": (1200, 1200), **kwargs})


@register_model
def kd_mlp_800x2(pretrained: bool = False, **kwargs: object) -> MLP:
    """Hinton et al.'s MNIST student: 784-800-800-10."""
    return _create(MLP, "kd_mlp_800x2", pretrained, **{"hidden_sizes": (800, 800), **kwargs})


@register_model
def kd_mlp_30x2(pretrained: bool = False, **kwargs: object) -> MLP:
    """The 30-units-per-layer student of Hinton et al.'s temperature study."""
    return _create(MLP, "kd_mlp_30x2", pretrained, **{"hidden_sizes": (30, 30), **kwargs})


@register_model
def kd_cnn(pretrained: bool = False, **kwargs: object) -> SmallCNN:
    """Small CNN: conv32-pool-conv64-pool-fc128 (about 420K parameters at 28x28)."""
    return _create(SmallCNN, "kd_cnn", pretrained, **kwargs)


@register_model
def kd_cnn256(pretrained: bool = False, **kwargs: object) -> SmallCNN:
    """kd_cnn with what a plain PyTorch loop's 692-error Fashion-MNIST teacher has (issue 28):
    conv32-pool-conv64-pool-dropout-fc256-dropout (about 820K parameters at 28x28), the
    dropout (``--dropout``) both before and after the hidden layer. A new name, so that
    kd_cnn's published runs keep their architecture."""
    return _create(SmallCNN, "kd_cnn256", pretrained,
                   **{"hidden": 256, "drop_before_hidden": True, **kwargs})  # fmt: skip


@register_model
def kd_cnn_mid(pretrained: bool = False, **kwargs: object) -> SmallCNN:
    """kd_cnn at a quarter of its width: conv16-pool-conv32-pool-fc64 (about 105K
    parameters at 28x28), the teacher assistant between kd_cnn and kd_cnn_tiny."""
    return _create(SmallCNN, "kd_cnn_mid", pretrained,
                   **{"channels": (16, 32), "hidden": 64, **kwargs})  # fmt: skip


@register_model
def kd_cnn_tiny(pretrained: bool = False, **kwargs: object) -> SmallCNN:
    """kd_cnn at an eighth of its width: conv8-pool-conv16-pool-fc32 (about 27K parameters
    at 28x28), a student for the forms of distillation beyond logits."""
    return _create(SmallCNN, "kd_cnn_tiny", pretrained,
                   **{"channels": (8, 16), "hidden": 32, **kwargs})  # fmt: skip


def check_architecture(architecture: str) -> None:
    """An architecture timm does not know is one line, with the closest names it does."""
    if not timm.is_model(architecture):
        base = architecture.split(".")[0]
        close = timm.list_models(f"*{base}*")[:5]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ModelError(f"unknown architecture {architecture!r}: not in timm's registry{hint}")


def resolve_model_kwargs(
    architecture: str, data_config: DataConfig, model_kwargs: dict | None = None
) -> dict:
    """The constructor arguments that, with num_classes and in_chans, rebuild a model.

    kdpipe's own networks size their first dense layer from the image size, so
    it is recorded; timm's own architectures adapt to the input by themselves.
    """
    kwargs = dict(model_kwargs or {})
    if architecture.startswith("kd_"):
        kwargs.setdefault("img_size", list(data_config.input_size[1:]))
    return kwargs


def create_model(
    architecture: str,
    *,
    num_classes: int,
    data_config: DataConfig,
    drop_rate: float | None = None,
    model_kwargs: dict | None = None,
) -> nn.Module:
    """Build any timm architecture for a dataset's class count, channels and size.

    The model's ``pretrained_cfg`` is set to the dataset's data config so that
    ``timm.data.resolve_data_config(model=model)`` reports it, not ImageNet's.
    """
    check_architecture(architecture)
    kwargs = resolve_model_kwargs(architecture, data_config, model_kwargs)
    if drop_rate is not None:
        kwargs["drop_rate"] = drop_rate
    try:
        with warnings.catch_warnings():  # a layer sized 0 by a tiny input: named just below
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
            model = timm.create_model(
                architecture, num_classes=num_classes, in_chans=data_config.input_size[0], **kwargs
            )
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ModelError(f"cannot build {architecture!r}: {exc}") from None
    model.pretrained_cfg = {
        **getattr(model, "pretrained_cfg", {}),
        **{k: v for k, v in asdict(data_config).items() if v is not None},
        "num_classes": num_classes,
    }
    check_input_size(model, architecture, data_config)
    return model


def check_input_size(model: nn.Module, architecture: str, data_config: DataConfig) -> None:
    """One forward of a zero image at the model's input size, so that an input too small
    for the network (a folder of 1 x 1 icons, ``--image-size 2`` for a CNN that pools
    five times) or one a fixed-size network refuses is one line now, not a traceback in
    the middle of the first epoch. Eval mode, no gradient: no weight or statistic moves."""
    channels, height, width = data_config.input_size
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, channels, height, width))
    except (RuntimeError, ValueError, AssertionError, IndexError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise ModelError(
            f"{architecture} cannot take a {height}x{width} input with {channels} channel(s) "
            f"({lines[0] if lines else type(exc).__name__}): choose an --image-size it "
            "accepts, or another --model"
        ) from None
    finally:
        model.train(was_training)


def state_mismatch(model: nn.Module, state: dict[str, torch.Tensor]) -> str | None:
    """One line on how a state dict differs from a model's (None when it fits), instead of
    torch's dump of every key."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(
        name for name in set(expected) & set(state) if expected[name].shape != state[name].shape
    )
    parts = [
        f"{len(names)} {what} (e.g. {names[0]})"
        for names, what in (
            (missing, "missing"),
            (unexpected, "unexpected"),
            (shapes, "of another shape"),
        )
        if names
    ]
    return "; ".join(parts) + " weight(s): weights of another architecture" if parts else None


def weights_sha256(model: nn.Module) -> str:
    """A content hash of the weights: every tensor's name, dtype, shape and bytes.

    It identifies a teacher version independently of file names and of how
    safetensors lays a file out, so a renamed or re-saved file keeps its hash.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        value = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
