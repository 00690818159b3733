"""Ultralytics behind one door: its environment, models, checkpoints and trainer.

Ultralytics reads its settings from ``YOLO_CONFIG_DIR`` and, left alone, checks its
requirements online, downloads fonts and assets, and logs runs to MLflow, TensorBoard and
others. kdpipe's runs do none of that: :func:`ultralytics` sets the offline switches and a
settings folder of kdpipe's own before the first import (unless the user set them), and
turns every logging integration off in it. A checkpoint (``.pt``) pickles the whole model
object: :func:`load_checkpoint` reads it with ``torch.load(weights_only=True)`` allowing
only torch's and Ultralytics' own ``nn.Module`` classes, so no other code runs while it is
read; a checkpoint that needs anything else is refused, named.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from kdpipe.base.errors import KdpipeError, ModelError

EXTRA = "pip install 'kdpipe[detect]'"
LICENSE_NOTE = "Ultralytics is AGPL-3.0: see the README's note on the detect extra"
# every integration Ultralytics' settings know, off: kdpipe's runs log to the run directory
INTEGRATIONS_OFF = ("mlflow", "tensorboard", "wandb", "clearml", "comet", "dvc", "hub",
                    "neptune", "raytune", "sync")  # fmt: skip


def settings_dir() -> Path:
    return Path(os.environ.get("KDPIPE_HOME", Path.home() / ".cache" / "kdpipe")) / "ultralytics"


def ultralytics() -> ModuleType:
    """The ``ultralytics`` package, imported offline with kdpipe's settings folder; a
    missing extra is one line saying how to install it."""
    os.environ.setdefault("YOLO_OFFLINE", "True")
    os.environ.setdefault("ULTRALYTICS_SKIP_REQUIREMENTS_CHECKS", "1")
    if "YOLO_CONFIG_DIR" not in os.environ:
        settings_dir().mkdir(parents=True, exist_ok=True)
        os.environ["YOLO_CONFIG_DIR"] = str(settings_dir())
    # Ultralytics' import rebinds PIL.Image.open (its HEIF fallback calls a pip check on
    # every file Pillow cannot identify), torch.save and both print options, for the whole
    # process: kdpipe puts them back, so importing the detect room changes nothing that the
    # classification rooms see (a not-an-image file stays one line); after a first import
    # the values saved are already the restored ones
    import numpy as np
    from PIL import Image

    image_open, torch_save = Image.open, torch.save
    torch_print, numpy_print = torch._tensor_str.get_printoptions(), np.get_printoptions()
    try:
        import ultralytics as package
        import ultralytics.utils.patches  # lazy in 8.4: patch now, restore below
        from ultralytics.utils import SETTINGS
    except ImportError as exc:
        raise KdpipeError(f"detection needs the optional extra: {EXTRA} ({LICENSE_NOTE}); "
                          f"importing ultralytics failed: {exc}") from None  # fmt: skip
    finally:
        Image.open, torch.save = image_open, torch_save
        torch.set_printoptions(**torch_print)
        np.set_printoptions(**numpy_print)
    wanted = {key: False for key in INTEGRATIONS_OFF if key in SETTINGS}
    if any(SETTINGS.get(key) for key in wanted):
        SETTINGS.update(wanted)
    return package


@dataclass(frozen=True)
class DetectorInfo:
    """What a detection model is, as kdpipe records it (model.json, every manifest)."""

    architecture: str  # the YAML it was built from (yolo11n.yaml, ...)
    num_classes: int
    strides: tuple[int, ...]
    reg_max: int  # DFL bins per box side (16 for YOLO11; 1 for YOLO26: plain box values)
    end2end: bool  # an NMS-free one-to-one head beside the one-to-many head (YOLO26)

    @property
    def box_channels(self) -> int:
        return 4 * self.reg_max


def describe(model: torch.nn.Module) -> DetectorInfo:
    """The architecture, classes, strides and head of an Ultralytics ``DetectionModel``."""
    head = model.model[-1]
    yaml = getattr(model, "yaml", {}) or {}
    name = Path(str(yaml.get("yaml_file", "unknown.yaml"))).name
    return DetectorInfo(architecture=name, num_classes=int(head.nc),
                        strides=tuple(int(s) for s in model.stride.tolist()),
                        reg_max=int(head.reg_max),
                        end2end=getattr(head, "one2one_cv2", None) is not None)  # fmt: skip


def create_detector(architecture: str, num_classes: int) -> torch.nn.Module:
    """A fresh ``DetectionModel`` from an Ultralytics model YAML (``yolo11n.yaml``: its own
    configs, no download) or a path to one, with ``num_classes`` classes."""
    package = ultralytics()
    from ultralytics.nn.tasks import DetectionModel

    if not str(architecture).endswith((".yaml", ".yml")):
        raise KdpipeError(
            "a detection architecture is an Ultralytics model YAML (yolo11n.yaml, "
            f"yolo26n.yaml, or a path), not {architecture!r}"
        )
    try:
        model = DetectionModel(cfg=str(architecture), nc=num_classes, verbose=False)
    except (FileNotFoundError, KeyError, ValueError, TypeError) as exc:
        raise KdpipeError(f"cannot build {architecture} with Ultralytics "
                          f"{package.__version__}: {exc}") from None  # fmt: skip
    return model


def rebuild(yaml: dict, num_classes: int) -> torch.nn.Module:
    """The same architecture from the model's own YAML dict (as model.json stores it), so a
    run directory rebuilds offline without the YAML file."""
    ultralytics()
    from ultralytics.nn.tasks import DetectionModel

    return DetectionModel(cfg=dict(yaml), nc=num_classes, verbose=False)


def _allowed_classes() -> list[type]:
    ultralytics()
    import ultralytics.nn.modules.block as block
    import ultralytics.nn.modules.conv as conv
    import ultralytics.nn.modules.head as head
    import ultralytics.nn.modules.transformer as transformer
    import ultralytics.nn.tasks as tasks

    allowed: list[type] = [set]
    for module in (block, conv, head, transformer, tasks, torch.nn):
        allowed += [cls for _, cls in inspect.getmembers(module, inspect.isclass)
                    if issubclass(cls, torch.nn.Module)]  # fmt: skip
    return allowed


def load_checkpoint(path: str | Path) -> tuple[torch.nn.Module, dict]:
    """The model of an Ultralytics checkpoint (its EMA weights when present, as Ultralytics
    itself loads them) in float32 eval mode, and the checkpoint's other entries."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"no Ultralytics checkpoint at {path}")
    try:
        with torch.serialization.safe_globals(_allowed_classes()):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        first = " ".join(str(exc).split())[:240]
        raise ModelError(f"{path} is not an Ultralytics checkpoint kdpipe can read without "
                           f"running code from it (torch.load(weights_only=True) allowing "
                           f"torch and Ultralytics modules only): {first}") from None  # fmt: skip
    model = None
    if isinstance(checkpoint, dict):
        model = checkpoint.get("ema") or checkpoint.get("model")
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "stride"):
        raise ModelError(f"{path} holds no Ultralytics detection model (no 'model' entry)")
    head = model.model[-1]
    if type(head).__name__ != "Detect" or not hasattr(head, "nc"):
        raise ModelError(f"{path} holds a {type(head).__name__} model: kdpipe distils "
                           "detection models (a Detect head)")  # fmt: skip
    model = model.float().eval()
    others = {k: v for k, v in checkpoint.items() if k not in ("model", "ema", "optimizer")}
    return model, others


