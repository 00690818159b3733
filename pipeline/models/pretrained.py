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

import contextlib
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kdpipe.base.errors import ModelError, UsageError
from kdpipe.views.inputs import CROP_MODES, INTERPOLATIONS, DataConfig

if TYPE_CHECKING:  # for annotations: imported where they are used, so that a command
    # that reads records only loads no deep-learning library
    import torch
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
    source: dict  # source, pretrained_cfg tag, weights_from, weights_file and its SHA-256
    classes: tuple[str, ...] = ()  # the config's label_names, where they name the head
    warnings: tuple[str, ...] = ()  # for the person: e.g. a weights file at the tag's sizes


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A weights file as a flat state dict: safetensors, or a torch checkpoint read with
    ``torch.load(weights_only=True)`` (never arbitrary pickles), unwrapped the way timm
    unwraps checkpoints (``state_dict``, ``model``, EMA weights first; ``module.`` and
    ``_orig_mod.`` prefixes removed)."""
    import safetensors.torch
    import torch
    from timm.models import clean_state_dict, load_state_dict

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"weights file {path} does not exist")
    kind = _file_kind(path)
    if kind is not None:  # not safetensors, a zip checkpoint or a pickle: torch.load's
        # message about it (pickle globals, an empty stack) would name the wrong problem
        raise ModelError(
            f"{path} is not a weights file: it is {kind}, not safetensors or a torch "
            "checkpoint (torch.save's zip or pickle)"
        )
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


def _file_kind(path: Path) -> str | None:
    """What a file is when its first bytes are none of a weights file's (None: it may be
    one): safetensors, torch.save's zip (``PK``) and pickle (protocol 2+, ``0x80``)."""
    with open(path, "rb") as file:
        head = file.read(512)
    if not head:
        return "empty"
    if _is_safetensors(path) or head[:2] == b"PK" or head[:1] == b"\x80":
        return None
    if b"\x00" in head:
        return f"binary data starting {head[:8]!r}"
    text = head.decode("utf-8", errors="replace").strip()
    return f"a text file (it starts {text.splitlines()[0][:40]!r})" if text else "blank text"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# arguments kdpipe passes timm itself (from the card's num_classes and in_chans): a hub
# config's model_args (timm's save_for_hf writes both) must not give them a second time
_OWN_ARGS = ("num_classes", "in_chans")


def _source_config(kind: str, name: str, text: str) -> tuple[dict, str, dict]:
    """The source's ``pretrained_cfg``, architecture and constructor arguments, before any
    model is built (for the hub: its config.json, fetched by timm). The config.json is
    checked here first, so that a broken one is a line naming the file and the field."""
    import timm
    from kdpipe.models.registry import check_architecture

    if kind == "timm":
        check_architecture(name)
        try:
            cfg = timm.models.get_pretrained_cfg(name)
        except RuntimeError as exc:  # an unknown tag
            raise ModelError(f"{text}: {exc}") from None
        return (cfg.to_dict() if cfg else {}), name.split(".")[0], {}
    if kind == "hf-hub":
        repo, revision = _hub_repo(name)
        _check_fetchable(text, repo, revision, ("config.json",), "cannot read the model config")
        try:
            config_file = Path(timm.models._hub.download_from_hf(name, "config.json"))
        except Exception as exc:  # huggingface_hub's errors (404, auth) share no base
            raise ModelError(
                f"cannot read the model config of {text}: {_first_line(exc)}"
            ) from None
    else:
        folder = Path(name)
        config_file = folder / "config.json"
        if not folder.is_dir():
            raise ModelError(f"cannot read the model config of {text}: folder {folder} does "
                             "not exist")  # fmt: skip
        if not config_file.is_file():
            raise ModelError(
                f"cannot read the model config of {text}: {folder} has no config.json (timm's "
                "folder format: config.json and the weights, as timm.models.save_for_hf writes)"
            )
    _check_hub_config(config_file)
    try:
        if kind == "hf-hub":
            with _hub_offline():  # the file is in the cache now: no second network round
                cfg, arch, kwargs = timm.models.load_model_config_from_hf(name)
        else:
            from timm.models._hub import load_model_config_from_path

            cfg, arch, kwargs = load_model_config_from_path(name)
    except Exception as exc:  # what the checks above did not foresee, still on one line
        raise ModelError(f"timm cannot read {config_file}: {_first_line(exc)}") from None
    kwargs = {k: v for k, v in dict(kwargs or {}).items() if k not in _OWN_ARGS}
    return dict(cfg), arch, kwargs


