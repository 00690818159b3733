"""Shipping a student: ONNX export, int8 (PTQ and QAT from the cache), evaluation, lineage."""

from __future__ import annotations

import json
import re
from pathlib import Path

import kdpipe.export.quantize as quantize_module
import numpy as np
import onnx
import pandas as pd
import pytest
import safetensors.torch
import torch
from conftest import cache, invoke, student
from kdpipe.cache import load_soft_labels
from kdpipe.data.datasets import load_dataset
from kdpipe.export import calibration_set, onnx_logits, onnx_session, read_onnx_card
from kdpipe.export.onnx import graph_weights_digest
from kdpipe.models.runs import load_model, read_card
from kdpipe.models.teacher import predict_logits
from kdpipe.views.inputs import prepare_input
from timm.models import register_model
from torch import nn


class BesselNet(nn.Module):
    """A model torch's ONNX exporter cannot translate (no ONNX function for bessel_j0)."""

    def __init__(self, num_classes: int = 5, in_chans: int = 1, **_: object) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.head = nn.Linear(in_chans * 144, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.special.bessel_j0(x.flatten(1)))


@register_model
def bessel_net(pretrained: bool = False, **kwargs: object) -> BesselNet:
    return BesselNet(**kwargs)


@pytest.fixture(scope="module")
def kd_student(train_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("students") / "kd-cnn"
    result = invoke(
        "train-student --model kd_cnn --data synthetic --epochs 2 --alpha 0.5 --cache",
        train_cache,
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def test_cache(teacher_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("test-cache") / "test.zarr"
    assert cache(teacher_run, out, "--split test --temperature 1").exit_code == 0
    return out


def ort_against_torch(run: Path, path: Path) -> float:
    """Largest logit difference on the whole test split, computed here, apart from the
    export's own check (which sees only --check-rows rows)."""
    model, card = load_model(run)
    test_set = load_dataset("synthetic", "test")
    expected = predict_logits(model, test_set.images, card.data, device=torch.device("cpu"))
    inputs = prepare_input(test_set.images, card.data, torch.device("cpu")).contiguous()
    got = onnx_logits(onnx_session(path), inputs, batch_size=7)  # odd batches: dynamic axis
    return float((got - expected).abs().max())


@pytest.mark.parametrize("architecture", ["kd_mlp_30x2", "kd_cnn", "resnet10t"])
def test_export_round_trip(architecture: str, train_cache: Path, tmp_path: Path) -> None:
    run = tmp_path / architecture
    result = student(train_cache, run, f"--alpha 0.5 --model {architecture} --epochs 1")
    assert result.exit_code == 0, result.output
    out = tmp_path / f"{architecture}.onnx"
    result = invoke("export", run, "--out", out)
    assert result.exit_code == 0, result.output
    assert "largest logit difference" in result.output
    assert not out.with_name(out.name + ".data").exists()  # one self-contained file
    assert ort_against_torch(run, out) < 1e-3

    card, run_card = read_onnx_card(out), read_card(run)
    assert card.format == "fp32" and card.architecture == architecture
    assert card.preprocessing["mean"] == run_card.data_config["mean"]
    assert card.preprocessing["std"] == run_card.data_config["std"]
    assert card.preprocessing["input_size"] == [1, 12, 12]
    assert card.preprocessing["channels"] == 1
    assert card.classes == run_card.classes
    assert card.weights_sha256 == run_card.weights_sha256
    assert card.lineage["cache_id"] == run_card.lineage["cache_id"]
    assert card.lineage["teacher_id"] == run_card.lineage["teacher_id"]
    assert card.run_dir == str(run)
    assert card.check["max_abs_logit_difference"] < 1e-3 and card.check["split"] == "test"


def test_int8_export_and_metadata(kd_student: Path, train_cache: Path, tmp_path: Path) -> None:
    fp32, int8 = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    assert invoke("export", kd_student, "--out", fp32).exit_code == 0
    result = invoke("export", kd_student, "--out", int8, "--int8 --calibration-rows 100")
    assert result.exit_code == 0, result.output
    assert "smaller than float32" in result.output and "calibrated (minmax) on 100 rows" in (
        result.output
    )
    card = read_onnx_card(int8)
    assert card.format == "int8-ptq"
    quantization = card.quantization
    assert quantization["format"] == "QDQ" and quantization["calibration_method"] == "minmax"
    calibration = quantization["calibration"]
    assert calibration["split"] == "train" and calibration["rows"] == 100
    assert calibration["cache_id"] == read_card(kd_student).lineage["cache_id"]
    assert quantization["fp32_check"]["max_abs_logit_difference"] < 1e-3

    graph = onnx.load(str(int8)).graph
    ops = {node.op_type for node in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    int8_weights = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert sum(np.prod(t.dims) for t in int8_weights) > 0.9 * read_card(kd_student).param_count
    assert int8.stat().st_size < fp32.stat().st_size / 2.5
    assert ort_against_torch(kd_student, int8) < 2.0


def test_calibration_touches_no_test_row(
    kd_student: Path, train_cache: Path, test_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = []
    real = quantize_module.load_dataset

    def recording(name: str, split: str, **options: object):
        loaded.append(split)
        return real(name, split, **options)

    monkeypatch.setattr(quantize_module, "load_dataset", recording)
    _, card = load_model(kd_student)
    calibration = calibration_set(card, kd_student, None, 64)
    assert loaded == ["train"] and calibration.split == "train"
    cache_rows = set(load_soft_labels(train_cache).indices.tolist())
    assert set(calibration.rows.tolist()) <= cache_rows and len(calibration.rows) == 64
    # every input is the training image of its row, rendered as in training
    train_set = real("synthetic", "train")
    expected = prepare_input(train_set.images[calibration.rows], card.data, torch.device("cpu"))
    assert torch.equal(calibration.inputs, expected.contiguous())
    test_inputs = prepare_input(
        real("synthetic", "test").images, card.data, torch.device("cpu")
    ).flatten(1)
    flat = calibration.inputs.flatten(1)
    assert not any(bool((test_inputs == row).all(-1).any()) for row in flat)

    # a cache of the test split is refused as calibration data
    result = invoke(
        "export", kd_student, "--out", kd_student.parent / "x.onnx", "--int8 --calibration-cache",
        test_cache,
    )  # fmt: skip
    assert result.exit_code == 1
    assert "is a cache of the test split: calibration uses training rows only" in result.output
    assert not (kd_student.parent / "x.onnx").exists()


def test_qat_from_the_cache_loads_no_teacher(
    kd_student: Path,
    teacher_run: Path,
    train_cache: Path,
    test_cache: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    opened = []
    real = safetensors.torch.load_file

    def recording(path: str, *args: object, **kwargs: object):
        opened.append(Path(path).resolve())
        return real(path, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "load_file", recording)
    out = tmp_path / "qat"
    result = invoke("qat", kd_student, "--cache", train_cache,
                    "--data synthetic --epochs 2 --out", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (kd_student / "model.safetensors").resolve() in opened
    assert not any(teacher_run.resolve() in path.parents for path in opened)

    card = read_card(out)
    assert card.kind == "qat-student"
    assert card.lineage["qat_from"] == {
        "run_dir": str(kd_student),
        "weights_sha256": read_card(kd_student).weights_sha256,
    }
    assert card.lineage["cache_id"] == read_card(kd_student).lineage["cache_id"]
    assert card.lineage["alpha"] == 0.5 and card.lineage["temperature"] == 4.0
    config = json.loads((out / "config.json").read_text())
    assert config["kind"] == "qat-student" and config["qat_from"] == str(kd_student)
    assert len(read_csv_rows(out / "metrics.csv")) == 2
    assert not list(out.glob("checkpoint*"))

    int8 = read_onnx_card(out / "model.int8.onnx")
    assert int8.format == "int8-qat" and int8.weights_sha256 == card.weights_sha256
    assert int8.check["max_abs_logit_difference"] <= 0.1
    ops = {node.op_type for node in onnx.load(str(out / "model.int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert same_on_every_cpu(out / "model.int8.onnx") < 0.05

    # the int8 file on ONNX Runtime, its lineage back to the float32 run and the cache
    result = invoke("evaluate", out / "model.int8.onnx", "--data synthetic --format json "
                    "--cache", test_cache)  # fmt: skip
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.output)
    assert row["kind"] == "onnx-int8-qat" and row["teacher_agreement"] is not None
    result = invoke("lineage", out / "model.int8.onnx", "--format json")
    assert result.exit_code == 0, result.output
    links = [(r["link"], r["status"]) for r in json.loads(result.output)]
    assert links == [
        ("onnx int8-qat", "verified"),
        ("qat-student", "verified"),
        ("qat from", "verified"),
        ("cache", "verified"),
        ("teacher", "verified"),
        ("dataset", "verified"),
    ]
    # a report row (the α and T it learned with), with the command that reproduces the run
    markdown = tmp_path / "report.md"
    result = invoke("report", out, "--markdown", markdown)
    assert result.exit_code == 0, result.output
    assert "| 0.5 | 4 " in result.output
    assert f"kdpipe qat {kd_student} --cache {train_cache} --data synthetic --epochs 2" in (
        markdown.read_text()
    )
    # QAT runs are converted from the ranges they learned, not calibrated again
    result = invoke("export", out, "--out", tmp_path / "again.onnx", "--int8")
    assert result.exit_code == 1 and "is a QAT run" in result.output


def int8_weights(path: Path) -> list[np.ndarray]:
    """The int8 initializers of a file: its quantized weights."""
    tensors = [onnx.numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer]
    return [t for t in tensors if t.dtype == np.int8 and t.size > 1]


def same_on_every_cpu(path: Path) -> float:
    """How far ONNX Runtime's fused integer kernels (QLinearConv, QGemm: on a CPU without
    VNNI, uint8 x int8 pairs summed in a saturating int16) move the file's logits from its
    QDQ graph computed as written (optimizations off: dequantize, float op, quantize), on
    the test split; the weights must fit 7 bits, so that no pair can saturate."""
    import onnxruntime as ort

    assert int8_weights(path) and all(w.min() >= -64 and w.max() <= 64 for w in int8_weights(path))
    test_set = load_dataset("synthetic", "test")
    card = read_onnx_card(path)
    inputs = prepare_input(test_set.images, card.data, torch.device("cpu")).numpy()
    logits = []
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                  ort.GraphOptimizationLevel.ORT_ENABLE_ALL):  # fmt: skip
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        logits.append(session.run(None, {session.get_inputs()[0].name: inputs})[0])
    return float(np.abs(logits[0] - logits[1]).max())


def test_int8_ptq_computes_the_same_on_every_cpu(kd_student: Path, tmp_path: Path) -> None:
    int8 = tmp_path / "int8.onnx"
    result = invoke("export", kd_student, "--out", int8, "--int8 --calibration-rows 100")
    assert result.exit_code == 0, result.output
    assert "7 bits" in read_onnx_card(int8).quantization["weights"]
    assert same_on_every_cpu(int8) < 0.05


def read_csv_rows(path: Path) -> list[str]:
    return path.read_text().splitlines()[1:]


def test_evaluate_and_lineage_of_an_onnx_file(
    kd_student: Path, test_cache: Path, tmp_path: Path
) -> None:
    out = tmp_path / "student.onnx"
    assert invoke("export", kd_student, "--out", out).exit_code == 0
    rows = {}
    for target in (kd_student, out):
        result = invoke("evaluate", target, "--data synthetic --format json --cache", test_cache)
        assert result.exit_code == 0, result.output
        (rows[target],) = json.loads(result.output)
    torch_row, onnx_row = rows[kd_student], rows[out]
    assert list(torch_row) == list(onnx_row)  # the same columns, side by side
    assert onnx_row["errors"] == torch_row["errors"]  # float32 on both runtimes
    assert onnx_row["teacher_agreement"] == torch_row["teacher_agreement"]
    assert onnx_row["kind"] == "onnx-fp32" and onnx_row["runtime"].startswith("onnxruntime")
    assert onnx_row["size_mb"] == round(out.stat().st_size / 2**20, 4)
    for row in (torch_row, onnx_row):
        assert row["latency_p95_ms"] >= row["latency_ms"] > 0
        assert row["latency_calls"] >= 200 and row["latency_spread"] >= 0  # timing.py's window
        assert row["throughput_b64_img_s"] > 0 and row["threads"] >= 1

    result = invoke("lineage", out, "--format json")
    assert result.exit_code == 0, result.output
    chain = json.loads(result.output)
    assert [r["link"] for r in chain] == ["onnx fp32", "student", "cache", "teacher", "dataset"]
    assert all(r["status"] == "verified" for r in chain)

    # the run's weights changed after the export: the file no longer matches its run
    copy = tmp_path / "run-copy"
    copy.mkdir()
    for name in ("config.json", "metrics.csv", "model.safetensors", "model.json"):
        (copy / name).write_bytes((kd_student / name).read_bytes())
    exported = tmp_path / "copy.onnx"
    assert invoke("export", copy, "--out", exported).exit_code == 0
    model, _ = load_model(copy)
    state = model.state_dict().items()
    other = {k: (v + 1 if v.is_floating_point() else v).contiguous() for k, v in state}
    safetensors.torch.save_file(other, str(copy / "model.safetensors"))
    result = invoke("lineage", exported)
    assert result.exit_code == 1 and "MISMATCH" in result.output


# --- bad input: one line, a non-zero exit, nothing written or damaged ---------------------------


def test_export_refuses_an_unfinished_run(tmp_path: Path) -> None:
    run = tmp_path / "unfinished"
    run.mkdir()
    (run / "config.json").write_text("{}")
    result = invoke("export", run, "--out", tmp_path / "x.onnx")
    assert result.exit_code == 1
    assert result.output == f"Error: {run} is an unfinished run (no model.json): training did " \
        "not complete\n"  # fmt: skip
    assert not (tmp_path / "x.onnx").exists()


def test_export_names_the_operator_it_cannot_translate(tmp_path: Path) -> None:
    run = tmp_path / "bessel"
    result = invoke("train-teacher --model bessel_net --data synthetic --epochs 1 --out", run)
    assert result.exit_code == 0, result.output
    out = tmp_path / "bessel.onnx"
    result = invoke("export", run, "--out", out)
    assert result.exit_code == 1
    assert "cannot be exported to ONNX: operator prims.bessel_j0 has no ONNX translation" in (
        result.output
    )
    assert len(result.output.strip().splitlines()) == 1
    assert not out.exists()  # nothing written
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_int8_without_calibration_data(teacher_run: Path, tmp_path: Path) -> None:
    result = invoke("export", teacher_run, "--out", tmp_path / "t.onnx", "--int8")
    assert result.exit_code == 1
    assert "--int8 needs calibration data" in result.output
    assert "give --calibration-cache CACHE" in result.output
    assert not (tmp_path / "t.onnx").exists()
    result = invoke("export", teacher_run, "--out", tmp_path / "t.onnx", "--int8 "
                    "--calibration-cache", tmp_path / "nowhere.zarr")  # fmt: skip
    assert result.exit_code == 1 and "--int8 needs calibration data, and" in result.output


def test_an_onnx_file_that_is_not_kdpipes(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.onnx"
    torch.onnx.export(nn.Linear(144, 5).eval(), (torch.zeros(1, 144),), str(foreign), dynamo=True,
                      verbose=False)  # fmt: skip
    for command in ("evaluate {} --data synthetic", "lineage {}"):
        result = invoke(command.format(foreign))
        assert result.exit_code == 1
        assert result.output == (
            f"Error: {foreign} is not a kdpipe export: it has no 'kdpipe' metadata "
            "(kdpipe export writes it)\n"
        )
    garbage = tmp_path / "garbage.onnx"
    garbage.write_text("not a protobuf")
    result = invoke("evaluate", garbage, "--data synthetic")
    assert result.exit_code == 1 and f"Error: {garbage} is not an ONNX file" in result.output


def test_export_keeps_an_existing_file(kd_student: Path, tmp_path: Path) -> None:
    out = tmp_path / "taken.onnx"
    out.write_bytes(b"mine")
    result = invoke("export", kd_student, "--out", out)
    assert result.exit_code == 1
    assert "already exists: choose another path or pass --overwrite" in result.output
    assert out.read_bytes() == b"mine"


def test_the_qat_graph_trains_like_the_float_model(kd_student: Path) -> None:
    """With fake quantization off, the prepared PT2E graph in train mode computes what the
    float32 model computes in train mode: no dropout rewritten to p=0.5 (torchao 0.18's
    train/eval switch does that to every dropout it finds), BatchNorm on batch statistics."""
    from kdpipe.export.qat import prepare_qat
    from torchao.quantization.pt2e import disable_fake_quant

    model, card = load_model(kd_student)
    images = load_dataset("synthetic", "train").images[:64]
    inputs = prepare_input(images, card.data, torch.device("cpu")).contiguous()
    with torch.no_grad():
        expected = model.train()(inputs)
        model, _ = load_model(kd_student)
        prepared = prepare_qat(model, inputs[:2])
        prepared.apply(disable_fake_quant)
        prepared.train()
        got = prepared(inputs)
    assert torch.allclose(got, expected, atol=1e-4)


def test_qat_refuses_bad_input(
    kd_student: Path, train_cache: Path, test_cache: Path, tmp_path: Path
) -> None:
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.json").write_text("{}")
    out = tmp_path / "qat"
    result = invoke("qat", unfinished, "--cache", train_cache, "--data synthetic --out", out)
    assert result.exit_code == 1 and "is an unfinished run (no model.json)" in result.output
    result = invoke("qat", kd_student, "--cache", test_cache, "--data synthetic --out", out)
    assert result.exit_code == 1
    assert f"{test_cache} was made from another dataset than synthetic train" in result.output
    assert not out.exists()
    out.mkdir()  # an empty folder is made afresh; one holding anything is refused, kept
    (out / "notes.txt").write_text("mine")
    result = invoke("qat", kd_student, "--cache", train_cache, "--data synthetic --out", out)
    assert result.exit_code == 1 and "already exists: choose another path" in result.output
    assert (out / "notes.txt").read_text() == "mine"


def test_edge_table_groups_seeds_and_measures_the_goals() -> None:
    from kdpipe.export.results import arm_of, edge_table, goals

    assert arm_of("runs/edge/kd-s1.int8.onnx") == "kd"
    assert arm_of("runs/edge/qad-s2/model.int8.onnx") == "qad"
    assert arm_of("runs/edge/hard-s0") == "hard"

    def row(run: str, kind: str, errors: int, size_mb: float, latency: float) -> dict:
        return {"run": run, "kind": kind, "errors": errors, "accuracy": 1 - errors / 1e4,
                "teacher_agreement": 0.9, "ece": 0.02, "size_mb": size_mb,
                "latency_ms": latency, "latency_p95_ms": latency * 1.1,
                "throughput_b64_img_s": 1000, "threads": 1}  # fmt: skip

    rows = [
        row(f"runs/edge/{arm}-s{seed}{suffix}", kind, errors + seed, size, latency)
        for seed in (0, 1)
        for arm, suffix, kind, errors, size, latency in (
            ("kd", ".onnx", "onnx-fp32", 1300, 1.6, 0.05),
            ("kd", ".int8.onnx", "onnx-int8-ptq", 1350, 0.4, 0.035),
            ("hard", ".onnx", "onnx-fp32", 1400, 1.6, 0.05),
            ("hard", ".int8.onnx", "onnx-int8-ptq", 1550, 0.5, 0.025),
            ("qad", "/model.int8.onnx", "onnx-int8-qat", 1340, 0.4, 0.035),
            ("hardqat", "/model.int8.onnx", "onnx-int8-qat", 1420, 0.4, 0.035),
        )
    ]
    table = edge_table(pd.DataFrame(rows))
    assert list(table["seeds"]) == [2] * 6
    assert table.iloc[0]["test errors"] == "1300.5 ± 0.7"
    kd, hard, qad = goals(table)
    assert "1/4.00" in kd and "(goal ≤ 1/3.5: **met**)" in kd
    assert "0.70× fp32 ONNX (goal ≤ 0.6×: **missed**)" in kd
    assert "+0.50 points against fp32 (goal within 1 point: **met**)" in kd
    assert "1/3.20" in hard and "**missed**); int8 batch-1 latency 0.50×" in hard
    assert "+1.50 points against fp32 (goal within 1 point: **missed**)" in hard
    assert "QAD int8 1340.5 errors against PTQ int8 1350.5" in qad
    assert qad.count("**met**") == 2


def test_export_beyond_the_tolerance_writes_nothing(kd_student: Path, tmp_path: Path) -> None:
    out = tmp_path / "tight.onnx"
    result = invoke("export", kd_student, "--out", out, "--int8 --tolerance 1e-6")
    assert result.exit_code == 1
    assert re.fullmatch(
        r"Error: the ONNX model differs from PyTorch float32 by [0-9.e-]+ in a logit on 200 "
        r"test rows \(tolerance 1e-06\): not written\n",
        result.output,
    ), result.output
    assert list(tmp_path.iterdir()) == []


def test_metadata_copied_into_another_graph_is_refused(kd_student: Path, tmp_path: Path) -> None:
    """Issue 24: an unrelated graph carrying a copy of a student's kdpipe metadata was
    "verified" by lineage and evaluated under the student's cache_id. The metadata binds
    the file's own weights (initializers, external data included)."""
    out = tmp_path / "student.onnx"
    assert invoke("export", kd_student, "--out", out).exit_code == 0
    block = {p.key: p.value for p in onnx.load(str(out)).metadata_props}["kdpipe"]
    recorded = json.loads(block)["graph_weights_sha256"]

    # the case as found: another model's graph, the student's metadata copied into it
    foreign = tmp_path / "foreign.onnx"
    torch.onnx.export(nn.Linear(144, 5).eval(), (torch.zeros(1, 144),), str(foreign), dynamo=True,
                      verbose=False)  # fmt: skip
    model = onnx.load(str(foreign))
    model.metadata_props.add(key="kdpipe", value=block)
    onnx.save(model, str(foreign))
    found = graph_weights_digest(onnx.load(str(foreign)))
    message = (
        f"Error: {foreign}: its 'kdpipe' metadata was made for other weights (it records graph "
        f"weights {recorded[:16]}, this graph has {found[:16]}): the metadata was copied from "
        "another file or the graph was changed after export\n"
    )
    for command in ("lineage {}", "evaluate {} --data synthetic"):
        result = invoke(command.format(foreign))
        assert result.exit_code == 1 and result.output == message

    # one more of the class: the student's own file, one weight changed in place
    edited = tmp_path / "edited.onnx"
    model = onnx.load(str(out))
    first = model.graph.initializer[0]
    values = onnx.numpy_helper.to_array(first).copy()
    values.flat[0] += 1
    first.CopyFrom(onnx.numpy_helper.from_array(values, first.name))
    onnx.save(model, str(edited))
    result = invoke("lineage", edited)
    assert result.exit_code == 1 and "metadata was made for other weights" in result.output

    # the weights moved to external data (.onnx.data) are the same weights: still bound;
    # the data file changed or gone is caught, naming the file
    split = tmp_path / "split" / "student.onnx"
    split.parent.mkdir()
    onnx.save(onnx.load(str(out)), str(split), save_as_external_data=True,
              location="student.onnx.data", size_threshold=0)  # fmt: skip
    assert read_onnx_card(split).graph_weights_sha256 == recorded
    data = split.with_name("student.onnx.data")
    raw = bytearray(data.read_bytes())
    raw[0] ^= 0xFF
    data.write_bytes(bytes(raw))
    result = invoke("lineage", split)
    assert result.exit_code == 1 and "metadata was made for other weights" in result.output
    data.unlink()
    result = invoke("evaluate", split, "--data synthetic")
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: {split}: its weights in {data} cannot be read (")
    assert len(result.output.splitlines()) == 1