def head_outputs(model: torch.nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The raw head outputs of an eval-mode ``DetectionModel`` on a float batch in [0, 1]:
    ``boxes`` (B, 4 * reg_max, A) box logits (DFL distributions, or plain values when
    reg_max is 1) and ``scores`` (B, nc, A) class logits, anchors of every stride in
    Ultralytics' order (stride 8 row-major, then 16, then 32). For an end-to-end head
    (YOLO26) these are its one-to-many outputs, the ones its loss trains on."""
    output = model(images)
    raw = output[1] if isinstance(output, tuple | list) and len(output) > 1 else output
    if isinstance(raw, dict) and "one2many" in raw:
        raw = raw["one2many"]
    if not isinstance(raw, dict) or not {"boxes", "scores"} <= set(raw):
        raise KdpipeError(f"the model's head gave {type(raw).__name__}, not the boxes and "
                          "scores of an Ultralytics 8.4 Detect head")  # fmt: skip
    return {"boxes": raw["boxes"], "scores": raw["scores"]}


def with_loss_settings(model: torch.nn.Module) -> torch.nn.Module:
    """Ultralytics' detection loss reads its gains (box, cls, dfl) from ``model.args``, which
    its trainer sets; a model kdpipe trains gets Ultralytics' defaults the same way."""
    ultralytics()
    from ultralytics.cfg import get_cfg

    if not hasattr(model, "args") or isinstance(model.args, dict):
        model.args = get_cfg(overrides=getattr(model, "args", None) or {})
    return model