def _check_hub_config(path: Path) -> None:
    """A hub config.json as timm reads it: a JSON object with an ``architecture`` timm
    knows, and ``pretrained_cfg``/``model_args`` objects, ``label_names`` a list (or a map
    of index to name) where they are given."""
    from kdpipe.models.registry import check_architecture

    try:
        config = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"cannot read {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ModelError(f"{path} holds a JSON {type(config).__name__}, not the object of "
                         "timm's model config (architecture, pretrained_cfg, ...)")  # fmt: skip
    architecture = config.get("architecture")
    if not isinstance(architecture, str) or not architecture:
        raise ModelError(f"{path} has no 'architecture' (the timm model name to build)")
    try:
        check_architecture(architecture)
    except ModelError as exc:
        raise ModelError(f"{path}: {exc}") from None
    for field, kinds in (("pretrained_cfg", dict), ("model_args", dict),
                         ("label_names", (list, dict))):  # fmt: skip
        if field in config and not isinstance(config[field], kinds):
            raise ModelError(f"{path}: {field!r} is a {type(config[field]).__name__}, not "
                             f"a JSON {'object' if kinds is dict else 'list'}")  # fmt: skip


def label_names(cfg: dict, head: int) -> list[str]:
    """The class names a hub config gives its head (timm's ``label_names``: a list, or a map
    of index to name), when they name exactly its ``head`` classes; else none."""
    names = cfg.get("label_names")
    if isinstance(names, dict):
        keys = {str(i): i for i in range(len(names))}
        if set(map(str, names)) != set(keys):
            return []
        names = [names.get(i, names.get(str(i))) for i in range(len(names))]
    if not isinstance(names, list | tuple) or len(names) != head:
        return []
    names = [str(n) for n in names]
    return names if len(set(names)) == len(names) else []


def _hub_repo(name: str) -> tuple[str, str | None]:
    """``ORG/NAME[@REVISION]`` as huggingface_hub takes it."""
    repo, _, revision = name.partition("@")
    return repo, revision or None


def _hub_files(cfg: dict) -> tuple[str | None, tuple[str, ...]]:
    """Where timm downloads a pretrained cfg's weights from on the hub: its repository and
    the files it tries (its ``hf_hub_filename``, or pytorch_model.bin with safetensors
    first), or no repository (a URL, a file)."""
    repo = cfg.get("hf_hub_id")
    if not repo:
        return None, ()
    from timm.models._hub import HF_WEIGHTS_NAME, _get_safe_alternatives

    filename = cfg.get("hf_hub_filename") or HF_WEIGHTS_NAME
    return repo, (*_get_safe_alternatives(filename), filename)


def _check_fetchable(
    text: str, repo: str, revision: str | None, files: tuple[str, ...], what: str
) -> None:
    """Fail at once, in one line, when ``repo``'s ``files`` are neither in huggingface_hub's
    cache nor downloadable: HF_HUB_OFFLINE is set, or the hub's host does not answer a
    3-second connection (huggingface_hub would retry for a minute before saying so)."""
    import huggingface_hub.constants as hub
    from huggingface_hub import try_to_load_from_cache

    if any(isinstance(try_to_load_from_cache(repo, f, revision=revision), str) for f in files):
        return
    why = "HF_HUB_OFFLINE is set" if hub.HF_HUB_OFFLINE else _unreachable(hub.ENDPOINT)
    if why is None:
        return
    instead = "--weights FILE" if "weights" in what else "a local-dir: folder of its files"
    hint = (
        f"use {instead}, or point HF_HUB_CACHE at a cache that has it"
        if hub.HF_HUB_OFFLINE
        else f"use {instead}, or set HF_HUB_OFFLINE=1 to use huggingface_hub's cache "
        "without the network"
    )
    raise ModelError(
        f"{what} of {text}: {why} and huggingface_hub's cache "
        f"({hub.HF_HUB_CACHE}) has no copy of {repo}: {hint}"
    )


