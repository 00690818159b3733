"""Quantization-aware distillation from the cache: ``kdpipe qat``.

A trained float32 student is fine-tuned with fake-quantized weights and
activations against the same cached soft labels it was distilled on: the same
α, T, rows, stored views and replay schedule as a cached run (the training
room's ``TrainData`` from the cache and its ``fit`` loop, whose step is
``distillation_loss``). The teacher is never loaded: the soft labels are the
cache's. The NVIDIA and Intel toolkits run the teacher live during
quantization-aware distillation; here it costs nothing beyond student steps.

Quantization is torchao's PT2E flow, no hand-written quantizer: the student is
captured with ``torch.export``, ``prepare_qat_pt2e`` with ``X86InductorQuantizer``
(int8 symmetric per-channel weights, uint8 per-tensor activations, conv+BN folded
as QAT does it) inserts fake-quantize nodes whose observers learn the activation
ranges during training, and ``convert_pt2e`` turns them into quantize/dequantize
pairs. That converted graph exports with torch's ONNX exporter as QDQ nodes, the
same form as ONNX Runtime's static quantization writes, so the QAT ranges and
weights are what ships (``model.int8.onnx`` in the run directory).

The run directory is an ordinary run (``load_model``, ``evaluate``, ``lineage``
work on it) of kind ``qat-student``: ``model.safetensors`` holds the QAT-trained
weights in the float32 module (their fake-quant free form), ``model.json``'s
lineage names the cache and the float32 run it started from.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from kdpipe.base.checks import alpha_problem, temperature_problem
from kdpipe.base.errors import ExportError, UsageError
from kdpipe.base.runtime import prepare_output, quiet, software_versions
from kdpipe.cache import load_soft_labels, utc_now
from kdpipe.data.datasets import ImageSet, check_classes
from kdpipe.export.onnx import (
    FP32_TOLERANCE,
    check_against,
    check_inputs,
    to_onnx,
    write_checked,
)
from kdpipe.models.registry import create_model, param_count, weights_sha256
from kdpipe.models.runs import (
    CONFIG_FILE,
    RUN_FORMAT_VERSION,
    ModelCard,
    load_model,
    read_config,
    save_model,
    write_json,
)
from kdpipe.train.checkpoint import remove_checkpoint
from torch import nn

if TYPE_CHECKING:
    from kdpipe.train import TrainConfig

INT8_FILE = "model.int8.onnx"
QUANTIZER = "torchao X86InductorQuantizer (is_qat=True), weights in -64..63"
# int8 weights in 7 bits (-64..63): a CPU without VNNI (AVX2, AVX-512F) multiplies uint8
# activations by int8 weights with vpmaddubsw, which adds two products into a saturating
# int16 (255 * 127 * 2 = 64770 > 32767). ONNX Runtime's fused QLinearConv/QGemm then
# clip where PyTorch (and a VNNI CPU, whose vpdpbusd adds in int32) do not: on an AVX2
# EPYC the QAT file's logits were 0.49 from the converted model (0.003 with ONNX Runtime's
# fusions off), and 0.008 with 7-bit weights, which cannot saturate (255 * 64 * 2 =
# 32640): the file computes the same on every x86 CPU. ONNX Runtime's reduce_range and
# torchao's reduce_range are the same advice for CPUs without VNNI.
WEIGHT_RANGE = (-64, 63)


@dataclass(frozen=True, kw_only=True)
class QatConfig:
    """A QAT run: which float32 run, which cache, and the fine-tuning schedule."""

    run: str  # the float32 student (a finished run directory)
    cache: str
    data: str
    out: str
    epochs: int = 3
    lr: float = 0.005
    batch_size: int = 128
    alpha: float | None = None  # default: the float32 run's
    temperature: float | None = None  # default: the float32 run's
    seed: int = 0
    eval_every: int = 1
    data_root: str = "data"
    image_size: int | None = None
    channels: int | None = None
    resize: str | None = None
    check_rows: int = 256
    overwrite: bool = False

    def validate(self) -> None:
        checks = (
            (self.epochs >= 1, f"--epochs must be >= 1, not {self.epochs}"),
            (self.lr > 0, f"--lr must be > 0, not {self.lr}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, not {self.batch_size}"),
            (
                self.alpha is None or alpha_problem(self.alpha) is None,
                "" if self.alpha is None else alpha_problem(self.alpha),
            ),
            (
                self.temperature is None or temperature_problem(self.temperature) is None,
                "" if self.temperature is None else temperature_problem(self.temperature),
            ),
            (self.check_rows >= 1, f"--check-rows must be >= 1, not {self.check_rows}"),
        )
        for ok, message in checks:
            if not ok:
                raise UsageError(message)


def _train_config(config: QatConfig, fp32_card: ModelCard, fp32_config: dict) -> TrainConfig:
    """The training room's configuration for the fine-tuning: the float32 run's α and T
    (or the ones given), its model options, a CPU float32 step (PT2E's fake-quant)."""
    from kdpipe.train import TrainConfig

    lineage = fp32_card.lineage or {}
    alpha = config.alpha if config.alpha is not None else lineage.get("alpha", 1.0)
    temperature = config.temperature or lineage.get("temperature")
    hidden = fp32_config.get("hidden_sizes")
    return TrainConfig(
        model=fp32_card.architecture,
        data=config.data,
        out=config.out,
        epochs=config.epochs,
        data_root=config.data_root,
        image_size=config.image_size,
        channels=config.channels,
        resize=config.resize,
        batch_size=config.batch_size,
        eval_every=config.eval_every,
        lr=config.lr,
        seed=config.seed,
        hidden_sizes=tuple(hidden) if hidden else None,
        cache=config.cache,
        alpha=alpha,
        temperature=temperature,
        device="cpu",
        precision="fp32",
        overwrite=config.overwrite,
    )


def _import_torchao() -> None:
    """torchao logs a deprecation note through torch's pytree logger at import: not the
    user's concern, so it is imported once with that logger quiet."""
    logger = logging.getLogger("torch.utils._pytree")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import torchao.quantization.pt2e  # noqa: F401
    finally:
        logger.setLevel(level)


def without_dropout(model: nn.Module) -> nn.Module:
    """The model with every ``nn.Dropout`` replaced by the identity. torchao 0.18's
    train/eval switch for exported graphs (``_replace_dropout`` in
    ``pt2e/export_utils.py``) rewrites every dropout it finds to ``p=0.5``, whatever its
    rate: kdpipe's students train with ``p=0`` (the identity, kept only for the state-dict
    layout), and the QAT fine-tuning runs without dropout."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Dropout):
            setattr(model, name, nn.Identity())
        else:
            without_dropout(child)
    return model


def prepare_qat(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """``torch.export`` capture (dynamic batch), then torchao's ``prepare_qat_pt2e``. The
    result answers ``.train()``/``.eval()`` (BatchNorm and dropout switch as in eager)."""
    _import_torchao()
    from torchao.quantization.pt2e import allow_exported_model_train_eval

    model = without_dropout(model)
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    model = model.cpu().train().to(memory_format=torch.contiguous_format)
    batch = torch.export.Dim("batch", min=1)
    try:
        captured = torch.export.export(
            model, (example.contiguous(),), dynamic_shapes=({0: batch},)
        ).module()
    except Exception as exc:  # torch.export raises many kinds for untraceable code
        raise ExportError(f"torch.export cannot capture the model for QAT: {exc}") from None
    left = [n for n in captured.graph.nodes if "dropout" in str(n.target)]
    if left:
        raise ExportError(
            f"the model applies dropout outside nn.Dropout modules ({left[0].target}): "
            "torchao's train/eval switch would rewrite it to p=0.5, so QAT refuses it"
        )
    default = get_default_x86_inductor_quantization_config(is_qat=True)
    low, high = WEIGHT_RANGE
    config = replace(default, weight=replace(default.weight, quant_min=low, quant_max=high))
    quantizer = X86InductorQuantizer().set_global(config)
    prepared = prepare_qat_pt2e(captured, quantizer)
    allow_exported_model_train_eval(prepared)
    return prepared


class QatStudent(nn.Module):
    """The prepared PT2E graph as the training loop sees it. PT2E shares one observer
    between tensors that must share a range (the input and output of max pooling), so
    its state dict names some buffers twice; safetensors refuses aliases, and the
    epoch checkpoint keeps each shared buffer under its first name."""

    def __init__(self, graph: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.graph = graph
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.graph(x)

    def state_dict(self, *args, **kwargs):  # type: ignore[override]
        state = super().state_dict(*args, **kwargs)
        seen, kept = set(), {}
        for name, tensor in state.items():
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape)
            if key not in seen:
                seen.add(key)
                kept[name] = tensor
        return type(state)(kept)


def convert_qat(prepared: nn.Module) -> nn.Module:
    """Fake-quantize nodes to quantize/dequantize pairs (int8 weights stored), eval mode."""
    from torchao.quantization.pt2e import allow_exported_model_train_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    prepared.eval()
    converted = convert_pt2e(prepared)
    allow_exported_model_train_eval(converted)
    converted.eval()  # the patched eval returns None, unlike nn.Module.eval
    return converted


def float_weights(prepared: nn.Module, fp32: nn.Module) -> nn.Module:
    """The QAT-trained weights and BatchNorm statistics back in the float32 module: PT2E
    keeps the original parameter and buffer names, the observers are extra."""
    state = prepared.state_dict()
    wanted = fp32.state_dict()
    missing = sorted(set(wanted) - set(state))
    if missing:
        raise ExportError(
            f"the QAT graph lost weights of the float32 model: {', '.join(missing[:5])}"
        )
    fp32.load_state_dict({name: state[name] for name in wanted})
    return fp32


def qat_distill(config: QatConfig, log: Callable[[str], None] = quiet) -> ModelCard:
    """Fine-tune ``config.run`` with fake quantization against ``config.cache``'s soft labels
    (no teacher loaded), and write a ``qat-student`` run with its int8 ONNX file."""
    from kdpipe.base.distributed import SINGLE
    from kdpipe.train import TrainData, fit, plan_run

    config.validate()
    fp32_model, fp32_card = load_model(Path(config.run))  # the student: never the teacher
    train_config = _train_config(config, fp32_card, read_config(Path(config.run)))
    train_config.validate()
    soft_labels = load_soft_labels(config.cache)
    # the training room's own plan: the cache's rows, views, alpha and T, checked
    plan = plan_run(train_config, "qat-student", soft_labels, log, SINGLE)
    check_classes(plan.classes, fp32_card.classes, str(config.cache), str(config.run))
    plan = replace(plan, data_config=fp32_card.data)  # the float32 run's normalisation
    data, alpha, temperature = plan.data, plan.alpha, plan.temperature
    train_set, test_set = plan.train_set, plan.test_set
    out = Path(config.out)
    # inputs are valid: only now touch the output (never the float32 run or the cache)
    prepare_output(out, config.overwrite, [config.run, *plan.inputs])
    out.mkdir(parents=True)
    resolved = {"device": "cpu", "temperature": temperature, "alpha": alpha, "processes": 1,
                "quantizer": QUANTIZER}  # fmt: skip
    write_json(
        out / CONFIG_FILE,
        {**asdict(train_config), "kind": "qat-student", "qat": asdict(config),
         "qat_from": config.run, "resolved": resolved},
    )  # fmt: skip
    first = data.gather(torch.arange(min(2, len(data))), 1, 0, config.seed)
    example = TrainData.to_model(first, plan.data_config, torch.device("cpu"))["inputs"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchao's deprecation notes are not the user's
        prepared = prepare_qat(fp32_model, example)
        fit(QatStudent(prepared, fp32_card.num_classes), plan, out, log=log)
        converted = convert_qat(prepared)
    model = float_weights(prepared, _fresh(fp32_card))
    lineage = {
        **plan.lineage,  # the cache's record, as any cached run writes it
        "qat_from": {"run_dir": str(config.run), "weights_sha256": fp32_card.weights_sha256},
        "quantizer": QUANTIZER,
    }
    card = _qat_card(fp32_card, model, train_set, len(data), lineage)
    _write_int8(
        out / INT8_FILE,
        converted,
        card,
        out,
        test_set if test_set is not None else train_set,
        config,
    )
    save_model(out, model, card)  # model.json last: the run is complete
    remove_checkpoint(out)
    log(f"{out / INT8_FILE}: int8 from QAT ({QUANTIZER})")
    return card


def _qat_card(
    fp32_card: ModelCard, model: nn.Module, train_set: ImageSet, rows: int, lineage: dict
) -> ModelCard:
    """The ``qat-student`` model card: the float32 run's model, the QAT weights' hash."""
    return ModelCard(
        format_version=RUN_FORMAT_VERSION,
        kind="qat-student",
        architecture=fp32_card.architecture,
        model_kwargs=fp32_card.model_kwargs,
        num_classes=fp32_card.num_classes,
        in_chans=fp32_card.in_chans,
        classes=list(fp32_card.classes),
        data_config=fp32_card.data_config,
        weights_sha256=weights_sha256(model),
        param_count=param_count(model),
        dataset={
            "name": train_set.name,
            "split": "train",
            "fingerprint": train_set.fingerprint(),
            **({"decode": train_set.decode} if train_set.decode else {}),
            "rows": rows,
            "validation_rows": 0,
        },
        lineage=lineage,
        created=utc_now(),
        software=software_versions(),
    )


def _fresh(card: ModelCard) -> nn.Module:
    return create_model(
        card.architecture,
        num_classes=card.num_classes,
        data_config=card.data,
        model_kwargs=card.model_kwargs,
    )


@torch.inference_mode()
def _write_int8(
    path: Path,
    converted: nn.Module,
    card: ModelCard,
    run_dir: Path,
    check_set: ImageSet,
    config: QatConfig,
) -> None:
    """The converted PT2E model through torch's ONNX exporter, checked on the spot against
    the same converted model run by PyTorch (both compute the same int8 arithmetic)."""
    inputs = check_inputs(card, check_set, config.check_rows)
    reference = converted(inputs).float()

    def build(work: Path) -> tuple[Path, str, dict, dict, int]:
        int8 = work / "int8.onnx"
        to_onnx(converted, inputs[:2], int8, f"{card.architecture} after QAT ({run_dir})")
        # ONNX Runtime's fused integer kernels requantize with their own rounding: a tie
        # rounded the other way moves a logit by thousandths (0.0084 at most on 200 rows
        # of the test student); 0.1 still catches a saturated or wrongly exported layer
        # (0.49 with 8-bit weights on a CPU without VNNI, see WEIGHT_RANGE)
        check = check_against(int8, inputs, reference, max(FP32_TOLERANCE, 0.1),
                              "the converted PT2E model in PyTorch")  # fmt: skip
        quantization = {
            "method": "torchao PT2E quantization-aware training (prepare_qat_pt2e, convert_pt2e)",
            "quantizer": QUANTIZER,
            "format": "QDQ",
            "weights": "int8, symmetric, per output channel",
            "activations": "uint8, per tensor, ranges learned during QAT",
            "qat_from": card.lineage["qat_from"],
            "cache_id": card.lineage["cache_id"],
            "epochs": config.epochs,
            "calibration": {"split": "train", "rows": card.dataset["rows"],
                            "what": "the cache's transfer rows and views, every epoch"},
        }  # fmt: skip
        return int8, "int8-qat", quantization, check, 0

    write_checked(path, build, card, run_dir, overwrite=True)
