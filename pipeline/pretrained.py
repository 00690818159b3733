"""Pretrained teachers: timm's model names and weights files, created through timm.

A teacher SOURCE is one of timm's own names for pretrained weights:

- ``timm:ARCH`` or ``timm:ARCH.TAG``: an architecture of timm's registry with the
  weights and ``pretrained_cfg`` of its (default) pretrained tag;
- ``hf-hub:ORG/NAME``: a model on the Hugging Face hub in timm's format
  (``config.json`` and weights);
- ``local-dir:PATH``: the same two files in a local folder.

Weights come through ``timm.create_model(..., pretrained=True)``: downloaded by timm
(and cached by ``huggingface_hub``) when there is a network, or, with a weights file,
read here and handed to timm as ``pretrained_cfg_overlay=dict(state_dict=...)``, so
that timm's own loading (input-conv adaptation, strict keys) applies to both.

The model's preprocessing is its ``pretrained_cfg``'s (input size, mean, std,
interpolation, crop_pct, crop_mode), never the dataset's statistics and never a
default: a ``pretrained_cfg`` without its own mean, std and input size is refused.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import safetensors
import safetensors.torch
import timm
import torch
from kdpipe.errors import ModelError, UsageError
from kdpipe.inputs import DataConfig
from kdpipe.models import check_architecture, state_mismatch, weights_sha256
from torch import nn

SOURCE_KINDS = ("timm", "hf-hub", "local-dir")
# what a SOURCE looks like: a scheme, a colon, and no "//" (an fsspec URL is a path)
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9_-]*):(?!//)(.*)$")


def looks_like_source(text: str | Path) -> bool:
    """True for ``scheme:rest`` that is not an existing path: a SOURCE, known or not."""
    return bool(_SCHEME.match(str(text))) and not Path(text).exists()


def parse_source(text: str) -> tuple[str, str]:
    """``(kind, name)`` of a SOURCE, or one line naming the forms it may take."""
    match = _SCHEME.match(text)
    if match is None or match.group(1) not in SOURCE_KINDS or not match.group(2):
        raise UsageError(
            f"unknown teacher source {text!r}: use timm:ARCH, hf-hub:ORG/NAME, "
            "local-dir:PATH or a kdpipe run directory"
        )
    return match.group(1), match.group(2)


@dataclass(frozen=True)
class Pretrained:
    """A pretrained model with its own preprocessing and a record of where it came from."""

    model: nn.Module
    architecture: str  # timm's architecture name: enough to rebuild it without the source
    model_kwargs: dict  # the source's own constructor arguments (a hub config's model_args)
    data_config: DataConfig
    source: dict  # source, pretrained_cfg tag, weights_file and its file SHA-256


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A weights file as a flat state dict: safetensors, or a torch checkpoint read with
    ``torch.load(weights_only=True)`` (never arbitrary pickles), unwrapped the way timm
    unwraps checkpoints (``state_dict``, ``model``, EMA weights first; ``module.`` and
    ``_orig_mod.`` prefixes removed)."""
    from timm.models import clean_state_dict, load_state_dict

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"weights file {path} does not exist")
    try:
        if _is_safetensors(path):
            state = clean_state_dict(safetensors.torch.load_file(str(path)))
        else:
            state = load_state_dict(str(path), weights_only=True)
    except AttributeError:  # timm's unwrapping met something else than a mapping (a tensor)
        state = None
    except Exception as exc:  # torch's unpickler raises what the bytes make it (KeyError ...)
        raise ModelError(
            f"{path} is not a weights file (safetensors, or a torch checkpoint that "
            f"torch.load(weights_only=True) reads): {_first_line(exc)}"
        ) from None
    if not (isinstance(state, dict) and state and all(
        isinstance(v, torch.Tensor) for v in state.values()
    )):  # fmt: skip
        raise ModelError(
            f"{path} holds no state dict (a mapping of names to tensors, at the top or "
            "under 'state_dict' or 'model')"
        )
    return state


def _is_safetensors(path: Path) -> bool:
    """safetensors by content, whatever the suffix: an 8-byte header length, then JSON."""
    with open(path, "rb") as file:
        head = file.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 1


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _source_config(kind: str, name: str, text: str) -> tuple[dict, str, dict]:
    """The source's ``pretrained_cfg``, architecture and constructor arguments, before any
    model is built (for the hub: its config.json, fetched by timm)."""
    if kind == "timm":
        check_architecture(name)
        try:
            cfg = timm.models.get_pretrained_cfg(name)
        except RuntimeError as exc:  # an unknown tag
            raise ModelError(f"{text}: {exc}") from None
        return (cfg.to_dict() if cfg else {}), name.split(".")[0], {}
    try:
        if kind == "hf-hub":
            cfg, arch, kwargs = timm.models.load_model_config_from_hf(name)
        else:
            from timm.models._hub import load_model_config_from_path

            cfg, arch, kwargs = load_model_config_from_path(name)
    except Exception as exc:  # huggingface_hub's errors (offline, 404, auth) share no base
        raise ModelError(
            f"cannot read the model config of {text}: {_first_line(exc)} (offline? timm "
            "downloads it when a network exists; or use a local-dir: folder)"
        ) from None
    return dict(cfg), arch, dict(kwargs or {})