def _unreachable(endpoint: str) -> str | None:
    """Why the hub at ``endpoint`` cannot be reached (None: it answers a connection)."""
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(endpoint)
    host, port = url.hostname or endpoint, url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as exc:
        return f"{host} cannot be reached ({exc.strerror or type(exc).__name__})"
    return None


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """huggingface_hub from its cache only, for a file just checked to be there."""
    import huggingface_hub.constants as hub

    was, hub.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE, True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = was


def _first_line(exc: BaseException) -> str:
    """An exception's type and first sentence: enough to name the problem on one line."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    line = text.splitlines()[0]
    return f"{type(exc).__name__}: {line.split('. ')[0] if len(line) > 120 else line}"


# timm's data-config keys (timm.data.resolve_data_config's args): what --data-config FILE
# and the preprocessing options may give, each replacing the pretrained_cfg's value
DATA_CONFIG_KEYS = ("input_size", "img_size", "mean", "std", "interpolation", "crop_pct",
                    "crop_mode")  # fmt: skip


def preprocessing(
    cfg: dict, text: str, in_chans: int | None = None, given: dict | None = None
) -> DataConfig:
    """The model's eval preprocessing: its ``pretrained_cfg``'s, with the values ``given``
    (timm's data-config keys) in their place, resolved by timm (``resolve_data_config``,
    the given ones as its ``args``); refused when neither gives a mean, std and size, which
    timm would fill with ImageNet's defaults without a word."""
    from timm.data import resolve_data_config

    given = check_data_config(given or {}, text)
    have = {**{k: v for k, v in cfg.items() if v}, **given}
    if "img_size" in given:
        have["input_size"] = given["img_size"]
    absent = [key for key in ("input_size", "mean", "std") if not have.get(key)]
    if absent:
        raise ModelError(
            f"{text}: its pretrained_cfg has no {', '.join(absent)}: kdpipe will not guess "
            "the preprocessing the weights were trained with (give it: --data-config FILE, "
            "--input-size, --mean, --std)"
        )
    args = dict(given)
    channels = (cfg.get("input_size") or given.get("input_size") or (3,))[0]
    if "input_size" in args and args["input_size"][0] not in (channels, in_chans):
        raise UsageError(f"{text}: the input_size given has {args['input_size'][0]} "
                         f"channel(s), the weights take {channels}")  # fmt: skip
    if "img_size" in args:  # a square of that side, the channels the weights'
        side = args.pop("img_size")
        args["input_size"] = (channels, side, side)
    if "input_size" in args:
        args["input_size"] = (channels, *args["input_size"][1:])
    args["in_chans"] = channels  # a mean or std of one value is repeated for each
    try:
        resolved = resolve_data_config(args=args, pretrained_cfg=cfg)
    except AssertionError:  # a mean or std of another length than the channels
        channels = (args.get("input_size") or cfg["input_size"])[0]
        raise ModelError(f"{text}: the mean and std given need 1 or {channels} values (one "
                         "per channel)") from None  # fmt: skip
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


