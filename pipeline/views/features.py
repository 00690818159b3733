"""Named intermediate layers of a model: which names exist, and what they output in the
same forward pass as the logits.

A layer is named the way timm names it: a module name of the model's ``feature_info``
(e.g. ``layer3`` of a ResNet, ``features.7`` of ``kd_cnn``), its index in
``feature_info`` (the indices of timm's ``forward_intermediates``), or ``pre_logits``
(the pooled input of the classifier, ``forward_head(pre_logits=True)``). Outputs are
captured by forward hooks during the ordinary forward, so the features of a view are
those of the very pass that gave its logits, never recomputed or transformed after the
fact. The teacher pass (:mod:`kdpipe.models.teach`) stores them; the student's training step
(:mod:`kdpipe.train.step`) taps its own layer the same way, with gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from kdpipe.base.errors import UsageError
from kdpipe.cache import CachedLayer, layer_array
from torch import nn

PRE_LOGITS = "pre_logits"


def feature_layers(model: nn.Module) -> dict[str, str]:
    """Every name a layer of ``model`` may be asked by → its canonical name (the module
    name, or ``pre_logits``)."""
    info = getattr(model, "feature_info", None) or []
    entries = info.get_dicts() if hasattr(info, "get_dicts") else list(info)
    names = {}
    for index, entry in enumerate(entries):
        names[entry["module"]] = entry["module"]
        names[str(index)] = entry["module"]
    if hasattr(model, "get_classifier"):
        names[PRE_LOGITS] = PRE_LOGITS
    return names


def resolve_layer(model: nn.Module, name: str, who: str) -> str:
    """The canonical name of layer ``name`` of ``model``; an unknown name is one line that
    lists the valid ones."""
    names = feature_layers(model)
    if name not in names:
        valid = ", ".join(dict.fromkeys(names.values())) or "none"
        raise UsageError(f"{who} has no layer {name!r}: valid layers are {valid} "
                         "(or their indices in feature_info)")  # fmt: skip
    return names[name]


def _module_of(model: nn.Module, layer: str) -> tuple[nn.Module, bool]:
    """The module to hook and whether its input (pre_logits) rather than its output."""
    if layer == PRE_LOGITS:
        return model.get_classifier(), True
    return model.get_submodule(layer), False


def attention_map(activations: torch.Tensor, grid: int | None = None) -> torch.Tensor:
    r"""Zagoruyko & Komodakis (2017), "Paying More Attention to Attention": the spatial
    attention map of activations :math:`A \in \mathbb{R}^{N \times C \times H \times W}`,

    .. math:: Q = \mathrm{vec}\Big(\frac{1}{C}\sum_c A_c^2\Big), \qquad Q / \lVert Q \rVert_2

    in float32, ``(N, H*W)``; with ``grid``, the map of squares is average-pooled to
    ``grid x grid`` before flattening and normalising.
    """
    if activations.dim() != 4:
        raise UsageError(
            f"an attention map needs a spatial map (N, C, H, W), not shape "
            f"{tuple(activations.shape)}"
        )
    squares = activations.float().pow(2).mean(dim=1, keepdim=True)
    if grid is not None:
        squares = F.adaptive_avg_pool2d(squares, grid)
    return F.normalize(squares.flatten(1), dim=1)


def reduce_layer(output: torch.Tensor, kind: str, grid: int | None) -> torch.Tensor:
    """A layer's batch output as cached: the activations (a spatial map average-pooled to
    ``grid x grid`` when given), or its attention map; float32."""
    if kind == "attention":
        return attention_map(output, grid)
    output = output.float()
    if grid is not None and output.dim() == 4:
        output = F.adaptive_avg_pool2d(output, grid)
    return output


@dataclass(frozen=True)
class LayerRequest:
    """One layer to tap: its canonical name, features or attention, and the pooling grid."""

    name: str
    kind: str
    grid: int | None = None

    @property
    def array(self) -> str:
        return layer_array(self.kind, self.name)

    def record(self, shape: Sequence[int], spatial: bool) -> CachedLayer:
        """The manifest's record, given the per-row shape as cached and whether the layer's
        output is a spatial map (only those are pooled)."""
        pooled = self.grid is not None and spatial
        pooling = f"adaptive-avg {self.grid}x{self.grid}" if pooled else "none"
        return CachedLayer(name=self.name, kind=self.kind, array=self.array,
                           shape=[int(v) for v in shape], pooling=pooling)  # fmt: skip


class LayerTaps:
    """Forward hooks on the requested layers of a model, for the duration of a ``with``.

    After each forward, :meth:`outputs` gives each request's reduced batch output (keyed
    by its array name), with gradients when the forward had them (a student), detached
    (a teacher) otherwise.
    """

    def __init__(self, model: nn.Module, requests: Sequence[LayerRequest]) -> None:
        self.model, self.requests = model, tuple(requests)
        self.captured: dict[str, torch.Tensor] = {}
        self.collected: dict[str, list[torch.Tensor]] = {}
        self.handles: list = []

    def __enter__(self) -> LayerTaps:
        for layer in dict.fromkeys(r.name for r in self.requests):
            module, inputs = _module_of(self.model, layer)

            def keep(_module, args, result=None, layer=layer, inputs=inputs) -> None:
                value = args[0] if inputs else result
                # a clone: a later in-place op (ReLU(inplace=True)) must not change it
                self.captured[layer] = value.clone()

            if inputs:
                self.handles.append(module.register_forward_pre_hook(keep))
            else:
                self.handles.append(module.register_forward_hook(keep))
        return self

    def __exit__(self, *_: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def outputs(self) -> dict[str, torch.Tensor]:
        """The last forward's output of each request, reduced (:func:`reduce_layer`)."""
        missing = [r.name for r in self.requests if r.name not in self.captured]
        if missing:
            raise UsageError(f"layer(s) {', '.join(missing)} did not run in the forward pass")
        found = {r.array: reduce_layer(self.captured[r.name], r.kind, r.grid)
                 for r in self.requests}  # fmt: skip
        self.captured.clear()
        return found

    def collect(self) -> None:
        """Keep the last forward's outputs on the CPU (a teacher pass, batch by batch)."""
        for array, value in self.outputs().items():
            self.collected.setdefault(array, []).append(value.detach().cpu())

    def take(self) -> dict[str, torch.Tensor]:
        """Everything collected since the last ``take``, rows in order."""
        taken = {array: torch.cat(values) for array, values in self.collected.items()}
        self.collected.clear()
        return taken