def _first_line(exc: BaseException) -> str:
    """An exception's type and first sentence: enough to name the problem on one line."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    line = text.splitlines()[0]
    return f"{type(exc).__name__}: {line.split('. ')[0] if len(line) > 120 else line}"


def preprocessing(cfg: dict, text: str, in_chans: int | None = None) -> DataConfig:
    """The model's own eval preprocessing from its ``pretrained_cfg``, resolved by timm
    (``resolve_data_config``); refused when the cfg lacks its own mean, std or size, which
    timm would fill with ImageNet's defaults without a word."""
    from timm.data import resolve_data_config

    absent = [key for key in ("input_size", "mean", "std") if not cfg.get(key)]
    if absent:
        raise ModelError(
            f"{text}: its pretrained_cfg has no {', '.join(absent)}: kdpipe will not guess "
            "the preprocessing the weights were trained with"
        )
    resolved = resolve_data_config(pretrained_cfg=cfg)
    mean, std = tuple(resolved["mean"]), tuple(resolved["std"])
    size = tuple(int(v) for v in resolved["input_size"])
    if in_chans is not None and in_chans != size[0]:
        # timm adapts the first convolution to the channels (sums RGB into one); the
        # input statistics follow as the channel average
        mean, std = (sum(mean) / len(mean),) * in_chans, (sum(std) / len(std),) * in_chans
        size = (in_chans, *size[1:])
    return DataConfig(
        input_size=size,
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),
        interpolation=str(resolved["interpolation"]),
        crop_pct=float(resolved["crop_pct"]),
        crop_mode=str(resolved.get("crop_mode") or "center"),
    )


def head_size(state: dict[str, torch.Tensor], cfg: dict) -> int | None:
    """The number of classes a state dict's classifier predicts (None when the cfg names no
    classifier or the state has none)."""
    classifier = cfg.get("classifier")
    if isinstance(classifier, list | tuple):
        classifier = classifier[0] if classifier else None
    weight = state.get(f"{classifier}.weight") if classifier else None
    return int(weight.shape[0]) if weight is not None and weight.dim() >= 1 else None


def create_pretrained(
    text: str,
    *,
    weights: Path | None = None,
    num_classes: int | None = None,
    in_chans: int | None = None,
    drop_rate: float | None = None,
) -> Pretrained:
    """A SOURCE's model with its pretrained weights (downloaded by timm, or the weights
    file), its head as the weights have it, and its own preprocessing.

    ``num_classes`` is a check, not a new head: a head of another size is an error naming
    both numbers (``train-teacher --pretrained`` gives a new head with timm's
    ``reset_classifier``).
    """
    kind, name = parse_source(text)
    cfg, architecture, model_kwargs = _source_config(kind, name, text)
    data_config = preprocessing(cfg, text, in_chans)
    state = None if weights is None else read_weights(weights)
    head = cfg.get("num_classes") if state is None else head_size(state, cfg)
    where = str(weights) if weights is not None else text
    if head is None:
        raise ModelError(f"{where} has no classifier {cfg.get('classifier')!r}: "
                         f"{_mismatch(architecture, state, cfg, model_kwargs)}")  # fmt: skip
    if num_classes is not None and num_classes != head:
        raise ModelError(f"{where} predicts {head} classes, not the {num_classes} asked for")
    timm_name = name if kind == "timm" else text
    overlay = {"num_classes": head}
    if state is not None:  # the file, not the hub or a URL (source: timm's own order)
        overlay |= {"state_dict": state, "source": "timm"}
    try:
        model = timm.create_model(
            timm_name, pretrained=True, num_classes=head, in_chans=in_chans,
            drop_rate=drop_rate, pretrained_cfg_overlay=overlay,
        )  # fmt: skip
    except RuntimeError as exc:  # timm's strict load_state_dict, or no weights to load
        if state is None:
            raise ModelError(f"cannot load the pretrained weights of {text}: "
                             f"{_first_line(exc)}") from None  # fmt: skip
        why = _mismatch(architecture, state, cfg, model_kwargs)
        raise ModelError(f"{where} does not fit {architecture}: {why}") from None
    except Exception as exc:  # a download that failed: huggingface_hub's or urllib's errors
        raise ModelError(
            f"cannot fetch the pretrained weights of {text}: {_first_line(exc)} (offline? "
            "pass --weights FILE)"
        ) from None
    model.pretrained_cfg = {k: v for k, v in model.pretrained_cfg.items() if k != "state_dict"}
    record = {
        "source": text,
        "pretrained_cfg": f"{architecture}.{cfg['tag']}" if cfg.get("tag") else architecture,
        "weights_file": None if weights is None else str(weights),
        "weights_file_sha256": None if weights is None else file_sha256(Path(weights)),
        "weights_sha256": weights_sha256(model),  # the pretrained weights, as loaded
    }
    return Pretrained(model=model.eval(), architecture=architecture, model_kwargs=model_kwargs,
                      data_config=data_config, source=record)  # fmt: skip


def source_architecture(text: str) -> str:
    """The timm architecture a SOURCE builds (for the hub: from its config.json)."""
    kind, name = parse_source(text)
    return _source_config(kind, name, text)[1]


def _mismatch(architecture: str, state: dict | None, cfg: dict, model_kwargs: dict) -> str:
    """Why a state dict does not fit the source's architecture, in one line (a blank model
    is built only on this error path)."""
    if state is None:
        return "no weights"
    blank = timm.create_model(
        architecture,
        num_classes=head_size(state, cfg) or cfg.get("num_classes") or 1000,
        **model_kwargs,
    )
    return state_mismatch(blank, state) or "weights of another architecture"


def read_class_names(path: Path) -> list[str]:
    """Class names, one per line (blank lines ignored), or a JSON list of strings."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read the class names in {path}: {exc}") from None
    if text.lstrip().startswith("["):
        try:
            names = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path} is not a JSON list of class names ({exc})") from None
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise UsageError(f"{path}: class names must be distinct strings, one per line")
    return names