def check_data_config(given: dict, where: str) -> dict:
    """Preprocessing values in timm's data-config keys, each checked (one line naming the
    key and the value at fault); None values dropped, as timm does."""
    if not isinstance(given, dict):
        raise UsageError(f"{where}: a data config is a JSON object of timm's keys "
                         f"({', '.join(DATA_CONFIG_KEYS)})")  # fmt: skip
    given = {k: v for k, v in given.items() if v is not None}
    unknown = sorted(set(given) - set(DATA_CONFIG_KEYS))
    if unknown:
        raise UsageError(f"{where}: unknown data config key(s) {', '.join(unknown)} (timm's "
                         f"keys: {', '.join(DATA_CONFIG_KEYS)})")  # fmt: skip

    def number(value: object) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool)

    def bad(key: str, want: str) -> UsageError:
        return UsageError(f"{where}: data config {key} {given[key]!r} is not {want}")

    size = given.get("input_size")
    if size is not None and not (
        isinstance(size, list | tuple) and len(size) == 3
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in size)
    ):  # fmt: skip
        raise bad("input_size", "[C, H, W] of integers >= 1")
    size = given.get("img_size")
    if size is not None and not (isinstance(size, int) and not isinstance(size, bool)
                                 and size >= 1):  # fmt: skip
        raise bad("img_size", "an integer >= 1")
    for key in ("mean", "std"):
        values = given.get(key)
        if values is not None and not (
            isinstance(values, list | tuple) and values and all(number(v) for v in values)
            and (key == "mean" or min(values) > 0)
        ):  # fmt: skip
            raise bad(key, "a list of numbers" + (" > 0" if key == "std" else ""))
    if "interpolation" in given and given["interpolation"] not in INTERPOLATIONS:
        raise bad("interpolation", f"one of {', '.join(INTERPOLATIONS)}")
    if "crop_pct" in given and not (number(given["crop_pct"]) and 0 < given["crop_pct"] <= 4):
        raise bad("crop_pct", "in (0, 4]")
    if "crop_mode" in given and given["crop_mode"] not in CROP_MODES:
        raise bad("crop_mode", f"one of {', '.join(CROP_MODES)}")
    return given


def read_data_config(path: Path) -> dict:
    """``--data-config FILE.json``: timm's data-config keys (what
    ``timm.data.resolve_data_config`` returns, or the preprocessing part of a
    ``pretrained_cfg``), checked."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read the data config {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path} holds a JSON {type(data).__name__}, not an object of timm's "
                         f"data-config keys ({', '.join(DATA_CONFIG_KEYS)})")  # fmt: skip
    return check_data_config(data, str(path))


def head_size(state: dict[str, torch.Tensor], cfg: dict) -> int | None:
    """The number of classes a state dict's classifier predicts (None when the cfg names no
    classifier or the state has none)."""
    classifier = cfg.get("classifier")
    if isinstance(classifier, list | tuple):
        classifier = classifier[0] if classifier else None
    weight = state.get(f"{classifier}.weight") if classifier else None
    return int(weight.shape[0]) if weight is not None and weight.dim() >= 1 else None


# where a pretrained teacher's weights came from (``source["weights_from"]``), as lineage
# names it: timm's download of a registry tag, the Hugging Face hub's repository of an
# hf-hub: SOURCE, the weights file of a local-dir: folder, or a --weights FILE
WEIGHTS_FROM = ("timm-download", "hf-hub", "local-dir", "weights-file")


def create_pretrained(
    text: str,
    *,
    weights: Path | None = None,
    num_classes: int | None = None,
    in_chans: int | None = None,
    drop_rate: float | None = None,
    data_config: dict | None = None,
) -> Pretrained:
    """A SOURCE's model with its pretrained weights (downloaded by timm, the local-dir
    folder's file, or the weights file), its head as the weights have it, and its
    preprocessing: the ``pretrained_cfg``'s, with the values of ``data_config`` (timm's
    data-config keys) in their place.

    ``num_classes`` is a check, not a new head: a head of another size is an error naming
    both numbers (``train-teacher --pretrained`` gives a new head with timm's
    ``reset_classifier``). A weights file of one's own with no ``data_config`` keeps the
    pretrained_cfg's preprocessing, with a warning in ``Pretrained.warnings``: those are
    the tag's weights' values, not necessarily the file's.
    """
    import timm
    from kdpipe.models.registry import weights_sha256

    kind, name = parse_source(text)
    cfg, architecture, model_kwargs = _source_config(kind, name, text)
    given = check_data_config(dict(data_config or {}), text)
    resolved = preprocessing(cfg, text, in_chans, given)
    model_kwargs, built = _sized(architecture, resolved, model_kwargs)
    file = _folder_weights(name) if weights is None and kind == "local-dir" else weights
    state = None if file is None else read_weights(file)
    head = cfg.get("num_classes") if state is None else head_size(state, cfg)
    where = str(file) if file is not None else text
    if head is None:
        raise ModelError(f"{where} has no classifier {cfg.get('classifier')!r}: "
                         f"{_mismatch(architecture, state, cfg, model_kwargs)}")  # fmt: skip
    if num_classes is not None and num_classes != head:
        raise ModelError(f"{where} predicts {head} classes, not the {num_classes} asked for")
    if state is None:  # timm downloads them: fail now, not after a minute of retries
        repo, files = _hub_files(cfg)
        if repo is not None:
            _check_fetchable(text, *_hub_repo(repo), files, "cannot fetch the pretrained weights")
    timm_name = name if kind == "timm" else text
    overlay = {"num_classes": head}
    if state is not None:  # the file, not the hub or a URL (source: timm's own order)
        overlay |= {"state_dict": state, "source": "timm"}
    try:
        model = timm.create_model(
            timm_name, pretrained=True, num_classes=head, in_chans=in_chans,
            drop_rate=drop_rate, pretrained_cfg_overlay=overlay, **built,
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
            "pass --weights FILE, or set HF_HUB_OFFLINE=1 to use huggingface_hub's cache)"
        ) from None
    model.pretrained_cfg = {k: v for k, v in model.pretrained_cfg.items() if k != "state_dict"}
    tag = f"{architecture}.{cfg['tag']}" if cfg.get("tag") else architecture
    origin = "weights-file" if weights is not None else {"timm": "timm-download"}.get(kind, kind)
    record = {
        "source": text,
        "pretrained_cfg": tag,
        "weights_from": origin,
        "weights_file": None if file is None else str(file),
        "weights_file_sha256": None if file is None else file_sha256(Path(file)),
        "weights_sha256": weights_sha256(model),  # the pretrained weights, as loaded
    }
    if given:  # absent when the pretrained_cfg's: records made before it keep their form
        record["data_config_given"] = dict(given)
    notes = []
    if weights is not None and not given:
        size = "x".join(map(str, resolved.input_size[1:]))
        notes.append(
            f"warning: {weights} is evaluated at the preprocessing of {tag}'s pretrained_cfg "
            f"({size} px, {resolved.interpolation}, crop_pct {resolved.crop_pct:g}, mean "
            f"{_short(resolved.mean)}, std {_short(resolved.std)}): the values its own weights "
            "were measured with; if this file was trained otherwise, give them "
            "(--data-config FILE.json, or --input-size, --mean, --std, --interpolation, "
            "--crop-pct)"
        )
    classes = label_names(cfg, head) if weights is None else []
    return Pretrained(model=model.eval(), architecture=architecture, model_kwargs=model_kwargs,
                      data_config=resolved, source=record, classes=tuple(classes),
                      warnings=tuple(notes))  # fmt: skip


def _sized(architecture: str, resolved: DataConfig, model_kwargs: dict) -> tuple[dict, dict]:
    """The source's constructor arguments with, for kdpipe's own networks (timm:kd_cnn...),
    the input size they are built at (their dense layer is sized by it, as train-teacher
    built them; timm's own adapt by themselves); and those added, for timm.create_model."""
    from kdpipe.models.registry import resolve_model_kwargs

    sized = resolve_model_kwargs(architecture, resolved, model_kwargs)
    return sized, {k: v for k, v in sized.items() if k not in model_kwargs}


def _short(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def _folder_weights(name: str) -> Path:
    """The weights file of a local-dir: folder, found as timm finds it (its preferred names,
    then the first file of each extension), so that kdpipe reads and hashes that file."""
    from timm.models._hub import _EXT_PRIORITY, _PREFERRED_FILES

    folder = Path(name)
    for candidate in (folder / f for f in _PREFERRED_FILES):
        if candidate.is_file():
            return candidate
    for ext in _EXT_PRIORITY:
        found = sorted(p for p in folder.glob(f"*{ext}") if p.is_file())
        if found:
            return found[0]
    raise ModelError(f"local-dir:{name}: {folder} has no weights file (model.safetensors or "
                     f"pytorch_model.bin beside its config.json)")  # fmt: skip


def source_architecture(text: str) -> str:
    """The timm architecture a SOURCE builds (for the hub: from its config.json)."""
    kind, name = parse_source(text)
    return _source_config(kind, name, text)[1]


def _mismatch(architecture: str, state: dict | None, cfg: dict, model_kwargs: dict) -> str:
    """Why a state dict does not fit the source's architecture, in one line (a blank model
    is built only on this error path)."""
    import timm
    from kdpipe.models.registry import state_mismatch

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
